"""What is public about the data: input shape, classes and the normalisation.

Images live in *normalised* space everywhere (``(x - mean) / std`` with x in [0, 1]);
``to_unit`` maps back to [0, 1] for metrics and image files.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DataDomain:
    shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int
    mean: tuple[float, ...]  # per channel, in [0, 1] units
    std: tuple[float, ...]
    class_names: tuple[str, ...] = ()

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(self.mean, dtype=like.dtype, device=like.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=like.dtype, device=like.device).view(-1, 1, 1)
        return mean, std

    def normalise(self, unit: torch.Tensor) -> torch.Tensor:
        """[0, 1] images (..., C, H, W) -> normalised space."""
        mean, std = self._stats(unit)
        return (unit - mean) / std

    def to_unit(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images (..., C, H, W) -> [0, 1] (clamped)."""
        mean, std = self._stats(x)
        return (x * std + mean).clamp(0.0, 1.0)

    def bounds(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Lower/upper limits of the valid box in normalised space, shape (C, 1, 1)."""
        mean, std = self._stats(like)
        return (0.0 - mean) / std, (1.0 - mean) / std
