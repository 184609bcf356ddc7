"""Wire format between client and server: what one client returns from one round, and how
it travels in a Flower reply.

The client's reply carries ``arrays`` (θ', aggregated by FedAvg), ``metrics`` and, when the
server will score an attack on this update (the round config lists the client in
``GROUND_TRUTH_CLIENTS``), ``GROUND_TRUTH_KEY`` (the examples and batches it trained on). The
strategy removes the ground-truth record (:func:`take_upload`) before anything else sees the
message; it goes to scoring only.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict

GROUND_TRUTH_KEY = "eval-only-ground-truth"
#: round-config key: the clients whose reply carries the ground truth (absent: every client)
GROUND_TRUTH_CLIENTS = "ground-truth-clients"


@dataclass
class ClientUpload:
    """One client's work in one round.

    ``update``: the uploaded Δ (after the defense) for every state entry; ``num_examples``: its
    local data set size (reported); ``num_steps``: local optimizer steps (reported);
    ``train_loss``: mean over the steps. Evaluation only (None when the reply did not carry
    them): ``inputs`` (N, C, H, W) and ``labels`` (N,), the distinct examples it trained on, and
    ``batches``, each step's batch as indices into them.
    """

    update: dict[str, torch.Tensor]
    num_examples: int
    num_steps: int
    train_loss: float
    inputs: torch.Tensor | None
    labels: torch.Tensor | None
    batches: list[tuple[int, ...]] | None


def pack_batches(batches: list[tuple[int, ...]]) -> torch.Tensor:
    """(steps, max_batch) int64, padded with -1."""
    width = max((len(b) for b in batches), default=0)
    out = torch.full((len(batches), width), -1, dtype=torch.int64)
    for i, b in enumerate(batches):
        out[i, : len(b)] = torch.tensor(b, dtype=torch.int64)
    return out


def unpack_batches(packed: torch.Tensor) -> list[tuple[int, ...]]:
    return [tuple(int(i) for i in row if i >= 0) for row in packed]


def to_record(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


def from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return dict(record.to_torch_state_dict())


def save_upload(path: Path, server_round: int, client_id: int, global_state: dict[str, torch.Tensor],
                upload: ClientUpload) -> None:
    """Keep a tapped update on disk until its attacks are done (a resumed run re-queues them)."""
    payload = {"round": server_round, "client": client_id, "global_state": global_state, "update": upload.update,
               "num_examples": upload.num_examples, "num_steps": upload.num_steps, "train_loss": upload.train_loss,
               "inputs": upload.inputs, "labels": upload.labels, "batches": pack_batches(upload.batches)}
    atomic_save(payload, path)


def load_upload(path: Path) -> tuple[int, int, dict[str, torch.Tensor], ClientUpload]:
    """(round, client, θ_t, upload) of a file written by :func:`save_upload`."""
    p = torch.load(path, weights_only=True)
    upload = ClientUpload(p["update"], p["num_examples"], p["num_steps"], p["train_loss"], p["inputs"], p["labels"],
                          unpack_batches(p["batches"]))
    return p["round"], p["client"], p["global_state"], upload


def atomic_save(payload: dict, path: Path) -> None:
    """``torch.save`` to a temporary file, then rename: a crash leaves the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def all_finite(tensors: dict[str, torch.Tensor]) -> bool:
    """Whether every floating tensor of a state dict (or update) holds only finite values."""
    return all(bool(torch.isfinite(v).all()) for v in tensors.values() if v.is_floating_point())


def reply_content(global_state: dict[str, torch.Tensor], upload: ClientUpload, with_truth: bool = True) -> RecordDict:
    """The client's reply: θ' = θ_t + Δ, the reported metrics and (``with_truth``) the
    evaluation-only record."""
    new_state = {k: global_state[k] + upload.update[k] for k in global_state}
    metrics = MetricRecord({"num-examples": upload.num_examples, "steps": upload.num_steps,
                            "train-loss": upload.train_loss})
    content = RecordDict({"arrays": to_record(new_state), "metrics": metrics})
    if with_truth:
        truth = {"inputs": upload.inputs, "labels": upload.labels, "batches": pack_batches(upload.batches)}
        content[GROUND_TRUTH_KEY] = to_record(truth)
    return content


def take_upload(content: RecordDict, global_state: dict[str, torch.Tensor]) -> ClientUpload:
    """Read a reply made by :func:`reply_content` against θ_t = ``global_state``, removing the
    evaluation-only record from ``content`` (FedAvg then sees only arrays and metrics)."""
    truth = from_record(content.pop(GROUND_TRUTH_KEY)) if GROUND_TRUTH_KEY in content else None
    received = from_record(content["arrays"])
    metrics = content["metrics"]
    return ClientUpload({k: received[k] - global_state[k] for k in global_state}, int(metrics["num-examples"]),
                        int(metrics["steps"]), float(metrics["train-loss"]),
                        None if truth is None else truth["inputs"], None if truth is None else truth["labels"],
                        None if truth is None else unpack_batches(truth["batches"]))
