"""Small tensor helpers the defenses share: which Δ entries are floating, global L2 norm,
clipping, and noise drawn from the client's generator (a CPU ``torch.Generator``; the noise
is drawn on the CPU and moved to the tensor's device, so runs are reproducible per seed)."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch


def is_floating(t: torch.Tensor) -> bool:
    """Entries a numeric defense may change: parameters and BN running statistics, not the
    integer ``num_batches_tracked`` counters."""
    return torch.is_floating_point(t)


def global_norm(tensors: dict[str, torch.Tensor]) -> float:
    """L2 norm over every floating entry, all flattened together."""
    total = sum(float(t.double().pow(2).sum()) for t in tensors.values() if is_floating(t))
    return total ** 0.5


def clip_to_norm(tensors: dict[str, torch.Tensor], clip_norm: float) -> dict[str, torch.Tensor]:
    """Scale every floating entry by min(1, C / ‖all floating entries‖); integers untouched."""
    norm = global_norm(tensors)
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {k: v * scale if is_floating(v) else v for k, v in tensors.items()}


def gaussian_like(t: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    return (torch.randn(t.shape, generator=generator, dtype=t.dtype) * std).to(t.device)


def laplace_like(t: torch.Tensor, scale: float, generator: torch.Generator) -> torch.Tensor:
    """Laplace(0, b) by inverse CDF from one uniform draw per entry."""
    u = torch.rand(t.shape, generator=generator, dtype=torch.float64) - 0.5
    u = u.clamp(-0.5 + 1e-12, 0.5 - 1e-12)
    noise = -scale * torch.sign(u) * torch.log1p(-2.0 * u.abs())
    return noise.to(dtype=t.dtype, device=t.device)


def with_noise(tensors: dict[str, torch.Tensor], draw: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every floating entry plus ``draw(entry)`` (noise shaped like it); integers untouched."""
    return {k: v + draw(v) if is_floating(v) else v for k, v in tensors.items()}


def percentile(values: torch.Tensor, q: float) -> float:
    """numpy's ``percentile`` (linear interpolation), the rule the reference codes use."""
    return float(np.percentile(values.detach().double().cpu().numpy().ravel(), q))
