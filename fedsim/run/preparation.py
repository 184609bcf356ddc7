"""Preparing a run: validate the whole scenario (including the defense and attack tables,
via their registries) before anything starts, load the data, create the run directory, pick
the device and the attack sink."""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import tomli_w
import torch

from adversary.runtime.registry import resolve_attack_params
from adversary.runtime.workers import InversionPool
from defenses.registry import resolve_defense_params
from fedsim.config import ScenarioError
from fedsim.data import DatasetSplits, load_data, scenario_partitions
from fedsim.run.ray_cluster import inversion_worker_options
from fedsim.rundir import RunDirectory
from fedsim.scenario import Scenario, load_scenario, scenario_to_table
from server.app import ServerSetup
from server.strategy import AttackSink, RecordingSink


def validate_scenario(path: str | Path) -> Scenario:
    """Load ``path`` and check every table, registries included; raises ScenarioError."""
    scenario = load_scenario(path)
    resolve_defense_params(scenario.defense, scenario.source)
    resolve_attack_params(scenario.attack.attacks, scenario.attack.params, scenario.source)
    return scenario


def check_partition(scenario: Scenario, splits: DatasetSplits) -> None:
    """Fail before the run if the data set cannot give every client its examples."""
    try:
        scenario_partitions(scenario, splits)
    except ValueError as exc:
        raise ScenarioError(scenario.source, "data.examples_per_client", str(exc)) from None


def pick_device(scenario: Scenario) -> torch.device:
    if scenario.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"{scenario.source}: key 'device': 'cuda' requested but CUDA is not available")
    if scenario.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(scenario.device)


def default_run_dir(scenario: Scenario) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{scenario.name}-{stamp}"


def make_sink(scenario: Scenario, run_dir: RunDirectory, show_progress: bool = True) -> AttackSink:
    """The inversion pool on the running Ray cluster, or a recorder when no attack is planned."""
    if not scenario.attack.attacks:
        return RecordingSink()
    return InversionPool(scenario, run_dir, inversion_worker_options(scenario.attack), show_progress=show_progress)


def prepare_run(scenario_path: str | Path, out: str | Path | None = None, show_progress: bool = True,
                scenario: Scenario | None = None, with_sink: bool = True) -> ServerSetup:
    """Validate, load the data, create the run directory and (``with_sink``, Ray running) the
    attack sink."""
    scenario = scenario or validate_scenario(scenario_path)
    device = pick_device(scenario)
    splits = load_data(scenario.data, scenario.seed)  # fails here, before any round, if data is missing
    check_partition(scenario, splits)
    run_dir = RunDirectory.create(out or default_run_dir(scenario))
    run_dir.write_setup(scenario, str(device))
    text = tomli_w.dumps(scenario_to_table(scenario))
    sink = make_sink(scenario, run_dir, show_progress) if with_sink else RecordingSink()
    return ServerSetup(scenario, text, run_dir, sink, device, splits, show_progress)
