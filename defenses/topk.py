"""Top-k sparsification of Δ: per state entry, keep the ceil(p/100 · n) entries of largest
magnitude and zero the rest (gradient compression as a defense, Zhu et al. NeurIPS'19,
Soteria's "GC" baseline, here on the update). Every floating entry is pruned on its own,
BatchNorm running statistics included; integer counters are untouched."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from defenses.base import Defense
from defenses.tensors import is_floating


@dataclass(frozen=True)
class TopkParams:
    percent: float = field(default=10.0, metadata={"gt": 0.0, "max": 100.0, "doc": "p: percent of entries per layer kept (largest |Δ|)"})


def keep_count(numel: int, percent: float) -> int:
    return min(numel, math.ceil(numel * percent / 100.0 - 1e-9))


def topk_tensor(t: torch.Tensor, percent: float) -> torch.Tensor:
    k = keep_count(t.numel(), percent)
    if k >= t.numel():
        return t
    flat = t.reshape(-1)
    out = torch.zeros_like(flat)
    index = flat.abs().topk(k).indices
    out[index] = flat[index]
    return out.view_as(t)


class Topk(Defense):
    name = "topk"
    params: TopkParams

    def on_update(self, update: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: topk_tensor(v, self.params.percent) if is_floating(v) else v for k, v in update.items()}
