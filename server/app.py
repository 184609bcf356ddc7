"""The Flower ServerApp: runs the curious FedAvg, evaluates the global model every round,
writes ``rounds.jsonl`` and waits for the planned attacks before it returns."""
from __future__ import annotations

import time

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from tqdm import tqdm

from fedsim.evaluation import evaluate_model
from fedsim.models import build_model, state_to_tensors
from fedsim.rundir import ROUNDS
from fedsim.scenario import Scenario
from fedsim.seeding import derive_seed
from server.setup import ServerSetup, prepare_server_setup
from server.strategy import CuriousFedAvg


def initial_model(scenario: Scenario, shape: tuple[int, int, int], num_classes: int) -> torch.nn.Module:
    torch.manual_seed(derive_seed(scenario.seed, "init"))
    return build_model(scenario.model, shape, num_classes)


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


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run .``: the scenario comes from the app's run config."""
    setup = prepare_server_setup(str(context.run_config["scenario"]), context.run_config.get("out") or None)
    serve(grid, setup)
