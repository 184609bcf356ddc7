"""k-bit stochastic quantisation of Δ (QSGD-style unbiased rounding, Alistarh et al.
NeurIPS'17, on a per-tensor min-max grid): each floating entry is mapped onto 2^k evenly spaced
levels between the tensor's minimum and maximum, rounding up with probability equal to the
fractional position, so E[q(x)] = x. A constant tensor is left as it is; integer counters are
untouched."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from defenses.base import Defense
from defenses.tensors import is_floating


@dataclass(frozen=True)
class QuantizeParams:
    bits: int = field(default=8, metadata={"min": 1, "max": 16, "doc": "k: 2^k levels per tensor"})


def stochastic_quantize(t: torch.Tensor, bits: int, generator: torch.Generator) -> torch.Tensor:
    lo, hi = t.min(), t.max()
    if not bool(hi > lo):
        return t
    step = (hi - lo).double() / (2 ** bits - 1)
    position = (t.double() - lo) / step
    floor = position.floor()
    up = torch.rand(t.shape, generator=generator, dtype=torch.float64).to(t.device) < (position - floor)
    level = (floor + up).clamp(0, 2 ** bits - 1)
    return (lo + level * step).to(t.dtype)


class Quantize(Defense):
    name = "quantize"
    params: QuantizeParams

    def on_update(self, update: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: stochastic_quantize(v, self.params.bits, self.generator) if is_floating(v) else v
                for k, v in update.items()}
