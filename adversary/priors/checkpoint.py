"""Prior checkpoints: the generator's plain state dict plus a small JSON header.

File layout (``torch.save`` of a dict, read back with ``weights_only=True``)::

    {"header": "<JSON>", "state": {name: tensor, ...}}

The header holds ``format``, ``architecture`` (``"dcgan"`` or a user's ``"module:Class"``),
``image_shape`` [C, H, W], ``config`` (constructor arguments besides the shape), ``data`` (what
the prior was trained on) and ``sha256``, a digest of the state dict that detects tampering.
A user's architecture is built only when the caller names the same class (the file alone never
makes the loader import code).
"""
from __future__ import annotations

import hashlib
import importlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adversary.priors.dcgan import ARCHITECTURE, Generator, conditional_classes

FORMAT = "fedsim-prior/1"


class PriorError(ValueError):
    """A prior checkpoint that cannot be used; the message is one line naming the file."""


@dataclass(frozen=True)
class PriorHeader:
    """What a checkpoint says about its generator."""

    architecture: str
    image_shape: tuple[int, int, int]
    config: dict[str, Any]
    data: dict[str, Any] = field(default_factory=dict)
    sha256: str = ""
    format: str = FORMAT


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of a state dict, in key order."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def architecture_of(generator: nn.Module) -> str:
    """``"dcgan"`` for the built-in generator, else ``"module:Class"`` of the user's class."""
    cls = type(generator)
    return ARCHITECTURE if cls is Generator else f"{cls.__module__}:{cls.__qualname__}"


def save_prior(path: str | Path, generator: nn.Module, config: dict[str, Any], data: dict[str, Any]) -> PriorHeader:
    """Write ``generator`` (its ``image_shape`` attribute, constructor ``config``, training
    ``data`` description) to ``path`` atomically; returns the header written."""
    state = {k: v.detach().cpu().clone() for k, v in generator.state_dict().items()}
    header = PriorHeader(architecture_of(generator), tuple(generator.image_shape), dict(config), dict(data),
                         state_digest(state))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"header": json.dumps(asdict(header)), "state": state}, tmp)
    tmp.replace(path)
    return header


def _class(architecture: str, user_class: str) -> type[nn.Module]:
    if architecture == ARCHITECTURE:
        return Generator
    if user_class != architecture:
        raise PriorError(f"architecture {architecture!r} is not built in; name it as the generator class "
                         f"(generator_class = {architecture!r}) to load it")
    module, _, name = user_class.partition(":")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise PriorError(f"generator class {user_class!r} cannot be imported ({exc})") from None
    return cls


def load_prior(path: str | Path, image_shape: tuple[int, ...] | None = None,
               user_class: str = "", num_classes: int | None = None) -> tuple[nn.Module, PriorHeader]:
    """The generator in ``path`` (eval mode, CPU) and its header. ``image_shape`` (C, H, W): the
    shape the generator must produce (the scenario's); ``num_classes``: the data's classes, which a
    conditional generator must have. Raises :class:`PriorError` (one line) for a missing,
    truncated or tampered file, a wrong image shape or number of classes."""
    where = f"prior checkpoint '{path}'"
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise PriorError(f"{where}: no such file") from None
    except Exception as exc:  # noqa: BLE001 - torch raises many types for damaged files
        raise PriorError(f"{where}: unreadable, truncated or not a checkpoint "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not isinstance(blob, dict) or not isinstance(blob.get("header"), str) or not isinstance(blob.get("state"), dict):
        raise PriorError(f"{where}: not a prior checkpoint (expected a JSON header and a state dict)")
    try:
        raw = json.loads(blob["header"])
        header = PriorHeader(**{**raw, "image_shape": tuple(raw["image_shape"])})
    except (ValueError, TypeError, KeyError) as exc:
        raise PriorError(f"{where}: damaged header ({exc})") from None
    if header.format != FORMAT:
        raise PriorError(f"{where}: format {header.format!r}, expected {FORMAT!r}")
    state = blob["state"]
    if not all(isinstance(v, torch.Tensor) for v in state.values()) or state_digest(state) != header.sha256:
        raise PriorError(f"{where}: tampered (its weights do not match the digest in its header)")
    if image_shape is not None and tuple(header.image_shape) != tuple(image_shape):
        raise PriorError(f"{where}: makes images of shape {list(header.image_shape)}, the scenario's are "
                         f"{list(image_shape)}")
    cls = _class(header.architecture, user_class)
    try:
        generator = cls(image_shape=header.image_shape, **header.config)
        generator.load_state_dict(state)
    except Exception as exc:  # noqa: BLE001 - a header/state mismatch shows up as any error of the class
        raise PriorError(f"{where}: weights do not fit {header.architecture!r} "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    conditional = conditional_classes(generator)
    if conditional and num_classes is not None and conditional != num_classes:
        raise PriorError(f"{where}: is conditional on {conditional} classes, the scenario's data has {num_classes}")
    return generator.eval(), header
