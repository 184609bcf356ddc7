"""The server's main loop: runs the curious FedAvg, evaluates the global model every round,
writes ``rounds.jsonl`` and waits for the planned attacks before it returns.

The Flower ``ServerApp`` objects that call :func:`serve` belong to the wiring
(``fedsim.run``): one for ``fedsim run`` and one for ``flwr run .``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp import Grid
from tqdm import tqdm

from fedsim.data import DatasetSplits
from fedsim.evaluation import evaluate_model
from fedsim.models import initial_model, state_to_tensors
from fedsim.rundir import ROUNDS, RunDirectory
from fedsim.scenario import Scenario
from server.strategy import AttackSink, CuriousFedAvg


@dataclass
class ServerSetup:
    """Everything the server needs for one run (prepared by the wiring, ``fedsim.run``)."""

    scenario: Scenario
    scenario_text: str  # resolved scenario as TOML, sent to clients each round
    run_dir: RunDirectory
    sink: AttackSink
    device: torch.device
    splits: DatasetSplits
    show_progress: bool = True
    verbose: bool = False  # Flower/Ray INFO logs


def serve(grid: Grid, setup: ServerSetup) -> None:
    scenario = setup.scenario
    splits = setup.splits
    model = initial_model(scenario, splits.domain.shape, splits.domain.num_classes)
    strategy = CuriousFedAvg(scenario, setup.scenario_text, splits.domain, setup.sink)
    bar = tqdm(total=scenario.federation.rounds, desc="FL rounds", unit="round", disable=not setup.show_progress)

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None
        model.load_state_dict(arrays.to_torch_state_dict())
        accuracy, loss = evaluate_model(model, splits.test_x, splits.test_y, setup.device)
        trace = strategy.traces[server_round]
        setup.run_dir.append(ROUNDS, {
            "round": server_round, "test_accuracy": accuracy, "test_loss": loss,
            "train_loss": trace.train_loss, "clients": trace.clients, "failures": trace.failures,
            "seconds": round(time.monotonic() - trace.started, 3),
        })
        bar.set_postfix(acc=f"{accuracy:.3f}", failures=len(trace.failures))
        bar.update()
        return MetricRecord({"test-accuracy": accuracy, "test-loss": loss})

    try:
        strategy.start(grid, ArrayRecord(state_to_tensors(model)), num_rounds=scenario.federation.rounds,
                       timeout=3600.0, evaluate_fn=evaluate)
    finally:
        bar.close()
        close = getattr(setup.sink, "close", None)
        if close is not None:
            close()
