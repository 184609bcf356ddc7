"""DLG — "Deep Leakage from Gradients" (Zhu, Liu, Han, NeurIPS 2019): a weak baseline.

Dummy images (and, with ``label_mode = "joint"``, dummy label logits, softmaxed into soft
targets) are optimised with L-BFGS so that their predicted update matches the observed one in
squared L2 distance. ``label_mode = "recover"`` uses :mod:`adversary.maths.labels` instead (iDLG).
The predicted update comes from the same :class:`adversary.maths.matching.Matcher` as Geiping's
attack (``multistep`` as there). Labels granted by the scenario (``obs.labels``) are always used.

Measured here: on small MLPs it recovers b = 1 images; on the untrained 32x32 ConvNet with
train-mode BatchNorm L-BFGS stalls or diverges at 5-10 dB (Geiping's attack: > 30 dB) — it is the
baseline. A diverged run (non-finite objective) stops and returns the best point evaluated.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from adversary.maths.matching import Matcher, attack_labels, initial_inputs, resolve_mode
from adversary.maths.objectives import total_variation
from adversary.observation import Observation, Reconstruction
from adversary.attacks.base import Attack, AttackContext


@dataclass(frozen=True)
class DLGParams:
    iterations: int = field(default=50, metadata={"min": 1, "doc": "L-BFGS steps (each up to max_eval evaluations)"})
    max_eval: int = field(default=20, metadata={"min": 1, "doc": "objective evaluations per L-BFGS step"})
    lr: float = field(default=1.0, metadata={"gt": 0.0})
    history_size: int = field(default=100, metadata={"min": 1})
    line_search: bool = field(default=False,
                              metadata={"doc": "strong-Wolfe line search (steadier, but stalls earlier here)"})
    label_mode: str = field(default="joint", metadata={"choices": ("joint", "recover")})
    loss: str = field(default="l2", metadata={"choices": ("l2", "relative_l2", "cosine")})
    tv_weight: float = field(default=0.0, metadata={"min": 0.0})
    box: bool = field(default=True, metadata={"doc": "clamp the dummies to the data range after every step "
                                                      "(the result is clamped in any case)"})
    init: str = field(default="randn", metadata={"choices": ("randn", "rand", "zeros")})
    multistep: str = field(default="auto", metadata={"choices": ("auto", "unroll", "naive")})


class _Stop(Exception):
    """Raised inside the L-BFGS closure: the deadline passed or the objective is not finite."""


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
    opt = torch.optim.LBFGS(variables, lr=params.lr, max_iter=params.max_eval, history_size=params.history_size,
                            line_search_fn="strong_wolfe" if params.line_search else None)

    def objective() -> torch.Tensor:
        labels = label_logits if joint else fixed_labels
        value = matcher(x, labels)
        if params.tv_weight:
            value = value + params.tv_weight * total_variation(x)
        return value

    best = [math.inf, x.detach().clone(), label_logits.detach().clone() if joint else None]

    def closure() -> torch.Tensor:
        if ctx.deadline is not None and time.monotonic() > ctx.deadline:
            raise _Stop("deadline")  # abandon the L-BFGS step in flight; the best evaluation is kept
        opt.zero_grad()
        value = objective()
        v = value.item()
        if not math.isfinite(v):
            raise _Stop("diverged")
        if v < best[0]:  # every evaluation is scored at the point it was made
            best[:] = [v, x.detach().clone(), label_logits.detach().clone() if joint else None]
        value.backward()
        return value

    stopped, diverged, done = False, False, 0
    for _ in range(params.iterations):
        try:
            if ctx.deadline is not None and time.monotonic() > ctx.deadline:
                raise _Stop("deadline")
            opt.step(closure)
        except _Stop as stop:
            stopped, diverged = stop.args[0] == "deadline", stop.args[0] == "diverged"
            break
        if params.box:
            with torch.no_grad():
                x.copy_(torch.maximum(torch.minimum(x, hi), lo))
        done += 1
        ctx.report(done, params.iterations, best[0])
    value, best_x, best_logits = best
    best_x = torch.maximum(torch.minimum(best_x, hi), lo)
    labels = best_logits.argmax(dim=1) if joint else fixed_labels
    return Reconstruction(inputs=best_x.cpu(), labels=labels.cpu(), iterations=done, objective=value,
                          extras={"stopped_early": stopped, "diverged": diverged, "mode": mode,
                                  "label_source": label_source})


ATTACK = Attack("dlg", DLGParams, run)
