"""DLG — "Deep Leakage from Gradients" (Zhu, Liu, Han, NeurIPS 2019): a weak baseline.

Dummy images (and, with ``label_mode = "joint"``, dummy label logits, softmaxed into soft
targets) are optimised with L-BFGS so that their predicted update matches the observed one in
squared L2 distance. ``label_mode = "recover"`` uses :mod:`adversary.labels` instead (iDLG).
The predicted update comes from the same :class:`adversary.attacks.geiping.Matcher` as Geiping's
attack (``multistep`` as there). Labels granted by the scenario (``obs.labels``) are always used.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from adversary.attacks.geiping import Matcher, attack_labels, initial_inputs, resolve_mode
from adversary.objectives import total_variation
from adversary.observation import Observation, Reconstruction
from adversary.registry import AttackContext, register_attack


@dataclass(frozen=True)
class DLGParams:
    iterations: int = field(default=50, metadata={"min": 1, "doc": "L-BFGS steps (each up to max_eval evaluations)"})
    max_eval: int = field(default=20, metadata={"min": 1, "doc": "objective evaluations per L-BFGS step"})
    lr: float = field(default=1.0, metadata={"gt": 0.0})
    history_size: int = field(default=100, metadata={"min": 1})
    label_mode: str = field(default="joint", metadata={"choices": ("joint", "recover")})
    loss: str = field(default="l2", metadata={"choices": ("l2", "relative_l2", "cosine")})
    tv_weight: float = field(default=0.0, metadata={"min": 0.0})
    box: bool = field(default=True, metadata={"doc": "clamp the dummies to the data range after every step"})
    init: str = field(default="randn", metadata={"choices": ("randn", "rand", "zeros")})
    multistep: str = field(default="auto", metadata={"choices": ("auto", "unroll", "naive")})


@register_attack("dlg", DLGParams)
def run(obs: Observation, params: DLGParams, ctx: AttackContext) -> Reconstruction:
    device = ctx.device
    mode = resolve_mode(params.multistep, obs)
    matcher = Matcher(obs, device, mode, loss=params.loss)
    n = matcher.n
    num_classes = obs.domain.num_classes
    generator = torch.Generator().manual_seed(ctx.seed)
    x = initial_inputs(params.init, (n, *obs.domain.shape), generator, device).requires_grad_(True)
    lo, hi = obs.domain.bounds(x)
    joint = params.label_mode == "joint" and obs.labels is None
    if joint:
        label_logits = torch.randn((n, num_classes), generator=generator).to(device).requires_grad_(True)
        variables, label_source = [x, label_logits], "joint"
    else:
        fixed_labels, label_source = attack_labels(obs, n)
        fixed_labels = fixed_labels.to(device)
        variables = [x]
    opt = torch.optim.LBFGS(variables, lr=params.lr, max_iter=params.max_eval, history_size=params.history_size)

    def objective() -> torch.Tensor:
        labels = label_logits if joint else fixed_labels
        value = matcher(x, labels)
        if params.tv_weight:
            value = value + params.tv_weight * total_variation(x)
        return value

    def closure() -> torch.Tensor:
        opt.zero_grad()
        value = objective()
        value.backward()
        return value

    best = (math.inf, x.detach().clone(), label_logits.detach().clone() if joint else None)
    stopped, diverged, done = False, False, 0
    for it in range(params.iterations):
        if ctx.deadline is not None and time.monotonic() > ctx.deadline:
            stopped = True
            break
        opt.step(closure)
        if params.box:
            with torch.no_grad():
                x.copy_(torch.maximum(torch.minimum(x, hi), lo))
        done += 1
        value = objective().item()
        if not math.isfinite(value):
            diverged = True
            break
        if value < best[0]:
            best = (value, x.detach().clone(), label_logits.detach().clone() if joint else None)
        ctx.report(done, params.iterations, value)
    value, best_x, best_logits = best
    labels = best_logits.argmax(dim=1) if joint else fixed_labels
    return Reconstruction(inputs=best_x.cpu(), labels=labels.cpu(), iterations=done, objective=value,
                          extras={"stopped_early": stopped, "diverged": diverged, "mode": mode,
                                  "label_source": label_source})
