"""GIML in a run: the attack sink that meta-learns the server's generator from the updates it
taps, in the order they arrive, and hands each ``giml`` job the generator learned before it.

Wraps the inversion pool (any :class:`server.strategy.AttackSink`-shaped object with
``submit(observation, truth, params)``). Per tapped update: its jobs are queued with
``attack.giml.generator`` set to the generator saved after the previous round, then one
meta-learning task runs on it here, in the server's thread
(:class:`adversary.priors.giml.MetaLearner`). After every task the generator is saved as
``giml/after_round_RRR.pt`` of the task's round (a prior checkpoint:
:func:`adversary.priors.checkpoint.load_prior`; ``after_round_000.pt`` is the generator it starts
from), so the file of a finished round holds what that round taught, and every task is one line
of ``giml/tasks.jsonl``.

A resumed run (``fedsim run --resume``, after the checkpoint of round D) continues from the file
of the last round ≤ D, forgets later files and task lines, and does not learn again from the
re-queued updates of rounds ≤ D: what it learns is what an uninterrupted run learns.
"""
from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from adversary.attacks.gias import load_generator
from adversary.attacks.giml import GimlParams
from adversary.observation import GroundTruth, Observation
from adversary.priors.checkpoint import load_prior, save_prior
from adversary.priors.giml import MetaLearner
from fedsim.domain import DataDomain
from fedsim.rundir import RunDirectory
from fedsim.seeding import derive_seed

GIML_DIR = "giml"
TASKS = f"{GIML_DIR}/tasks.jsonl"


class GimlSink:
    """The pool's sink with GIML's learning in front of it (see the module docstring).
    ``done_rounds``: the rounds a resumed run completed before (its checkpoint's round; 0 for a
    new run, or a run resumed before its first checkpoint). A run directory that holds saved
    generators is a resumed run."""

    def __init__(self, pool: Any, params: GimlParams, domain: DataDomain, run_dir: RunDirectory,
                 device: torch.device, seed: int, done_rounds: int = 0):
        self.pool = pool
        self.params = params
        self.run_dir = run_dir
        self.folder = run_dir.path / GIML_DIR
        self.folder.mkdir(exist_ok=True)
        self.done_rounds = done_rounds  # rounds whose updates were learned before
        saved = self.saved()
        if saved:
            for r in [r for r in saved if r > done_rounds]:
                saved.pop(r).unlink()
            run_dir.keep_rounds_through(done_rounds, TASKS, "server_round")
            start, header = load_prior(saved[max(saved)], domain.shape, params.generator_class)
            self.config = header.config
        else:
            start, self.config = load_generator(params, domain, derive_seed(seed, "giml"))
        self.learner = MetaLearner(start, params.settings(), derive_seed(seed, "giml", "tasks"), device)
        self.tasks = len(run_dir.read(TASKS))
        if not saved:
            self.save(0)

    def saved(self) -> dict[int, Path]:
        """round -> ``giml/after_round_RRR.pt``, for every file saved so far."""
        return {int(path.stem.rsplit("_", 1)[1]): path for path in self.folder.glob("after_round_*.pt")}

    def path(self, after_round: int) -> Path:
        return self.folder / f"after_round_{after_round:03d}.pt"

    def wants(self, server_round: int, client_id: int) -> bool:
        return self.pool.wants(server_round, client_id)

    def submit(self, observation: Observation, truth: GroundTruth) -> None:
        server_round = observation.server_round
        before = max(r for r in self.saved() if r < server_round)  # the generator its jobs attack with
        self.pool.submit(observation, truth, {"giml": replace(self.params, generator=str(self.path(before)))})
        if server_round <= self.done_rounds:
            return  # re-queued after a crash: its round was learned and saved before
        task = self.learner.learn(observation)
        self.tasks += 1
        self.save(server_round)
        self.run_dir.append(TASKS, asdict(task))

    def save(self, after_round: int) -> Path:
        """The generator learned so far, as ``giml/after_round_RRR.pt``."""
        path = self.path(after_round)
        generator = self.learner.generator.cpu()
        save_prior(path, generator, self.config,
                   {"learned_from": "observed updates (GIML)", "tasks": self.tasks,
                    "after_round": after_round, "started_from": self.params.generator})
        self.learner.generator.to(self.learner.device)
        return path

    def close(self) -> None:
        self.pool.close()

    def abort(self) -> None:
        self.pool.abort()
