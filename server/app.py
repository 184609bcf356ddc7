"""The server's main loop: runs the curious FedAvg, evaluates the global model every round,
writes ``rounds.jsonl`` and waits for the planned attacks before it returns.

A run stops early, with the round written, when the global model diverges (a non-finite
weight or loss: :class:`RunDiverged`) or when every sampled client of a round failed and the
scenario does not expect that (:class:`RoundFailed`). Each failed client prints one line; its
full error goes to ``clients.log`` in the run directory.

The Flower ``ServerApp`` objects that call :func:`serve` belong to the wiring
(``fedsim.run``): one for ``fedsim run`` and one for ``flwr run .``.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp import Grid
from tqdm import tqdm

from adversary.observation import observe
from fedsim.data import DatasetSplits
from fedsim.evaluation import evaluate_model
from fedsim.models import initial_model, state_to_tensors
from fedsim.records import all_finite, load_upload
from fedsim.rundir import CLIENT_LOG, ROUNDS, RunDirectory
from fedsim.scenario import Scenario
from server.checkpoint import PENDING, Checkpoint, pending_uploads
from server.stops import RoundFailed, RunDiverged
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


def _divergence(state: dict[str, torch.Tensor], train_loss: float | None, test_loss: float | None) -> str | None:
    """What is not finite about a round's result, or None."""
    if not all_finite(state):
        return "non-finite global weights"
    if train_loss is not None and not math.isfinite(train_loss):
        return "non-finite training loss"
    if test_loss is not None and not math.isfinite(test_loss):
        return "non-finite test loss"
    return None


def serve(grid: Grid, setup: ServerSetup) -> None:
    scenario = setup.scenario
    splits = setup.splits
    model = initial_model(scenario, splits.domain.shape, splits.domain.num_classes)
    done = setup.resume.round if setup.resume else 0
    strategy = CuriousFedAvg(scenario, setup.scenario_text, splits.domain, setup.sink, first_round=done + 1,
                             pending_dir=setup.run_dir.path / PENDING)
    if setup.resume:
        model.load_state_dict(setup.resume.global_state)
        strategy.privacy.ledger.load_state_dict(setup.resume.privacy)
        requeue_pending(setup)
    bar = tqdm(total=scenario.federation.rounds, initial=done, desc="FL rounds", unit="round",
               disable=not setup.show_progress)

    def report_failures(server_round: int, trace) -> None:  # noqa: ANN001 - a RoundTrace
        for failure, detail in zip(trace.failures, trace.failure_details):
            tqdm.write(f"fedsim: warning: round {server_round}: client {failure['client']} failed: "
                       f"{failure['error']}", file=sys.stderr)
            setup.run_dir.log(CLIENT_LOG, f"--- round {server_round}, client {failure['client']}\n{detail}")

    def evaluate(flower_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if flower_round == 0:
            return None
        server_round = strategy.round_of(flower_round)
        trace = strategy.traces[server_round]
        report_failures(server_round, trace)
        state = arrays.to_torch_state_dict()
        accuracy = loss = None
        diverged = _divergence(state, trace.train_loss, None)
        if diverged is None:
            model.load_state_dict(state)
            accuracy, loss = evaluate_model(model, splits.test_x, splits.test_y, setup.device)
            diverged = _divergence({}, None, loss)
        setup.run_dir.append(ROUNDS, {
            "round": server_round, "test_accuracy": accuracy if diverged is None else None,
            "test_loss": loss if diverged is None else None, "train_loss": trace.train_loss,
            "clients": trace.clients, "failures": trace.failures, "diverged": diverged is not None,
            "epsilon_round": trace.epsilon_round, "epsilon": trace.epsilon,
            "seconds": round(time.monotonic() - trace.started, 3), "ended_at": round(time.time(), 3),
        })
        bar.set_postfix(acc="-" if accuracy is None else f"{accuracy:.3f}", failures=len(trace.failures))
        bar.update()
        if diverged is not None:
            raise RunDiverged(server_round, diverged)
        if trace.clients and len(trace.failures) == len(trace.clients) and not scenario.federation.failures_expected:
            raise RoundFailed(server_round, len(trace.failures))
        Checkpoint(server_round, state, strategy.privacy.ledger.state_dict()).save(setup.run_dir)
        pending_uploads(setup.run_dir, scenario.attack.attacks)  # drops the ones whose attacks are done
        return MetricRecord({"test-accuracy": accuracy, "test-loss": loss})

    try:
        strategy.start(grid, ArrayRecord(state_to_tensors(model)), num_rounds=scenario.federation.rounds - done,
                       timeout=3600.0, evaluate_fn=evaluate)
    finally:
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
