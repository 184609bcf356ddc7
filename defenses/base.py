"""The defense interface: a transform a client applies to what it uploads.

A defense may act at two places (DESIGN.md, round step 3):

- ``on_step(model, step, total_steps)``: inside the local loop, after ``backward()`` and
  before ``optimizer.step()``; it may rewrite ``p.grad`` (per-step perturbation, DP-SGD).
- ``on_update(update)``: on the final Δ = θ' − θ_t (client-level clipping + noise, pruning).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class Defense:
    """Identity defense; subclasses override the hooks they need."""

    name = "none"

    def __init__(self, params: object, generator: torch.Generator):
        self.params = params
        self.generator = generator

    def on_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        """Called with gradients in ``p.grad``; default leaves them unchanged."""

    def on_update(self, update: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Return the Δ to upload; default uploads it unchanged."""
        return update


@dataclass(frozen=True)
class NoParams:
    """The identity defense takes no parameters."""
