"""A disk cache for what is expensive to build and a pure function of its key (the generated
data sets: thousands of photo crops take seconds, and every client process would build them
again).

Entries are ``torch.save`` files of plain dicts (tensors, numbers, strings, lists), read back
with ``weights_only=True``, in ``$FEDSIM_CACHE`` (default ``~/.cache/fedsim``; ``off``
disables the cache). Written to a temporary file and renamed, so processes that build the
same entry at once never see half of one; an entry that cannot be read is built again, and a
folder that cannot be written only means no caching.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable

import torch

CACHE_ENV = "FEDSIM_CACHE"


def cache_dir() -> Path | None:
    """Where entries live, or None when caching is off."""
    value = os.environ.get(CACHE_ENV, "")
    if value.lower() == "off":
        return None
    return Path(value) if value else Path.home() / ".cache" / "fedsim"


def cached(key: str, build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The entry for ``key`` (any string that names everything the entry depends on), built
    with ``build()`` on a miss and stored."""
    folder = cache_dir()
    if folder is None:
        return build()
    path = folder / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.pt"
    try:
        return torch.load(path, weights_only=True)
    except Exception:  # noqa: BLE001 - absent, truncated or from another format: build it again
        pass
    entry = build()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        torch.save(entry, tmp)
        os.replace(tmp, path)
    except OSError:
        pass
    return entry
