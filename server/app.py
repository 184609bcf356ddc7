"""The server's main loop: runs the curious FedAvg (continuing after a checkpoint when the run
is resumed), closes every round (:mod:`server.rounds`: evaluation, ``rounds.jsonl``, checkpoint,
the reasons a run stops) and waits for the planned attacks before it returns.

The Flower ``ServerApp`` objects that call :func:`serve` belong to the wiring
(``fedsim.run``): one for ``fedsim run`` and one for ``flwr run .``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord
from flwr.serverapp import Grid
from tqdm import tqdm

from adversary.observation import observe
from fedsim.data import DatasetSplits
from fedsim.models import initial_model, state_to_tensors
from fedsim.records import load_upload
from fedsim.rundir import RunDirectory
from fedsim.scenario import Scenario
from server.checkpoint import PENDING, Checkpoint, pending_uploads
from server.rounds import RoundCloser
from server.strategy import AttackSink, CuriousFedAvg


@dataclass
class ServerSetup:
    """Everything the server needs for one run (prepared by the wiring, ``fedsim.run``)."""

    scenario: Scenario
    scenario_text: str  # resolved scenario as TOML, sent to clients each round
    run_dir: RunDirectory
    sink: AttackSink | None  # None: no attack planned, nothing is tapped
    device: torch.device
    splits: DatasetSplits
    show_progress: bool = True
    verbose: bool = False  # Flower/Ray INFO logs
    resume: Checkpoint | None = None  # continue after this checkpoint's round


#: seconds between polls for client replies in Flower's in-memory grid (Flower's default, 0.1 s,
#: rounds every round up to the next tenth of a second: 10-15 % of a short simulated round)
REPLY_POLL_S = 0.01


def serve(grid: Grid, setup: ServerSetup) -> None:
    if hasattr(grid, "pull_interval"):  # the simulation's InMemoryGrid (a deployed grid has none)
        grid.pull_interval = REPLY_POLL_S
    scenario = setup.scenario
    splits = setup.splits
    model = initial_model(scenario, splits.domain.shape, splits.domain.num_classes)
    done = setup.resume.round if setup.resume else 0
    strategy = CuriousFedAvg(scenario, setup.scenario_text, splits.domain, setup.sink, first_round=done + 1,
                             pending_dir=setup.run_dir.path / PENDING)
    if setup.resume:
        model.load_state_dict(setup.resume.global_state)
        strategy.privacy.load_state_dict(setup.resume.privacy)
        requeue_pending(setup)
    bar = tqdm(total=scenario.federation.rounds, initial=done, desc="FL rounds", unit="round",
               disable=not setup.show_progress)
    closer = RoundCloser(setup, model, strategy, bar)

    try:
        strategy.start(grid, ArrayRecord(state_to_tensors(model)), num_rounds=scenario.federation.rounds - done,
                       timeout=3600.0, evaluate_fn=closer.close)
        closer.finish()
    finally:
        closer.shutdown()
        bar.close()
        if setup.sink is not None:
            setup.sink.close()
    if not pending_uploads(setup.run_dir, scenario.attack.attacks) and (setup.run_dir.path / PENDING).exists():
        (setup.run_dir.path / PENDING).rmdir()  # every tapped update's attacks are recorded


def requeue_pending(setup: ServerSetup) -> None:
    """Queue again the attack jobs of tapped updates whose records a crash left missing (the
    sink skips the jobs already recorded)."""
    if setup.sink is None:
        return
    for path in pending_uploads(setup.run_dir, setup.scenario.attack.attacks):
        server_round, client, theta, upload = load_upload(path)
        setup.sink.submit(*observe(setup.scenario, setup.splits.domain, setup.scenario.round_training(server_round),
                                   server_round, client, theta, upload))
