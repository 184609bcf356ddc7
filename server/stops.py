"""Why a run stops before its last round: each a one-line message and the command's exit status.
Raised in the server (its thread in a simulation), re-raised by Flower in the main thread; the
wiring prints the tables of what was done and the message."""
from __future__ import annotations

from fedsim.rundir import CLIENT_LOG
from fedsim.scenario import Scenario


class RunStopped(Exception):
    """The run stopped before its last round; ``exit_status`` is the command's."""

    exit_status = 1


class RunDiverged(RunStopped):
    exit_status = 3

    def __init__(self, server_round: int, what: str):
        super().__init__(f"round {server_round} diverged ({what}); the run stops here. Lower training.lr, "
                         "or check the defense's noise scale")


class RoundFailed(RunStopped):
    exit_status = 4

    def __init__(self, server_round: int, failures: int):
        super().__init__(f"round {server_round}: all {failures} sampled clients failed (first errors above, all in "
                         f"{CLIENT_LOG}); the run stops here. Set federation.failures_expected = true "
                         "to carry on through such rounds")


class TooFewNodes(RunStopped):
    """The federation has fewer nodes than the scenario has clients (one node per client)."""

    exit_status = 2

    def __init__(self, scenario: Scenario, nodes: int):
        wanted = scenario.federation.num_clients
        super().__init__(f"{scenario.source}: federation.num_clients = {wanted}, but the federation has {nodes} "
                         f"SuperNodes (one per client); for Flower's local simulation run 'flwr federation "
                         f"simulation-config --num-supernodes {wanted}', or lower federation.num_clients")
