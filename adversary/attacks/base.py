"""What an attack is: a run function of the :class:`Observation` alone, its parameter
dataclass, and the runtime settings it is called with.

A run function has the signature ``run(obs: Observation, params: P, ctx: AttackContext) ->
Reconstruction``. An attack that can attack several updates in one launch also has
``run_many(observations, params, contexts) -> reconstructions`` (one context per observation) and
``batch_key(obs, params)``: observations with equal non-None keys may go to one ``run_many``.
An attack that can use the server's earlier reconstruction of the client
(``Observation.prior``) says so with ``wants_prior(params)``; the runtime then runs its job after
every earlier-round job of that client and fills ``prior``.
:class:`Attack` refuses any function whose annotations mention :class:`GroundTruth` (attacks never
see the ground truth).
"""
from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

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
    """One attack: its registry ``name``, its parameter dataclass, its run function and, when it
    batches updates, its ``run_many`` and ``batch_key``; ``wants_prior(params)`` when it can use
    ``Observation.prior``."""

    name: str
    params_type: type
    run: Callable[[Observation, Any, AttackContext], Reconstruction]
    run_many: Callable[[list[Observation], Any, list[AttackContext]], list[Reconstruction]] | None = None
    batch_key: Callable[[Observation, Any], Hashable | None] | None = None
    wants_prior: Callable[[Any], bool] | None = None

    def __post_init__(self) -> None:
        for fn in (self.run, self.run_many):
            hints = typing.get_type_hints(fn) if fn is not None else {}
            if any(h is GroundTruth for h in hints.values()):
                raise TypeError(f"attack {self.name!r} may not take GroundTruth")

    def key(self, obs: Observation, params: Any) -> Hashable | None:
        """The batching key of ``obs`` (None: it runs alone)."""
        return None if self.batch_key is None else self.batch_key(obs, params)

    def needs_prior(self, params: Any) -> bool:
        """Whether a job with ``params`` uses the server's earlier reconstruction of its client."""
        return self.wants_prior is not None and bool(self.wants_prior(params))
