"""The run directory: everything one run produces, written so a crash loses at most the
record in flight.

Layout: ``scenario.toml`` (resolved), ``env.json`` (versions, git revision, device),
``rounds.jsonl`` (one line per FL round), ``leakage.jsonl`` (one line per attack),
``reconstructions/`` (PNG grids). JSON Lines are appended and flushed + fsynced per line.
"""
from __future__ import annotations

import json
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


class RunDirectory:
    """Append-only writer for one run's outputs (thread-safe appends)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    @classmethod
    def create(cls, path: str | Path) -> "RunDirectory":
        """The directory of a new run. One that already holds records is refused: appending
        would mix two runs, overwriting would lose one."""
        taken = [name for name in (ROUNDS, LEAKAGE) if (Path(path) / name).exists()]
        if taken:
            raise RunDirectoryError(f"{path} already holds a run ({', '.join(taken)}); "
                                    "choose another --out or remove that directory")
        return cls(path)

    def write_setup(self, scenario: Scenario, device: str) -> None:
        (self.path / "scenario.toml").write_text(tomli_w.dumps(scenario_to_table(scenario)))
        (self.path / "env.json").write_text(json.dumps(environment(device), indent=2) + "\n")

    def append(self, name: str, record: dict[str, Any]) -> None:
        line = json.dumps(record, allow_nan=False) + "\n"
        with self._lock, open(self.path / name, "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())

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
