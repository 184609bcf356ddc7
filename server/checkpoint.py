"""What a run continues from (``fedsim run --resume``): after every completed round the server
writes ``checkpoint.pt`` — the round, the global model after it (parameters and buffers), the
privacy ledger — atomically, loaded with ``torch.load(weights_only=True)``. Sampling and every
seed derive from (scenario seed, round), so nothing else is needed. Tapped updates whose
attacks are not all recorded wait in ``pending/`` (written by the strategy) and are queued
again on resume."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fedsim.records import atomic_save
from fedsim.rundir import LEAKAGE, RunDirectory

CHECKPOINT = "checkpoint.pt"
PENDING = "pending"


@dataclass
class Checkpoint:
    round: int  # the last completed round
    global_state: dict[str, torch.Tensor]
    privacy: dict  # defenses.accounting.PrivacyLedger.state_dict()

    def save(self, run_dir: RunDirectory) -> None:
        atomic_save({"round": self.round, "global_state": self.global_state, "privacy": self.privacy},
                    run_dir.path / CHECKPOINT)

    @classmethod
    def load(cls, run_dir: RunDirectory) -> "Checkpoint | None":
        path = run_dir.path / CHECKPOINT
        if not path.exists():
            return None
        payload = torch.load(path, weights_only=True)
        return cls(int(payload["round"]), payload["global_state"], payload["privacy"])


def attacked(run_dir: RunDirectory) -> set[tuple[int, int, str]]:
    """(round, client, attack) of every attack job already recorded in ``leakage.jsonl``."""
    return {(r["round"], r["client"], r["attack"]) for r in run_dir.read(LEAKAGE)}


def pending_uploads(run_dir: RunDirectory, attacks: tuple[str, ...]) -> list[Path]:
    """The files in ``pending/`` whose attacks are not all recorded; the others are deleted."""
    folder = run_dir.path / PENDING
    done = attacked(run_dir)
    waiting = []
    for path in sorted(folder.glob("r*_c*.pt")) if folder.exists() else []:
        server_round, client = int(path.stem[1:4]), int(path.stem[6:9])
        if all((server_round, client, a) in done for a in attacks):
            path.unlink()
        else:
            waiting.append(path)
    return waiting

