"""Shared test helpers (imported by the test modules; not a test file)."""
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from adversary.observation import GroundTruth, Observation
from fedsim.domain import DataDomain
from fedsim.models import build_model
from fedsim.scenario import ModelSpec, TrainingSpec
from fedsim.schedule import local_batches


def client_update(spec: ModelSpec, domain: DataDomain, x: torch.Tensor, y: torch.Tensor, training: TrainingSpec,
                  seed: int) -> Observation:
    """What the server observes from a client training an untrained model (plain torch loop, unshuffled batches)."""
    torch.manual_seed(seed)
    model = build_model(spec, domain.shape, domain.num_classes)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = local_batches(len(x), training.batch_size, training.epochs, training.max_steps)
    opt = torch.optim.SGD(model.parameters(), lr=training.lr, momentum=training.momentum,
                          weight_decay=training.weight_decay, nesterov=training.nesterov)
    model.train()
    for idx in batches:
        opt.zero_grad()
        F.cross_entropy(model(x[list(idx)]), y[list(idx)]).backward()
        opt.step()
    update = {k: v.detach() - before[k] for k, v in model.state_dict().items()}
    return Observation(1, 0, spec, domain, before, update, training, len(x), len(batches))


@dataclass
class RecordingSink:
    """An attack sink that keeps every tapped (observation, ground truth) pair (tests only)."""

    taps: list[tuple[Observation, GroundTruth]] = field(default_factory=list)

    def wants(self, server_round: int, client_id: int) -> bool:
        return True

    def submit(self, observation: Observation, truth: GroundTruth) -> None:
        self.taps.append((observation, truth))

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass
