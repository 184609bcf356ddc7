"""Top-k sparsification of Δ: per state entry, keep the ceil(p/100 · n) entries of largest
magnitude and zero the rest (gradient compression as a defense, Zhu et al. NeurIPS'19,
Soteria's "GC" baseline, here on the update). Every floating entry is pruned on its own,
BatchNorm running statistics included; integer counters are untouched.

``noise_std`` > 0 adds N(0, noise_std²) to the kept entries after pruning (pruning + noise, the
combination Balunović et al. ICLR'22 attack with a masked objective); pruned entries stay exactly
zero. With the default 0.0 nothing is drawn and the upload is the plain top-k one."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from defenses.base import Defense
from defenses.tensors import is_floating


@dataclass(frozen=True)
class TopkParams:
    percent: float = field(default=10.0, metadata={"gt": 0.0, "max": 100.0, "doc": "p: percent of entries per layer kept (largest |Δ|)"})
    noise_std: float = field(default=0.0, metadata={"min": 0.0, "doc": "std of Gaussian noise added to the kept entries after pruning (0 = none)"})


def keep_count(numel: int, percent: float) -> int:
    return min(numel, math.ceil(numel * percent / 100.0 - 1e-9))


def topk_tensor(t: torch.Tensor, percent: float, noise_std: float = 0.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """``t`` with all but its ``percent`` % largest-magnitude entries zeroed; with ``noise_std`` > 0,
    N(0, noise_std²) (drawn from ``generator`` on the CPU) added to the kept entries."""
    k = keep_count(t.numel(), percent)
    flat = t.reshape(-1)
    if k >= t.numel():
        out, index = flat.clone() if noise_std > 0 else flat, None
    else:
        out = torch.zeros_like(flat)
        index = flat.abs().topk(k).indices
        out[index] = flat[index]
    if noise_std > 0:
        noise = (torch.randn(k, generator=generator, dtype=t.dtype) * noise_std).to(t.device)
        if index is None:
            out = out + noise
        else:
            out[index] = out[index] + noise
    return out.view_as(t)


class Topk(Defense):
    name = "topk"
    params: TopkParams

    def on_update(self, update: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        p = self.params
        return {k: topk_tensor(v, p.percent, p.noise_std, self.generator) if is_floating(v) else v
                for k, v in update.items()}
