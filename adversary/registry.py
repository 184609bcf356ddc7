"""Registry of attacks: name -> (parameter dataclass, run function).

Every attack module registers itself with :func:`register_attack`. A run function has
the signature ``run(obs: Observation, params: P, ctx: AttackContext) -> Reconstruction``;
registration refuses any function whose annotations mention :class:`GroundTruth`
(attacks never see the ground truth).
"""
from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from adversary.observation import GroundTruth, Observation, Reconstruction
from fedsim.config import ScenarioError, build_dataclass


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
class AttackEntry:
    name: str
    params_type: type
    run: Callable[[Observation, Any, AttackContext], Reconstruction]


ATTACKS: dict[str, AttackEntry] = {}


def register_attack(name: str, params_type: type) -> Callable:
    """Decorator: register ``run`` under ``name`` with its parameter dataclass."""

    def wrap(run: Callable) -> Callable:
        hints = typing.get_type_hints(run)
        if any(h is GroundTruth for h in hints.values()):
            raise TypeError(f"attack {name!r} may not take GroundTruth")
        ATTACKS[name] = AttackEntry(name, params_type, run)
        return run

    return wrap


def available_attacks() -> tuple[str, ...]:
    import adversary.attacks  # noqa: F401  (populates ATTACKS)

    return tuple(sorted(ATTACKS))


def get_attack(name: str) -> AttackEntry:
    available_attacks()
    return ATTACKS[name]


def resolve_attack_params(names: tuple[str, ...], tables: dict, source: str) -> dict[str, Any]:
    """Validate ``[attack.<name>]`` tables; returns name -> params dataclass for each planned attack."""
    allowed = available_attacks()
    for name in names:
        if name not in allowed:
            raise ScenarioError(source, "attack.attacks", f"unknown attack {name!r}; allowed: {', '.join(allowed)}")
    for name in tables:
        if name not in allowed:
            raise ScenarioError(source, f"attack.{name}", f"unknown attack table; allowed: {', '.join(allowed)}")
    return {name: build_dataclass(ATTACKS[name].params_type, tables.get(name, {}), source, f"attack.{name}")
            for name in names}
