"""Reading run directories for the report: the records, the scenario, how the run ended; a
:class:`Run` with the numbers the page and the plots need. Bad input raises
:class:`ReportError` (one line; the CLI exits with status 2)."""
from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsim.rundir import LEAKAGE, RECONSTRUCTIONS, ROUNDS, SUMMARY

_ROUND_DEFAULTS: dict[str, Any] = {"test_accuracy": None, "test_loss": None, "train_loss": None, "clients": [],
                                   "failures": [], "diverged": False, "seconds": None}
_LEAKAGE_DEFAULTS: dict[str, Any] = {
    "client": None, "attack": "?", "defense": "?", "status": "?", "psnr_mean": None, "psnr_best": None,
    "ssim_mean": None, "lpips_mean": None, "label_acc": None, "recovered_share": None, "num_images": None,
    "iterations": None, "seconds": None, "image": None}


class ReportError(Exception):
    """The report cannot be made from this input (one line for the CLI, exit status 2)."""


# ------------------------------------------------------------------ reading a run directory

def _read_jsonl(file: Path, required: tuple[str, ...], defaults: dict[str, Any]) -> list[dict[str, Any]]:
    records = []
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ReportError(f"{file}: not UTF-8 text; is it a fedsim records file?") from None
    except OSError as exc:
        raise ReportError(f"{file}: cannot be read ({exc.strerror or exc})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ReportError(f"{file}: line {number} is not JSON ({exc.msg})") from None
        missing = [key for key in required if not isinstance(record, dict) or key not in record]
        if missing:
            raise ReportError(f"{file}: line {number} has no {', '.join(repr(k) for k in missing)}")
        records.append({**defaults, **record})
    return records


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class Run:
    """What the report reads of one run directory."""

    path: Path
    scenario: dict[str, Any]
    rounds: list[dict[str, Any]]
    leakage: list[dict[str, Any]]
    summary: dict[str, Any] | None
    summary_problem: str | None = None
    grids: list[Path] = field(default_factory=list)
    label: str = ""

    @property
    def name(self) -> str:
        return str(self.scenario.get("name") or self.path.resolve().name)

    @property
    def defense(self) -> str:
        table = self.scenario.get("defense")
        if isinstance(table, dict) and table.get("name"):
            return str(table["name"])
        names = sorted({str(r["defense"]) for r in self.leakage})
        return ", ".join(names) if names else "?"

    @property
    def defense_params(self) -> str:
        table = self.scenario.get("defense")
        if not isinstance(table, dict):
            return ""
        return ", ".join(f"{k} = {v}" for k, v in table.items() if k != "name")

    @property
    def recovered_psnr(self) -> float:
        attack = self.scenario.get("attack")
        value = attack.get("recovered_psnr") if isinstance(attack, dict) else None
        return float(value) if finite(value) else 20.0

    @property
    def final_accuracy(self) -> float | None:
        """The test accuracy of the last round that has one (a diverged round has none)."""
        values = [r["test_accuracy"] for r in self.rounds if finite(r["test_accuracy"])]
        return values[-1] if values else None

    @property
    def has_epsilon(self) -> bool:
        return any(r.get("epsilon") is not None for r in self.rounds)

    @property
    def final_epsilon(self) -> float | None:
        values = [r.get("epsilon") for r in self.rounds if finite(r.get("epsilon"))]
        return values[-1] if values else None

    @property
    def scored(self) -> list[dict[str, Any]]:
        """The attack jobs that have a PSNR (failed jobs have none)."""
        return [r for r in self.leakage if finite(r["psnr_mean"])]

    @property
    def psnr_mean(self) -> float | None:
        """Mean over all scored attack jobs of each job's mean PSNR."""
        return mean([r["psnr_mean"] for r in self.scored])

    @property
    def psnr_best(self) -> float | None:
        """The best single image PSNR of any attack job."""
        values = [r["psnr_best"] for r in self.leakage if finite(r["psnr_best"])]
        return max(values) if values else None

    @property
    def recovered_share(self) -> float | None:
        """Share of all attacked images that were recovered (jobs weighted by their images)."""
        return recovered_share(self.leakage)


def recovered_share(records: list[dict[str, Any]]) -> float | None:
    pairs = [(r["recovered_share"], r["num_images"] if finite(r["num_images"]) and r["num_images"] > 0 else 1)
             for r in records if finite(r["recovered_share"])]
    total = sum(n for _, n in pairs)
    return sum(s * n for s, n in pairs) / total if total else None


def load_run(path: str | Path) -> Run:
    """Read a run directory; :class:`ReportError` if ``path`` is not one or its records do not parse.
    ``summary.json``, ``scenario.toml``, ``reconstructions/`` and one of ``rounds.jsonl`` and
    ``leakage.jsonl`` may be absent."""
    path = Path(path)
    if not path.exists():
        raise ReportError(f"{path}: no such run directory")
    if not path.is_dir():
        raise ReportError(f"{path} is a file, not a run directory")
    if not (path / ROUNDS).is_file() and not (path / LEAKAGE).is_file():
        raise ReportError(f"{path} is not a run directory (no {ROUNDS}, no {LEAKAGE}); give the folder "
                          "`fedsim run` or `fedsim attack` wrote")
    # a single-shot attack (``fedsim attack``) has leakage records and no rounds
    rounds = _read_jsonl(path / ROUNDS, ("round",), _ROUND_DEFAULTS) if (path / ROUNDS).is_file() else []
    leakage = _read_jsonl(path / LEAKAGE, ("round",), _LEAKAGE_DEFAULTS) if (path / LEAKAGE).is_file() else []
    scenario: dict[str, Any] = {}
    if (path / "scenario.toml").is_file():
        try:
            scenario = tomllib.loads((path / "scenario.toml").read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ReportError(f"{path / 'scenario.toml'}: does not parse ({exc})") from None
    summary, problem = None, None
    if (path / SUMMARY).is_file():
        try:
            summary = json.loads((path / SUMMARY).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            problem = f"{SUMMARY} is unreadable ({exc})"
    folder = path / RECONSTRUCTIONS
    grids = sorted(folder.glob("*.png")) if folder.is_dir() else []
    return Run(path, scenario, rounds, leakage, summary if isinstance(summary, dict) else None, problem, grids)


def label_runs(runs: list[Run]) -> None:
    """Scenario names when they tell the runs apart, else folder names, else the paths given."""
    for candidates in ([r.name for r in runs], [r.path.resolve().name for r in runs], [str(r.path) for r in runs]):
        if len(set(candidates)) == len(runs):
            break
    for run, label in zip(runs, candidates):
        run.label = label
