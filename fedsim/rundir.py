"""The run directory: everything one run produces, written so a crash loses at most the
record in flight.

Layout: ``scenario.toml`` (resolved), ``env.json`` (versions, git revision, device),
``rounds.jsonl`` (one line per FL round), ``leakage.jsonl`` (one line per attack),
``reconstructions/`` (PNG grids), ``summary.json`` (how the run ended), ``clients.log`` (the
full error of every failed client), ``flower.log`` (Flower's own log). JSON Lines are appended
with one write per line and fsynced; a number that is not finite is stored as null.
"""
from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import threading
from importlib import metadata
from pathlib import Path
from typing import Any

import tomli_w

from fedsim.scenario import Scenario, scenario_to_table

ROUNDS = "rounds.jsonl"
LEAKAGE = "leakage.jsonl"
RECONSTRUCTIONS = "reconstructions"
SUMMARY = "summary.json"
CLIENT_LOG = "clients.log"
FLOWER_LOG = "flower.log"


def _git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: str) -> dict[str, Any]:
    versions = {}
    for pkg in ("fedsim", "torch", "torchvision", "flwr", "ray", "numpy", "scipy", "lpips"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"python": sys.version.split()[0], "platform": platform.platform(), "packages": versions,
            "git_revision": _git_revision(), "device": device}


class RunDirectoryError(Exception):
    """The run directory asked for cannot take a new run (one line for the CLI)."""


def json_safe(value: Any) -> Any:
    """``value`` with every float that is not finite replaced by None (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


class RunDirectory:
    """Append-only writer for one run's outputs (thread-safe appends)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    @staticmethod
    def check_new(path: str | Path) -> None:
        """Raise :class:`RunDirectoryError` unless ``path`` can become a new run's directory:
        a folder that holds no run's records, or one that can be created and written."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise RunDirectoryError(f"{path} is a file, not a folder; choose another --out")
        taken = [name for name in (ROUNDS, LEAKAGE) if (path / name).exists()]
        if taken:
            raise RunDirectoryError(f"{path} already holds a run ({', '.join(taken)}); "
                                    "choose another --out or remove that directory")
        existing = next(p for p in (path, *path.absolute().parents) if p.exists())
        if not existing.is_dir():
            raise RunDirectoryError(f"{path}: {existing} is a file, not a folder; choose another --out")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise RunDirectoryError(f"{path}: {existing} is not writable; choose another --out")

    @classmethod
    def create(cls, path: str | Path) -> "RunDirectory":
        """The directory of a new run. One that already holds records is refused: appending
        would mix two runs, overwriting would lose one."""
        cls.check_new(path)
        try:
            return cls(path)
        except OSError as exc:
            raise RunDirectoryError(f"{path}: cannot create the run directory ({exc.strerror or exc})") from None

    def write_setup(self, scenario: Scenario, device: str) -> None:
        (self.path / "scenario.toml").write_text(tomli_w.dumps(scenario_to_table(scenario)))
        (self.path / "env.json").write_text(json.dumps(environment(device), indent=2) + "\n")

    def append(self, name: str, record: dict[str, Any]) -> None:
        """Append ``record`` as one line, in one write (a crash cannot leave half a line), and
        fsync it."""
        line = (json.dumps(json_safe(record), allow_nan=False) + "\n").encode("utf-8")
        with self._lock:
            fd = os.open(self.path / name, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)

    def keep_rounds_through(self, last_round: int, name: str = ROUNDS, key: str = "round") -> None:
        """Drop the records of ``name`` (a JSON-lines file; its round in ``key``) after
        ``last_round`` (a resumed run repeats those rounds); the file is replaced in one rename."""
        kept = [r for r in self.read(name) if r[key] <= last_round]
        tmp = self.path / (name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        os.replace(tmp, self.path / name)

    def write_summary(self, summary: dict[str, Any]) -> None:
        (self.path / SUMMARY).write_text(json.dumps(json_safe(summary), indent=2) + "\n")

    def log(self, name: str, text: str) -> None:
        """Append free text to the log file ``name``."""
        with self._lock, open(self.path / name, "a", encoding="utf-8") as fh:
            fh.write(text.rstrip("\n") + "\n")

    def read(self, name: str) -> list[dict[str, Any]]:
        file = self.path / name
        if not file.exists():
            return []
        return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]

    @property
    def reconstructions(self) -> Path:
        folder = self.path / RECONSTRUCTIONS
        folder.mkdir(exist_ok=True)
        return folder
