"""Preparing a run: validate the whole scenario (including the defense and attack tables,
via their registries, and the device) and check the output folder before anything heavy
starts, then load the data and create the run directory. The attack sink needs Ray and is
made once Ray runs (:func:`make_sink`)."""
from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Callable

import tomli_w
import torch

from adversary.maths.defense_model import check_bayes_loss
from adversary.runtime.giml import GimlSink
from adversary.runtime.registry import resolve_attack_params
from adversary.runtime.workers import InversionPool
from adversary.scoring.metrics import lpips_checkpoint
from defenses.registry import validate_defense
from fedsim.config import ScenarioError
from fedsim.data import DatasetSplits, load_data, scenario_partitions
from fedsim.run.ray_cluster import inversion_worker_options
from fedsim.rundir import RunDirectory, RunDirectoryError
from fedsim.scenario import Scenario, load_scenario, parse_scenario, scenario_to_table
from server.app import ServerSetup
from server.checkpoint import Checkpoint, attacked
from server.strategy import AttackSink


def validate_scenario(path: str | Path) -> Scenario:
    """Load ``path`` and check every table, registries included; raises ScenarioError."""
    return _validated(load_scenario(path))


def validate_table(table: dict, source: str) -> Scenario:
    """A scenario built in memory (e.g. a sweep's setting), checked as a file would be."""
    return _validated(parse_scenario(table, source))


def _validated(scenario: Scenario) -> Scenario:
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


def check_attack_data(scenario: Scenario, splits: DatasetSplits) -> None:
    """Attack parameters that depend on the data (e.g. a prior's image shape), checked before the
    run: a params dataclass may define ``check_data(domain) -> (key, message) | None``."""
    params = resolve_attack_params(scenario.attack.attacks, scenario.attack.params, scenario.source)
    for name, p in params.items():
        problem = p.check_data(splits.domain) if hasattr(p, "check_data") else None
        if problem:
            raise ScenarioError(scenario.source, f"attack.{name}.{problem[0]}", problem[1])


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
    pool = InversionPool(scenario, setup.run_dir, inversion_worker_options(scenario.attack),
                         show_progress=setup.show_progress, done=attacked(setup.run_dir))
    if "giml" not in scenario.attack.attacks:
        return pool
    params = resolve_attack_params(scenario.attack.attacks, scenario.attack.params, scenario.source)["giml"]
    return GimlSink(pool, params, setup.splits.domain, setup.run_dir, setup.device, scenario.seed,
                    done_rounds=setup.resume.round if setup.resume else 0)


def prepare_run(scenario_path: str | Path, out: str | Path | None = None, show_progress: bool = True,
                scenario: Scenario | None = None, before_create: Callable[[Scenario], None] | None = None) -> ServerSetup:
    """Validate, check the output folder, load the data, run ``before_create`` (e.g. start Ray
    and check the cluster: nothing is written before it passes), create the run directory. The
    setup has no attack sink yet (:func:`make_sink`, once Ray runs)."""
    scenario = scenario or validate_scenario(scenario_path)
    out = Path(out) if out else default_run_dir(scenario)
    RunDirectory.check_new(out)  # before the data is loaded

    def create() -> RunDirectory:
        run_dir = RunDirectory.create(out)
        run_dir.write_setup(scenario, str(pick_device(scenario)))
        return run_dir

    return _setup(scenario, show_progress, before_create, create, None)


def prepare_resume(run_path: str | Path, show_progress: bool = True,
                   before_create: Callable[[Scenario], None] | None = None) -> ServerSetup:
    """The setup that continues the run in ``run_path`` after its last checkpoint, with the
    scenario the run resolved. Rounds recorded after the checkpoint are dropped (they run
    again, identically); attack records are kept and their jobs not run again."""
    path = Path(run_path)
    if not (path / "scenario.toml").is_file():
        raise RunDirectoryError(f"{path}: not a run directory (no scenario.toml); nothing to resume")
    scenario = validate_scenario(path / "scenario.toml")
    checkpoint = Checkpoint.load(RunDirectory(path))
    done = checkpoint.round if checkpoint else 0
    if done >= scenario.federation.rounds:
        raise RunDirectoryError(f"{path}: all {scenario.federation.rounds} rounds are done; nothing to resume")

    def reopen() -> RunDirectory:
        run_dir = RunDirectory(path)
        run_dir.keep_rounds_through(done)
        return run_dir

    return _setup(scenario, show_progress, before_create, reopen, checkpoint)


def _setup(scenario: Scenario, show_progress: bool, before_create: Callable[[Scenario], None] | None,
           open_run_dir: Callable[[], RunDirectory], resume: Checkpoint | None) -> ServerSetup:
    device = pick_device(scenario)
    splits = load_data(scenario.data, scenario.seed)  # fails here, before any round, if data is missing
    check_partition(scenario, splits)
    check_attack_data(scenario, splits)
    if before_create is not None:
        before_create(scenario)
    text = tomli_w.dumps(scenario_to_table(scenario))
    return ServerSetup(scenario, text, open_run_dir(), None, device, splits, show_progress, resume=resume)
