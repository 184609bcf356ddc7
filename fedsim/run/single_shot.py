"""Single-shot mode (``fedsim attack``): the breaching-style experiment. One client trains
once on the initial global model (round 1, exactly as in a full run with the same seed),
the server observes the update, every planned attack runs in this process, and the
leakage table is printed; ``summary.json`` says how it ended. No Flower, no Ray."""
from __future__ import annotations

import time
from pathlib import Path

from tqdm import tqdm

from adversary.observation import GroundTruth, Observation, observe
from adversary.runtime.execution import plan_jobs, run_job, store_result
from adversary.runtime.registry import resolve_attack_params
from adversary.scoring.metrics import LpipsScorer
from clients.training import run_client_round
from fedsim.config import ScenarioError
from fedsim.data import DatasetSplits, scenario_partitions
from fedsim.models import initial_model, state_to_tensors
from fedsim.run.ending import peak_memory_mb
from fedsim.run.preparation import prepare_run
from fedsim.scenario import Scenario
from server.app import ServerSetup


def observe_first_update(scenario: Scenario, splits: DatasetSplits, client: int) -> tuple[Observation, GroundTruth]:
    """Client ``client`` trains once from the initial global model (round 1, with the same
    seeds as a full run); returns what the server observes and the ground truth."""
    server_round = 1
    training = scenario.round_training(server_round)
    parts = scenario_partitions(scenario, splits)
    theta = state_to_tensors(initial_model(scenario, splits.domain.shape, splits.domain.num_classes))
    upload = run_client_round(scenario, splits, parts[client], client, server_round, theta, training.lr)
    return observe(scenario, splits.domain, training, server_round, client, theta, upload)


def attack_once(scenario_path: str | Path, out: str | Path | None = None,
                show_progress: bool = True) -> tuple[ServerSetup, list[dict]]:
    """Run the plan's attacks on one update; returns the setup and the leakage records."""
    setup = prepare_run(scenario_path, out, show_progress=show_progress)
    scenario, splits = setup.scenario, setup.splits
    plan = scenario.attack
    if not plan.attacks:
        raise ScenarioError(scenario.source, "attack.attacks", "is empty; name at least one attack to run")
    client = plan.clients[0] if plan.clients else 0
    observation, truth = observe_first_update(scenario, splits, client)

    params = resolve_attack_params(plan.attacks, plan.params, scenario.source)
    lpips = LpipsScorer(device=setup.device)
    records = []
    jobs = plan_jobs(scenario, params, observation, truth, 0)
    started, status = time.monotonic(), "failed"
    try:
        for job in jobs:
            bar = tqdm(desc=f"{job.attack} r1 c{client}", unit="it", disable=not show_progress)

            def progress(iteration: int, total: int, objective: float, bar: tqdm = bar) -> None:
                bar.total = total
                bar.n = iteration
                bar.set_postfix(objective=f"{objective:.4g}", refresh=True)

            outcome = run_job(job, setup.device, lpips, progress)
            bar.close()
            records.append(store_result(setup.run_dir, outcome))
        status = "completed"
    except (KeyboardInterrupt, SystemExit):
        status = "interrupted"
        raise
    finally:
        setup.run_dir.write_summary({
            "status": status, "attack_jobs": len(jobs), "jobs_recorded": len(records),
            "seconds": round(time.monotonic() - started, 3),
            "driver_peak_rss_mb": peak_memory_mb()})
    return setup, records
