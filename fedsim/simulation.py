"""Wiring: start (or join) Ray, build the server and client apps, run the federation.

This is the only module that calls Flower's simulation entry point, so moving from the
deprecated ``run_simulation`` to ``flwr run`` is a one-place edit.
"""
from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

import ray  # noqa: E402
from flwr.app import Context  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402

from adversary.runtime.workers import INVERSION_SLOT  # noqa: E402
from clients.app import app as client_app  # noqa: E402
from server.app import serve  # noqa: E402
from server.setup import ServerSetup, prepare_server_setup  # noqa: E402


def start_ray(ray_address: str | None, inversion_workers: int) -> None:
    """Join the cluster at ``ray_address`` or start a local Ray with one CPU per core for
    the client actors plus ``inversion_workers`` inversion slots (see adversary.runtime.workers)."""
    if ray.is_initialized():
        return
    pythonpath = os.pathsep.join(sys.path)
    runtime_env = {"env_vars": {"PYTHONPATH": pythonpath, "FLWR_TELEMETRY_ENABLED": "0",
                                "RAY_USAGE_STATS_ENABLED": "0"}}
    if ray_address:
        ray.init(address=ray_address, runtime_env=runtime_env, logging_level=logging.WARNING)
    else:
        ray.init(num_cpus=os.cpu_count() or 1, resources={INVERSION_SLOT: inversion_workers},
                 include_dashboard=False, runtime_env=runtime_env, logging_level=logging.WARNING)


def _drop_expected_flower_warnings(record: logging.LogRecord) -> bool:
    """Hide the two warnings every run triggers on purpose (deprecated run_simulation;
    fraction_evaluate = 0 because the server evaluates centrally)."""
    message = record.getMessage()
    return "DEPRECATED FEATURE" not in message and "fraction_evaluate" not in message


def run_federation(setup: ServerSetup) -> None:
    """Run all rounds of ``setup.scenario`` (blocks until the attacks have finished too)."""
    fed = setup.scenario.federation
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        serve(grid, setup)

    from flwr.simulation import run_simulation

    if not setup.verbose:
        flwr_logger = logging.getLogger("flwr")
        flwr_logger.setLevel(logging.WARNING)
        flwr_logger.addFilter(_drop_expected_flower_warnings)
    backend_config = {"client_resources": {"num_cpus": fed.client_cpus, "num_gpus": 0.0}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=fed.num_clients,
                       backend_config=backend_config)


def run_scenario(scenario_path: str | Path, out: str | Path | None = None, ray_address: str | None = None,
                 show_progress: bool = True, verbose: bool = False) -> ServerSetup:
    """Validate, prepare the run directory, run. Returns the setup (run_dir inside)."""
    from server.setup import validate_scenario

    scenario = validate_scenario(scenario_path)
    plan = scenario.attack
    start_ray(ray_address, plan.pool_size if plan.attacks else 0)
    setup = prepare_server_setup(scenario_path, out, ray_address, show_progress, scenario=scenario)
    setup.verbose = verbose
    try:
        run_federation(setup)
    finally:
        if ray.is_initialized():
            ray.shutdown()
    return setup
