"""The threat model as types: what the honest-but-curious server observes, and the
ground truth that only the scorer sees.

An attack is a function of an :class:`Observation` alone. :class:`GroundTruth` is a
separate type that never appears in an attack's signature; ``adversary.runtime.registry``
checks this for every registered attack (and a test enforces it).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fedsim.domain import DataDomain
from fedsim.models import build_model
from fedsim.records import ClientUpload
from fedsim.scenario import DefenseSpec, ModelSpec, Scenario, TrainingSpec


@dataclass(frozen=True)
class Observation:
    """One client update as the server received it, plus what the server knows publicly.

    ``global_state`` and ``update`` are full state dicts (parameters *and* buffers, CPU
    tensors, same keys); ``update`` is Δ = θ' − θ_t as received (after the defense).
    ``training`` is the round's public local-training config, ``lr`` already set to this
    round's learning rate. ``num_examples`` is what the client reported (None if not).
    ``defense`` is set only when the scenario says the attacker knows it; ``labels`` only
    when the scenario grants true labels (ablation). ``prior`` (b', C, H, W), normalised: what
    the server itself reconstructed of this client in an earlier round (``prior_round``), if
    anything (SPEAR's ``guide = "previous"``; filled by ``adversary.runtime.memory``).
    """

    server_round: int
    client_id: int
    model: ModelSpec
    domain: DataDomain
    global_state: dict[str, torch.Tensor]
    update: dict[str, torch.Tensor]
    training: TrainingSpec
    num_examples: int | None
    num_steps: int
    defense: DefenseSpec | None = None
    labels: torch.Tensor | None = None
    prior: torch.Tensor | None = None
    prior_round: int | None = None

    @property
    def num_distinct_examples(self) -> int:
        """Distinct local examples the update was computed from (what attacks reconstruct)."""
        touched = self.num_steps * self.training.batch_size
        return touched if self.num_examples is None else min(self.num_examples, touched)


@dataclass(frozen=True)
class GroundTruth:
    """Evaluation-only: the client's distinct training examples and the batch order.

    ``inputs`` (N, C, H, W) normalised, ``labels`` (N,) int64, ``batches`` one tuple of
    indices into ``inputs`` per local optimizer step, in order.
    """

    inputs: torch.Tensor
    labels: torch.Tensor
    batches: tuple[tuple[int, ...], ...]


@dataclass
class Reconstruction:
    """What an attack returns: ``inputs`` (M, C, H, W) in normalised space, ``labels`` (M,)
    or None, the iterations spent, the final objective, and attack-specific extras
    (JSON-serialisable scalars, e.g. SPEAR's estimated batch size)."""

    inputs: torch.Tensor
    labels: torch.Tensor | None
    iterations: int
    objective: float
    extras: dict


def observe(scenario: Scenario, domain: DataDomain, training: TrainingSpec, server_round: int, client_id: int,
            global_state: dict[str, torch.Tensor], upload: ClientUpload) -> tuple[Observation, GroundTruth]:
    """One client's upload as (what the server is entitled to see, the evaluation-only ground
    truth) under ``scenario``'s threat model: the defense only if ``attack.knows_defense``, true
    labels only if ``attack.grant_labels``. ``training`` is the round's public config
    (:meth:`fedsim.scenario.Scenario.round_training`), ``global_state`` θ_t."""
    plan = scenario.attack
    truth = GroundTruth(upload.inputs, upload.labels, tuple(upload.batches))
    observation = Observation(
        server_round=server_round,
        client_id=client_id,
        model=scenario.model,
        domain=domain,
        global_state=global_state,
        update=upload.update,
        training=training,
        num_examples=upload.num_examples,
        num_steps=upload.num_steps,
        defense=scenario.defense if plan.knows_defense else None,
        labels=truth.labels if plan.grant_labels else None,
    )
    return observation, truth


def global_model(obs: Observation) -> nn.Module:
    """The client's model as the server sent it: the public architecture holding θ_t
    (parameters and buffers), float32 on the CPU."""
    model = build_model(obs.model, obs.domain.shape, obs.domain.num_classes)
    model.load_state_dict(obs.global_state)
    return model
