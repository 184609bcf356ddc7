"""Real local training: epochs x mini-batches of SGD with momentum / weight decay /
nesterov, with the defense hooked in at the step and on the final update."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from defenses.base import Defense
from defenses.registry import build_defense
from fedsim.data import DatasetSplits
from fedsim.models import build_model
from fedsim.records import ClientUpload
from fedsim.scenario import Scenario, TrainingSpec
from fedsim.schedule import distinct_examples, local_batches
from fedsim.seeding import generator


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

    Batches are shuffled per epoch with ``generator`` when ``training.shuffle``. Each step:
    ``defense.compute_gradients`` (forward + backward; the plain cross-entropy by default),
    ``defense.on_step`` (may rewrite ``p.grad``), ``optimizer.step()``; the final Δ goes
    through ``defense.on_update``.
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
        loss = defense.compute_gradients(model, inputs[index], labels[index])
        defense.on_step(model, step, len(batches))
        optimizer.step()
        losses.append(loss.item())
    raw = {k: v.detach() - before[k] for k, v in model.state_dict().items()}
    return LocalResult(defense.on_update(raw), batches, sum(losses) / max(len(losses), 1))


def run_client_round(scenario: Scenario, splits: DatasetSplits, index: torch.Tensor, client_id: int,
                     server_round: int, global_state: dict[str, torch.Tensor], lr: float) -> ClientUpload:
    """Train client ``client_id`` (local data ``splits.train_*[index]``) from ``global_state``
    with the round's seeds and defense, as the ClientApp does."""
    inputs, labels = splits.train_x[index], splits.train_y[index]
    model = build_model(scenario.model, splits.domain.shape, splits.domain.num_classes)
    model.load_state_dict(global_state)
    rng = generator(scenario.seed, "client", server_round, client_id)
    result = train_locally(model, inputs, labels, scenario.training, lr, rng,
                           build_defense(scenario.defense, rng, scenario.source))
    used, batches = distinct_examples(result.batches)
    return ClientUpload(result.update, len(index), len(batches), result.mean_loss, inputs[used], labels[used], batches)
