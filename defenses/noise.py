"""Additive noise on Δ without clipping or accounting (the "noisy gradients" baseline of Zhu
et al. NeurIPS'19 and Balunović et al. ICLR'22, here on the update): ``gaussian`` adds
N(0, std²), ``laplace`` adds Laplace(0, scale), to every floating entry (parameters and BN
running statistics; integer counters untouched). No formal guarantee: use ``dp_local`` for
one."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from defenses.base import Defense
from defenses.tensors import gaussian_like, laplace_like, with_noise


@dataclass(frozen=True)
class GaussianParams:
    std: float = field(default=0.01, metadata={"min": 0.0, "doc": "standard deviation of the noise on each entry of Δ"})


@dataclass(frozen=True)
class LaplaceParams:
    scale: float = field(default=0.01, metadata={"min": 0.0, "doc": "Laplace scale b on each entry of Δ (std = b·√2)"})


class GaussianNoise(Defense):
    name = "gaussian"
    params: GaussianParams

    def on_update(self, update: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return with_noise(update, lambda v: gaussian_like(v, self.params.std, self.generator))


class LaplaceNoise(Defense):
    name = "laplace"
    params: LaplaceParams

    def on_update(self, update: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return with_noise(update, lambda v: laplace_like(v, self.params.scale, self.generator))
