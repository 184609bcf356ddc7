"""The defense interface: a transform a client applies to what it uploads.

A defense may act at three places in the one local loop (``clients.training.train_locally``,
DESIGN.md round step 3), in this order per optimizer step:

- ``compute_gradients(model, inputs, labels) -> loss``: the step's forward and backward pass;
  it leaves the step's gradients in ``p.grad`` and returns the batch-mean loss. The default is
  the plain ``cross_entropy(model(inputs), labels).backward()``; defenses that need the step's
  inputs or per-example gradients (DP-SGD, Soteria) override it.
- ``on_step(model, step, total_steps)``: after the gradients exist and before
  ``optimizer.step()``; it may rewrite ``p.grad`` (per-step perturbation, Outpost).
  ``step`` is 0-based. Whatever is in ``p.grad`` then goes through the client's real optimizer
  (SGD with momentum / weight decay / nesterov).
- ``on_update(update)``: on the final Δ = θ' − θ_t, every state entry (parameters and
  BatchNorm buffers, including the integer ``num_batches_tracked``); client-level clipping
  and noise, pruning, quantisation.

``acts_on_server`` marks a defense whose mechanism the server applies (central DP): the
client side is the identity, and the server calls, after its tap has seen the raw updates,

- ``on_server_update(update)`` on each client's Δ before aggregation (central DP: clipping),
- ``on_aggregate(update, num_sampled)`` on the aggregated Δ (central DP: noise).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class Defense:
    """Identity defense; subclasses override the hooks they need."""

    name = "none"
    acts_on_server = False

    def __init__(self, params: object, generator: torch.Generator):
        self.params = params
        self.generator = generator

    def compute_gradients(self, model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Forward + backward of the batch-mean cross-entropy; gradients land in ``p.grad``."""
        loss = F.cross_entropy(model(inputs), labels)
        loss.backward()
        return loss

    def on_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        """Called with gradients in ``p.grad``; default leaves them unchanged."""

    def on_update(self, update: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Return the Δ to upload; default uploads it unchanged."""
        return update

    def on_server_update(self, update: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Server side, per received Δ, before aggregation (``acts_on_server`` only)."""
        return update

    def on_aggregate(self, update: dict[str, torch.Tensor], num_sampled: int) -> dict[str, torch.Tensor]:
        """Server side, on the aggregated Δ of ``num_sampled`` sampled clients."""
        return update


@dataclass(frozen=True)
class NoParams:
    """The identity defense takes no parameters."""
