"""The local batch schedule: which example indices each local optimizer step uses.

Shared by the client (which shuffles per epoch with its own generator) and the attacker
(which, not knowing the client's permutation, uses the unshuffled order over its dummy
examples). Epochs x ceil(n / batch_size) steps, last batch of an epoch may be smaller,
truncated to ``max_steps`` when that is > 0.
"""
from __future__ import annotations

import math

import torch


def num_local_steps(n: int, batch_size: int, epochs: int, max_steps: int = 0) -> int:
    steps = epochs * math.ceil(n / batch_size)
    return min(steps, max_steps) if max_steps > 0 else steps


def local_batches(n: int, batch_size: int, epochs: int, max_steps: int = 0,
                  generator: torch.Generator | None = None) -> list[tuple[int, ...]]:
    """Index tuples into range(n), one per step; shuffled per epoch iff ``generator`` is given."""
    total = num_local_steps(n, batch_size, epochs, max_steps)
    batches: list[tuple[int, ...]] = []
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator).tolist() if generator is not None else list(range(n))
        for start in range(0, n, batch_size):
            if len(batches) == total:
                return batches
            batches.append(tuple(order[start:start + batch_size]))
    return batches


def distinct_examples(batches: list[tuple[int, ...]]) -> tuple[list[int], list[tuple[int, ...]]]:
    """The sorted distinct indices the steps touched, and the batches re-indexed into that list."""
    used = sorted({i for b in batches for i in b})
    position = {i: p for p, i in enumerate(used)}
    return used, [tuple(position[i] for i in b) for b in batches]
