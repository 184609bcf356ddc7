"""What an attack is: a run function of the :class:`Observation` alone, its parameter
dataclass, and the runtime settings it is called with.

A run function has the signature ``run(obs: Observation, params: P, ctx: AttackContext) ->
Reconstruction``. :class:`Attack` refuses any function whose annotations mention
:class:`GroundTruth` (attacks never see the ground truth).
"""
from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from adversary.observation import GroundTruth, Observation, Reconstruction


@dataclass
class AttackContext:
    """Runtime settings of one attack execution (not part of the threat model)."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    deadline: float | None = None  # time.monotonic() value after which to stop
    progress: Callable[[int, int, float], None] | None = None  # (iteration, total, objective)

    def report(self, iteration: int, total: int, objective: float) -> None:
        if self.progress is not None:
            self.progress(iteration, total, objective)


@dataclass(frozen=True)
class Attack:
    """One attack: its registry ``name``, its parameter dataclass and its run function."""

    name: str
    params_type: type
    run: Callable[[Observation, Any, AttackContext], Reconstruction]

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(self.run)
        if any(h is GroundTruth for h in hints.values()):
            raise TypeError(f"attack {self.name!r} may not take GroundTruth")
