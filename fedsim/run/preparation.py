"""Preparing a run: validate the whole scenario (including the defense and attack tables,
via their registries, and the device) and check the output folder before anything heavy
starts, then load the data and create the run directory. The attack sink needs Ray and is
made once Ray runs (:func:`make_sink`)."""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import tomli_w
import torch

from adversary.maths.defense_model import check_bayes_loss
from adversary.runtime.registry import resolve_attack_params
from adversary.runtime.workers import InversionPool
from adversary.scoring.metrics import lpips_checkpoint
from defenses.registry import validate_defense
from fedsim.config import ScenarioError
from fedsim.data import DatasetSplits, load_data, scenario_partitions
from fedsim.run.ray_cluster import inversion_worker_options
from fedsim.rundir import RunDirectory
from fedsim.scenario import Scenario, load_scenario, scenario_to_table
from server.app import ServerSetup
from server.strategy import AttackSink


def validate_scenario(path: str | Path) -> Scenario:
    """Load ``path`` and check every table, registries included; raises ScenarioError."""
    scenario = load_scenario(path)
    validate_defense(scenario)
    check_bayes_loss(scenario, resolve_attack_params(scenario.attack.attacks, scenario.attack.params, scenario.source))
    pick_device(scenario)
    return scenario


def check_partition(scenario: Scenario, splits: DatasetSplits) -> None:
    """Fail before the run if the data set cannot give every client its examples."""
    try:
        scenario_partitions(scenario, splits)
    except ValueError as exc:
        raise ScenarioError(scenario.source, "data.examples_per_client", str(exc)) from None


def pick_device(scenario: Scenario) -> torch.device:
    if scenario.device == "cuda" and not torch.cuda.is_available():
        raise ScenarioError(scenario.source, "device", "got 'cuda', but CUDA is not available on this machine; "
                            "use 'auto' or 'cpu'")
    if scenario.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(scenario.device)


def default_run_dir(scenario: Scenario) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{scenario.name}-{stamp}"


def make_sink(setup: ServerSetup) -> AttackSink | None:
    """The inversion pool on the running Ray cluster; None when no attack is planned (then the
    strategy taps nothing). Says once, here, when LPIPS cannot be computed."""
    scenario = setup.scenario
    if not scenario.attack.attacks:
        return None
    lpips_checkpoint()
    return InversionPool(scenario, setup.run_dir, inversion_worker_options(scenario.attack),
                         show_progress=setup.show_progress)


def prepare_run(scenario_path: str | Path, out: str | Path | None = None, show_progress: bool = True,
                scenario: Scenario | None = None) -> ServerSetup:
    """Validate, check the output folder, load the data, create the run directory. The setup
    has no attack sink yet (:func:`make_sink`, once Ray runs)."""
    scenario = scenario or validate_scenario(scenario_path)
    device = pick_device(scenario)
    out = Path(out) if out else default_run_dir(scenario)
    RunDirectory.check_new(out)  # before the data is loaded
    splits = load_data(scenario.data, scenario.seed)  # fails here, before any round, if data is missing
    check_partition(scenario, splits)
    run_dir = RunDirectory.create(out)
    run_dir.write_setup(scenario, str(device))
    text = tomli_w.dumps(scenario_to_table(scenario))
    return ServerSetup(scenario, text, run_dir, None, device, splits, show_progress)
