"""``fedsim run``: start (or join) Ray, build the server and client apps, run the federation.

This is the only module that calls Flower's simulation entry point, so moving from the
deprecated ``run_simulation`` to ``flwr run`` is a one-place edit.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from clients.app import app as client_app
from fedsim.run.preparation import prepare_run, validate_scenario
from fedsim.run.ray_cluster import start_ray, stop_ray
from server.app import ServerSetup, serve


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
    """Validate, start Ray, prepare the run directory, run. Returns the setup (run_dir inside)."""
    scenario = validate_scenario(scenario_path)
    plan = scenario.attack
    start_ray(ray_address, plan.pool_size if plan.attacks else 0)
    try:
        setup = prepare_run(scenario_path, out, show_progress, scenario=scenario)
        setup.verbose = verbose
        run_federation(setup)
    finally:
        stop_ray()
    return setup
