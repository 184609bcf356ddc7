"""Wire format between client and server: state dicts and the evaluation-only channel.

The client's reply carries three records: ``arrays`` (θ', aggregated by FedAvg),
``metrics`` and ``GROUND_TRUTH_KEY`` (the batches it trained on). The strategy removes
the ground-truth record before anything else sees the message; it goes to scoring only.
"""
from __future__ import annotations

import torch
from flwr.app import ArrayRecord

GROUND_TRUTH_KEY = "eval-only-ground-truth"


def pack_batches(batches: list[tuple[int, ...]]) -> torch.Tensor:
    """(steps, max_batch) int64, padded with -1."""
    width = max((len(b) for b in batches), default=0)
    out = torch.full((len(batches), width), -1, dtype=torch.int64)
    for i, b in enumerate(batches):
        out[i, : len(b)] = torch.tensor(b, dtype=torch.int64)
    return out


def unpack_batches(packed: torch.Tensor) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(int(i) for i in row if i >= 0) for row in packed)


def to_record(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


def from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return dict(record.to_torch_state_dict())
