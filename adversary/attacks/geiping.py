"""Geiping et al., "Inverting Gradients — How easy is it to break privacy in federated
learning?" (NeurIPS 2020), adapted to multi-step local training.

Dummy images are optimised so that the update they would produce matches the observed one:

- objective: 1 − cosine similarity between predicted and observed update over all parameter
  tensors (optionally layer-weighted), + ``tv_weight`` × total variation, + ``bn_weight`` ×
  relative L2 mismatch of the BatchNorm running statistics (the client trains in train mode and
  uploads its BN buffers: their change carries the batch mean/variance of every BN input, which
  fixes the brightness/contrast that the gradient alone leaves ambiguous under batch
  normalisation);
- optimiser: Adam on the *sign* of the input gradient, lr ×0.1 at 3/8, 5/8 and 7/8 of the
  iterations, projection onto the valid data box after every step;
- ``restarts`` random initialisations (``randn``/``rand``/``zeros`` in normalised space), the one
  with the lowest final objective is returned. The restarts descend side by side, their objective
  evaluated in one vectorised call (``batch_restarts``; :meth:`Matcher.values`), and so do the
  restarts of several compatible updates (:func:`batch_key`, :func:`run_many`: the Ray worker
  takes such jobs from its queue together); ``compile`` runs the objective through
  ``torch.compile`` (:func:`compiled`).

Multi-step updates (``multistep``): ``naive`` treats Δ as −lr·∇L of one step on the whole batch
(the FedSGD assumption); ``unroll`` replays the public local-training loop (epochs, batch
schedule, momentum, weight decay, nesterov) on the dummies with
:func:`adversary.maths.unroll.unroll_local_training`; ``auto`` unrolls (for a single step that *is* the
one-step model, with weight decay/nesterov accounted for exactly).

Labels come from :mod:`adversary.maths.labels` unless the scenario grants them (``obs.labels``).

``loss = "bayes"`` (Balunović et al., ICLR'22) makes this the defense-aware attacker: the cosine
term is replaced by the known defense's negative log-likelihood of the observed Δ, per compared
entry (:mod:`adversary.maths.defense_model`; gaussian, laplace, dp_local, topk; needs
``attack.knows_defense``), the TV prior kept.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Hashable

import torch

from adversary.maths.defense_model import BAYES_LOSS
from adversary.maths.matching import (BN_WEIGHT, TV_WEIGHT, Matcher, attack_labels, descend_batch, initial_inputs,
                                      num_examples, resolve_mode)
from adversary.maths.objectives import LAYER_WEIGHTINGS, MATCHING_LOSSES, total_variation
from adversary.observation import Observation, Reconstruction
from adversary.attacks.base import Attack, AttackContext


@dataclass(frozen=True)
class GeipingParams:
    """Defaults tuned on the FedSGD scenario (untrained ConvNet width 32, b = 1, 32x32 embedded
    photos, CPU; see benchmarks/geiping.py): breaching's Inverting-Gradients configuration
    (cosine, signed Adam lr 0.1, decay at 3/8-5/8-7/8, box projection, randn init) except

    - ``tv_weight`` 0.01 instead of 0.2: at 0.2 the prior dominates the cosine term (median
      16 dB at 2,000 iterations here; 0.05 → 25 dB, 0.01 → 32-36 dB with the BN term);
    - ``bn_weight`` 1.0: the BN running-statistics term (not in breaching, whose threat model
      puts BN in eval mode) resolves the contrast/brightness ambiguity of train-mode BN. 10 is a
      little better for b = 1 (35.7 vs 31.9 dB) but worse for b = 4 and for unrolled multi-step
      updates (1000 it.: 14.5/19.2 dB at 10, 20.8/28.6 at 1, 24.8/32.6 at 0.3);
    - 2,000 iterations and 1 restart: the b = 1 result is reached by ~1,000 iterations (4,000 do
      not improve it); ~25 s per image on one CPU thread.
    """

    iterations: int = field(default=2000, metadata={"min": 1, "doc": "optimisation steps per restart"})
    restarts: int = field(default=1, metadata={"min": 1, "doc": "random restarts; the lowest objective wins"})
    lr: float = field(default=0.1, metadata={"gt": 0.0, "doc": "Adam step size (on the sign of the gradient)"})
    lr_decay: bool = field(default=True, metadata={"doc": "lr x0.1 at 3/8, 5/8, 7/8 of the iterations"})
    signed: bool = field(default=True, metadata={"doc": "step on the sign of the input gradient"})
    tv_weight: float = field(default=TV_WEIGHT, metadata={"min": 0.0, "doc": "total-variation prior weight"})
    bn_weight: float = field(default=BN_WEIGHT, metadata={"min": 0.0, "doc": "weight of the BN running-statistics match (loss 'bayes': > 0 puts them into the likelihood)"})
    loss: str = field(default="cosine", metadata={"choices": MATCHING_LOSSES + (BAYES_LOSS,),
                                                  "doc": "'bayes': the known defense's NLL of the observed update"})
    layer_weighting: str = field(default="equal", metadata={"choices": LAYER_WEIGHTINGS})
    init: str = field(default="randn", metadata={"choices": ("randn", "rand", "zeros")})
    multistep: str = field(default="auto", metadata={"choices": ("auto", "unroll", "naive")})
    report_every: int = field(default=100, metadata={"min": 1})
    batch_restarts: bool = field(default=True, metadata={
        "doc": "the restarts (and compatible queued jobs) as one vectorised objective call; off: one by one"})
    compile: bool = field(default=False, metadata={
        "doc": "torch.compile the objective; a one-off compile per worker process (~35-60 s on a CPU), "
               "then ~15 % less per step at b = 1, ~8 % at b = 4 on a CPU (one by one); for launch-bound GPUs"})


def batch_key(obs: Observation, params: GeipingParams) -> Hashable | None:
    """Observations with equal keys can be attacked in one launch (:func:`run_many`): same round
    (θ_t), architecture, data domain, round config, example count and compared tensors, same
    params. None: this one runs alone (restarts one after another, or the Bayes likelihood)."""
    if not params.batch_restarts or params.loss == BAYES_LOSS:
        return None
    compared = tuple(k for k, v in obs.update.items() if v.is_floating_point() and v.abs().sum() > 0)
    return (params, obs.server_round, obs.model, obs.domain, obs.training, num_examples(obs), compared)


def run(obs: Observation, params: GeipingParams, ctx: AttackContext) -> Reconstruction:
    return run_many([obs], params, [ctx])[0]


def run_many(observations: list[Observation], params: GeipingParams,
             contexts: list[AttackContext]) -> list[Reconstruction]:
    """Attack J observations with equal :func:`batch_key` (one context each: seed, progress; the
    first one's device, the earliest deadline) in one descent over J × R problems of shape
    (n, C, H, W): the objective of all of them in one vectorised call (``batch_restarts``), else
    problem by problem; either way each keeps its own start, labels, BN statistics and best
    iterate, as if attacked alone."""
    device = contexts[0].device
    first = observations[0]
    mode = resolve_mode(params.multistep, first)
    matcher = Matcher(first, device, mode, loss=params.loss, layer_weighting=params.layer_weighting,
                      bn_weight=params.bn_weight)
    jobs = matcher.stack_targets(observations) if len(observations) > 1 else None
    n, restarts = matcher.n, params.restarts
    recovered = [attack_labels(obs, n) for obs in observations]
    labels = torch.stack([y for y, _ in recovered]).to(device)  # (J, n)
    shape = (n, *first.domain.shape)
    starts = []
    for ctx in contexts:
        generator = torch.Generator().manual_seed(ctx.seed)
        starts.append(torch.stack([initial_inputs(params.init, shape, generator, device) for _ in range(restarts)]))
    bounds = first.domain.bounds(torch.zeros(1, device=device))
    deadlines = [ctx.deadline for ctx in contexts if ctx.deadline is not None]
    total = params.iterations * restarts
    done = 0

    def alone(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        match = matcher.functional(x, y) if params.compile else matcher(x, y)
        return match + params.tv_weight * total_variation(x) if params.tv_weight else match

    def together(x: torch.Tensor) -> torch.Tensor:
        value = matcher.values(x, labels, jobs)
        if params.tv_weight:
            value = value + params.tv_weight * torch.func.vmap(torch.func.vmap(total_variation))(x)
        return value

    if params.compile:
        alone, together = compiled(alone), compiled(together)

    def objective(x: torch.Tensor) -> torch.Tensor:  # (J, R, n, C, H, W) -> (J, R)
        if x.shape[:2] == (1, 1) or not params.batch_restarts:
            return torch.stack([torch.stack([alone(xr, y) for xr in xs]) for xs, y in zip(x, labels)])
        return together(x)

    def on_step(values: torch.Tensor) -> None:
        nonlocal done
        done += restarts
        if done // params.report_every > (done - restarts) // params.report_every:
            for ctx, value in zip(contexts, values.min(dim=1).values.tolist()):
                ctx.report(done, total, value)

    descent = descend_batch(objective, torch.stack(starts), iterations=params.iterations, lr=params.lr,
                            signed=params.signed, lr_decay=params.lr_decay, bounds=bounds,
                            deadline=min(deadlines) if deadlines else None, on_step=on_step, problem_dims=2)
    results = []
    for j, (ctx, (y, label_source)) in enumerate(zip(contexts, recovered)):
        objectives = descent.objectives[j]
        best = int(torch.argmin(objectives))
        ctx.report(done, total, float(objectives[best]))
        finite = [v for v in objectives.tolist() if math.isfinite(v)]
        results.append(Reconstruction(
            inputs=descent.inputs[j, best].cpu(), labels=y.cpu(), iterations=done, objective=float(objectives[best]),
            extras={"stopped_early": descent.stopped, "mode": mode, "label_source": label_source,
                    "restarts_done": len(finite), "restart_objectives": finite, "jobs_in_launch": len(observations)}))
    return results


def compiled(function: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``torch.compile(function)``, falling back to ``function`` itself, with one warning naming
    the cause, when compiling fails (e.g. no C++ compiler for the CPU backend). torch keeps the
    compiled code per process, keyed by the function's code: later jobs of the same shapes reuse it."""
    fast = torch.compile(function)
    failed = False

    def call(*args: torch.Tensor) -> torch.Tensor:
        nonlocal failed
        if not failed:
            try:
                return fast(*args)
            except Exception as exc:  # noqa: BLE001 - the compiler stack raises many types
                failed = True
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                warnings.warn(f"geiping: compile = true, but torch.compile failed ({type(exc).__name__}: "
                              f"{first}); running uncompiled", RuntimeWarning, stacklevel=2)
        return function(*args)
    return call


ATTACK = Attack("geiping", GeipingParams, run, run_many=run_many, batch_key=batch_key)
