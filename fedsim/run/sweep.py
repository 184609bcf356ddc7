"""``fedsim sweep``: one scenario run once per setting — defenses × parameter values × seeds —
into one run directory each under the output folder, then one privacy–utility table.

A setting changes the base scenario in three ways: ``defense.name`` (the base scenario's own
defense parameters are kept only when the name is the base's), scenario keys given as
``--param KEY=V1,V2`` (dotted, e.g. ``training.lr``; a ``defense.*`` key applies to the
defenses that take it, and must apply to at least one), and ``seed`` (``--seeds N``: the base
seed and the N − 1 after it, the same for every defense). Every setting is built and validated
before the first run starts; a setting that stops early (diverged, failed round) is reported
with its status and the sweep goes on.

Per run the table reports what ``fedsim report`` compares runs by: the final test accuracy, the
mean and best leakage PSNR over its scored attack jobs, the share of all attacked images
recovered, and the final cumulative ε where the defense is accounted. Written as
``sweep.json`` and ``sweep.csv`` in the output folder.
"""
from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from defenses.registry import DEFENSES
from fedsim.config import ScenarioError
from fedsim.run.preparation import validate_table
from fedsim.run.report import load_run
from fedsim.rundir import RunDirectory
from fedsim.scenario import Scenario, load_scenario, scenario_to_table


@dataclass(frozen=True)
class Setting:
    """One run of the sweep: its folder name and the scenario it runs."""

    name: str
    scenario: Scenario
    changes: dict[str, Any]  # dotted key -> value, what differs from the base scenario


def parse_param(text: str) -> tuple[str, list[Any]]:
    """``KEY=V1,V2`` -> (KEY, [V1, V2]); values are TOML literals (numbers, true/false, strings
    with or without quotes)."""
    key, sep, values = text.partition("=")
    if not sep or not key.strip() or not values.strip():
        raise ScenarioError("--param", text, "expected KEY=V1,V2 (e.g. training.lr=0.01,0.1)")
    return key.strip(), [_literal(v.strip()) for v in values.split(",")]


def _literal(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word: a string


def _set(table: dict[str, Any], key: str, value: Any) -> None:
    *path, last = key.split(".")
    for part in path:
        table = table.setdefault(part, {})
    table[last] = value


def _label(value: Any) -> str:
    return format(value, "g") if isinstance(value, float) else str(value).lower()


def _defense_takes(defense: str, key: str) -> bool:
    return key.split(".", 1)[1] in {f.name for f in dataclasses.fields(DEFENSES[defense].params_type)}


def plan_settings(base: Scenario, defenses: list[str], params: list[tuple[str, list[Any]]], seeds: int) -> list[Setting]:
    """Every setting of the sweep, validated (a ScenarioError names the setting and the key)."""
    for key, _ in params:
        if key.startswith("defense.") and not any(_defense_takes(d, key) for d in defenses):
            raise ScenarioError("--param", key, f"no defense of the sweep ({', '.join(defenses)}) takes it")
    settings = []
    for defense in defenses:
        if defense not in DEFENSES:
            raise ScenarioError("--defense", "defense.name", f"got {defense!r}, allowed: {', '.join(DEFENSES)}")
        applicable = [(k, vs) for k, vs in params if not k.startswith("defense.") or _defense_takes(defense, k)]
        for values in itertools.product(*[vs for _, vs in applicable]):
            for offset in range(seeds):
                table = scenario_to_table(base)
                if defense != base.defense.name:
                    table["defense"] = {"name": defense}
                changes: dict[str, Any] = {"defense.name": defense}
                for (key, _), value in zip(applicable, values):
                    _set(table, key, value)
                    changes[key] = value
                table["seed"] = base.seed + offset
                changes["seed"] = base.seed + offset
                name = "_".join([defense] + [f"{k.rsplit('.', 1)[-1]}-{_label(v)}" for k, v in changes.items()
                                             if k not in ("defense.name", "seed")] + [f"seed-{base.seed + offset}"])
                table["name"] = f"{base.name}-{name}"[:100]
                scenario = validate_table(table, f"{base.source} [{name}]")
                settings.append(Setting(name, scenario, changes))
    return settings


def summarise(run_dir: Path) -> dict[str, Any]:
    """The sweep row of one run directory: the numbers ``fedsim report`` compares runs by."""
    run = load_run(run_dir)
    return {
        "final_test_accuracy": run.final_accuracy,
        "rounds": len(run.rounds),
        "psnr_mean": run.psnr_mean,
        "psnr_best": run.psnr_best,
        "recovered_share": run.recovered_share,
        "attack_jobs": len(run.scored),
        "epsilon": run.final_epsilon,
        "status": (run.summary or {}).get("status", "missing"),
    }


def run_sweep(base_path: Path, defenses: list[str], params: list[str], seeds: int, out: Path,
              ray_address: str | None = None, show_progress: bool = True) -> list[dict[str, Any]]:
    """Run every setting into ``out/<setting>``; write and return the table's rows."""
    from fedsim.run.simulation import run_scenario
    from server.stops import RunStopped

    base = load_scenario(base_path)
    settings = plan_settings(base, defenses or [base.defense.name], [parse_param(p) for p in params], seeds)
    for setting in settings:  # every folder checked before the first run
        RunDirectory.check_new(out / setting.name)
    rows = []
    bar = tqdm(settings, desc="sweep", unit="run", disable=not show_progress)
    for setting in bar:
        bar.set_postfix_str(setting.name)
        try:
            run_scenario(base_path, out / setting.name, ray_address, show_progress=False, scenario=setting.scenario)
        except RunStopped:
            pass  # its status is in summary.json, the sweep goes on
        rows.append({"setting": setting.name, **setting.changes, **summarise(out / setting.name)})
        write_table(out, rows)
    return rows


def write_table(out: Path, rows: list[dict[str, Any]]) -> None:
    (out / "sweep.json").write_text(json.dumps(rows, indent=2) + "\n")
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with (out / "sweep.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, columns)
        writer.writeheader()
        writer.writerows(rows)

