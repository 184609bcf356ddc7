"""Real local training: epochs x mini-batches of SGD with momentum / weight decay /
nesterov, with the defense hooked in at the step and on the final update."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from defenses.base import Defense
from fedsim.schedule import local_batches
from fedsim.scenario import TrainingSpec


@dataclass
class LocalResult:
    """``update``: uploaded Δ (after the defense) for every state entry; ``batches``: the
    example indices of each optimizer step, in order; ``mean_loss``: over steps."""

    update: dict[str, torch.Tensor]
    batches: list[tuple[int, ...]]
    mean_loss: float


def train_locally(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, training: TrainingSpec,
                  lr: float, generator: torch.Generator, defense: Defense) -> LocalResult:
    """Train ``model`` in place on ``inputs`` (N, C, H, W) / ``labels`` (N,) and return Δ.

    Batches are shuffled per epoch with ``generator`` when ``training.shuffle``.
    """
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    batches = local_batches(len(inputs), training.batch_size, training.epochs, training.max_steps,
                            generator if training.shuffle else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=training.momentum,
                                weight_decay=training.weight_decay, nesterov=training.nesterov)
    model.train()
    losses = []
    for step, idx in enumerate(batches):
        index = torch.tensor(idx)
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(inputs[index]), labels[index])
        loss.backward()
        defense.on_step(model, step, len(batches))
        optimizer.step()
        losses.append(loss.item())
    raw = {k: v.detach() - before[k] for k, v in model.state_dict().items()}
    return LocalResult(defense.on_update(raw), batches, sum(losses) / max(len(losses), 1))
