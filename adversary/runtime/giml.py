"""GIML in a run: the attack sink that meta-learns the server's generator from the updates it
taps, in the order they arrive, and hands each ``giml`` job the generator learned before it.

Wraps the inversion pool (any :class:`server.strategy.AttackSink`-shaped object with
``submit(observation, truth, params)``). Per tapped update: its jobs are queued with
``attack.giml.generator`` set to the last saved generator, then one meta-learning task runs on
it here, in the server's thread (:class:`adversary.priors.giml.MetaLearner`). When the first
update of a new round arrives, and at the end of the run, the generator is saved as
``giml/after_round_RRR.pt`` (a prior checkpoint: :func:`adversary.priors.checkpoint.load_prior`;
``after_round_000.pt`` is the generator it starts from) and every task is one line of
``giml/tasks.jsonl``.
"""
from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from adversary.attacks.gias import load_generator
from adversary.attacks.giml import GimlParams
from adversary.observation import GroundTruth, Observation
from adversary.priors.checkpoint import save_prior
from adversary.priors.giml import MetaLearner
from fedsim.domain import DataDomain
from fedsim.rundir import RunDirectory
from fedsim.seeding import derive_seed

GIML_DIR = "giml"
TASKS = f"{GIML_DIR}/tasks.jsonl"


class GimlSink:
    """The pool's sink with GIML's learning in front of it (see the module docstring)."""

    def __init__(self, pool: Any, params: GimlParams, domain: DataDomain, run_dir: RunDirectory,
                 device: torch.device, seed: int):
        self.pool = pool
        self.params = params
        self.run_dir = run_dir
        self.folder = run_dir.path / GIML_DIR
        self.folder.mkdir(exist_ok=True)
        start = load_generator(params, domain.shape, derive_seed(seed, "giml"))
        self.learner = MetaLearner(start, params.settings(), derive_seed(seed, "giml", "tasks"), device)
        self.config = {"latent_dim": start.latent_dim, "width": params.width}
        self.current = ""  # what the next jobs attack with: first the starting generator
        self.save(0)
        self.round: int | None = None  # the round of the updates learned since the last save

    def wants(self, server_round: int, client_id: int) -> bool:
        return self.pool.wants(server_round, client_id)

    def submit(self, observation: Observation, truth: GroundTruth) -> None:
        if self.round is not None and observation.server_round != self.round:
            self.save(self.round)
        self.round = observation.server_round
        self.pool.submit(observation, truth, {"giml": replace(self.params, generator=self.current)})
        task = self.learner.learn(observation)
        self.run_dir.append(TASKS, asdict(task))

    def save(self, after_round: int) -> Path:
        """The generator learned so far, as ``giml/after_round_RRR.pt``; the next jobs use it."""
        path = self.folder / f"after_round_{after_round:03d}.pt"
        generator = self.learner.generator.cpu()
        save_prior(path, generator, self.config,
                   {"learned_from": "observed updates (GIML)", "tasks": len(self.learner.tasks),
                    "after_round": after_round, "started_from": self.params.generator})
        self.learner.generator.to(self.learner.device)
        self.current = str(path)
        return path

    def close(self) -> None:
        if self.round is not None:
            self.save(self.round)
        self.pool.close()

    def abort(self) -> None:
        self.pool.abort()
