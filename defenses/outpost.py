"""Outpost (Wang, Hugh, Li, "More than Enough is Too Much: Adaptive Defenses against Gradient
Leakage in Production Federated Learning", INFOCOM'23), per local step.

At local iteration t (1-based: the first step of the round is t = 1) the step's gradient is
perturbed with probability 1 / (1 + β·t). When it is:

- risk per parameter tensor = min(Var(θ_layer), 1) (the spread of the current weights);
- empirical Fisher information F = g², averaged over the tensor's first axis (a weight
  (out, in, ...) gives one value per (in, ...) position, shared by every output row; a bias
  gives one value for the whole vector);
- Gaussian noise of std risk·noise_base on the entries whose F is at or above the
  (100 − φ)-th percentile of F over all tensors (so about φ % of the Fisher entries);
- entries with |g| below the prune_base-th percentile of |g| within their tensor are zeroed
  (pruning is applied first, then the noise is added, as in the reference).

Follows the reference (Plato, ``examples/gradient_leakage_attacks/defense/Outpost/perturb.py``
and ``dlg_trainer.py``): the decay rule, risk, Fisher information with the mean over the first
axis, numpy-style percentiles (linear interpolation), the noise and pruning masks, the defaults
β = 0.125, φ = 40, prune_base = 80, noise_base = 0.8.

Departs from it:

- the perturbed gradient is written back to ``p.grad`` and goes through the client's real
  optimizer (momentum, weight decay, nesterov); the reference binds it to a local name and
  returns the input list unchanged, so as published it has no effect, and its loop is plain SGD;
- t counts local iterations across epochs (1, 2, 3, ...); the reference uses
  epoch × (batch index + 1);
- the coin and the noise come from the client's seeded generator; the reference re-seeds
  torch with a fixed seed on every call (the same noise draw every step);
- the variance of a one-element tensor is taken as 0 (torch's unbiased variance is NaN there).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from defenses.base import Defense
from defenses.tensors import gaussian_like, percentile


@dataclass(frozen=True)
class OutpostParams:
    beta: float = field(default=0.125, metadata={"min": 0.0, "doc": "decay: perturb with probability 1/(1 + beta*t)"})
    phi: float = field(default=40.0, metadata={"min": 0.0, "max": 100.0, "doc": "percent of Fisher-information entries that get noise"})
    prune_base: float = field(default=80.0, metadata={"min": 0.0, "max": 100.0, "doc": "percentile of |g| per layer below which entries are zeroed"})
    noise_base: float = field(default=0.8, metadata={"min": 0.0, "doc": "noise std = risk * noise_base"})


def perturb_probability(t: int, beta: float) -> float:
    """Probability of perturbing local iteration ``t`` (1-based)."""
    return 1.0 / (1.0 + beta * t)


def layer_risk(params: list[torch.Tensor]) -> list[float]:
    """min(Var(θ_layer), 1) per tensor (unbiased variance; 0 for a single value)."""
    return [min(float(p.detach().var()) if p.numel() > 1 else 0.0, 1.0) for p in params]


def fisher_information(grad: torch.Tensor) -> torch.Tensor:
    """Empirical Fisher information g², averaged over the first axis (a scalar for 1-D)."""
    return grad.detach().pow(2).mean(0)


def noise_masks(grads: list[torch.Tensor], phi: float) -> list[torch.Tensor]:
    """Boolean masks (broadcast to each gradient's shape): Fisher information at or above the
    (100 − φ)-th percentile over all tensors."""
    fims = [fisher_information(g) for g in grads]
    threshold = percentile(torch.cat([f.reshape(-1) for f in fims]), 100.0 - phi)
    return [(f >= threshold).expand_as(g) for f, g in zip(fims, grads)]


def prune_masks(grads: list[torch.Tensor], prune_base: float) -> list[torch.Tensor]:
    """Boolean keep-masks: |g| at or above the prune_base-th percentile of its own tensor."""
    return [g.abs() >= percentile(g.abs(), prune_base) for g in grads]


def outpost_perturb(grads: list[torch.Tensor], risks: list[float], params: OutpostParams,
                    generator: torch.Generator) -> list[torch.Tensor]:
    """Prune, then add noise of std risk·noise_base on the high-Fisher entries."""
    noisy = noise_masks(grads, params.phi)
    keep = prune_masks(grads, params.prune_base)
    out = []
    for g, risk, n_mask, k_mask in zip(grads, risks, noisy, keep):
        pruned = torch.where(k_mask, g, torch.zeros_like(g))
        out.append(pruned + gaussian_like(g, risk * params.noise_base, generator) * n_mask)
    return out


class Outpost(Defense):
    name = "outpost"
    params: OutpostParams

    def on_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        t = step + 1
        coin = float(torch.rand((), generator=self.generator))
        if coin >= perturb_probability(t, self.params.beta):
            return
        params = [p for p in model.parameters() if p.grad is not None]
        perturbed = outpost_perturb([p.grad for p in params], layer_risk(params), self.params, self.generator)
        for p, g in zip(params, perturbed):
            p.grad = g
