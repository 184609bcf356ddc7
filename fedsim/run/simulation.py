"""``fedsim run``: check the input, start (or join) Ray, build the server and client apps, run
the federation, and end every way cleanly: ``summary.json`` says how the run ended (completed,
stopped with the reason, interrupted, crashed) and Ray is shut down.

This is the only module that calls Flower's simulation entry point, so moving from the
deprecated ``run_simulation`` to ``flwr run`` is a one-place edit.
"""
from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from clients.app import app as client_app
from fedsim.run.ending import federated_outcome
from fedsim.run.preparation import make_sink, prepare_resume, prepare_run, validate_scenario
from fedsim.run.ray_cluster import check_address, check_cluster, start_ray, stop_ray
from fedsim.rundir import FLOWER_LOG
from fedsim.scenario import Scenario
from server.app import ServerSetup, serve
from server.stops import RunStopped


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

    _route_flower_log(setup)
    backend_config = {"client_resources": {"num_cpus": fed.client_cpus, "num_gpus": 0.0}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=fed.num_clients,
                       backend_config=backend_config)


def _route_flower_log(setup: ServerSetup) -> None:
    """Flower's log (client tracebacks included) goes to ``flower.log`` in the run directory; the
    terminal shows it only with ``--verbose`` (less the two warnings every run triggers)."""
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.setLevel(logging.INFO)
    flwr_logger.propagate = False  # Flower has its own console handler; the root logger may have one too
    for handler in flwr_logger.handlers:
        if not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.INFO if setup.verbose else logging.CRITICAL + 1)
            handler.addFilter(_drop_expected_flower_warnings)
    for handler in [h for h in flwr_logger.handlers if isinstance(h, logging.FileHandler)]:
        flwr_logger.removeHandler(handler)  # an earlier run's file (several runs in one process)
        handler.close()
    flwr_logger.addHandler(logging.FileHandler(setup.run_dir.path / FLOWER_LOG, encoding="utf-8"))


def run_scenario(scenario_path: str | Path | None, out: str | Path | None = None, ray_address: str | None = None,
                 show_progress: bool = True, verbose: bool = False, scenario: Scenario | None = None,
                 resume: str | Path | None = None) -> ServerSetup:
    """Validate and check everything that can be checked before Ray starts (scenario, device,
    output folder, data, cluster address), start Ray, run; Ray is shut down however the run
    ends. A run stopped by the server raises :class:`server.stops.RunStopped` after its rounds are
    written; an interrupt propagates after the pool is abandoned. ``scenario``: one already
    validated (``scenario_path`` then only names it). ``resume``: continue that run directory
    after its last checkpoint instead (no scenario needed). Returns the setup."""
    started = time.monotonic()
    if resume is None:
        scenario = scenario or validate_scenario(scenario_path)
    if ray_address:
        check_address(ray_address)

    def start_cluster(planned: Scenario) -> None:
        start_ray(ray_address, planned.attack.pool_size if planned.attack.attacks else 0, verbose)
        check_cluster(planned)

    try:
        setup = (prepare_resume(resume, show_progress, before_create=start_cluster) if resume is not None else
                 prepare_run(scenario_path, out, show_progress, scenario=scenario, before_create=start_cluster))
    except BaseException:
        stop_ray()
        raise
    setup.verbose = verbose
    try:
        with federated_outcome(setup, started):
            setup.sink = make_sink(setup)
            run_federation(setup)
    except RunStopped as stop:
        stop.setup = setup  # the CLI prints what was done
        raise
    finally:
        stop_ray()
    return setup
