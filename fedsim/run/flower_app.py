"""The ServerApp of the Flower App (``flwr run .``; ``pyproject.toml``'s
``[tool.flwr.app.components]``): the scenario comes from the app's run config
(``scenario``, optional ``out``); the ClientApp is ``clients.app:app``. The run directory ends
as ``fedsim run``'s does: ``summary.json`` and the report (:mod:`fedsim.run.ending`)."""
from __future__ import annotations

import time

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedsim.run.ending import federated_outcome, write_report
from fedsim.run.preparation import make_sink, prepare_run, validate_scenario
from fedsim.run.ray_cluster import start_ray
from server.app import serve

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Runs in Flower's ServerApp process, which has no Ray: the inversion workers get a local
    Ray of their own when the scenario plans attacks."""
    started = time.monotonic()
    path = str(context.run_config["scenario"])
    scenario = validate_scenario(path)
    setup = prepare_run(path, context.run_config.get("out") or None, scenario=scenario)
    try:
        with federated_outcome(setup, started):
            if scenario.attack.attacks:
                start_ray(None, scenario.attack.pool_size)
                setup.sink = make_sink(setup)
            serve(grid, setup)
    finally:
        html = write_report(setup.run_dir.path)
        if html is not None:
            print(f"Report: {html}")
