"""Strict conversion of TOML tables into frozen dataclasses.

Every scenario section (and every attack/defense parameter table) is a frozen
dataclass. Fields may carry constraints in ``dataclasses.field(metadata=...)``:

- ``choices``: allowed values (strings),
- ``min`` / ``max``: inclusive numeric bounds, ``gt`` / ``lt``: exclusive lower / upper bounds,
- ``pattern``: a regular expression a string must match in full (``pattern_doc`` says it in words),
- ``doc``: one line shown in error messages and the README.

Floats must be finite (TOML allows ``nan`` and ``inf``; no field accepts them).
Errors are raised as :class:`ScenarioError`, which names the file, the dotted key,
the bad value and what is allowed, so the CLI can print one clear line.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

T = TypeVar("T")


class ScenarioError(ValueError):
    """A scenario file (or a table inside it) is invalid.

    ``str(error)`` is a single line: ``FILE: key 'a.b': problem``.
    """

    def __init__(self, source: str | Path, key: str, problem: str):
        self.source = str(source)
        self.key = key
        self.problem = problem
        where = f"key '{key}'" if key else "top level"
        super().__init__(f"{self.source}: {where}: {problem}")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is tuple:
        inner = typing.get_args(tp)[0]
        return f"list of {_type_name(inner)}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "nothing"
    if origin is dict or tp is dict:
        return "table"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, source: str, key: str) -> Any:
    """Check ``value`` against annotation ``tp`` and convert lists to tuples."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _convert(value, option, source, key)
            except ScenarioError:
                continue
        raise ScenarioError(source, key, f"got {value!r}, expected {_type_name(tp)}")
    if tp is type(None):
        if value is None:
            return None
        raise ScenarioError(source, key, f"got {value!r}, expected nothing")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ScenarioError(source, key, f"got {value!r}, expected {_type_name(tp)}")
        inner = typing.get_args(tp)[0]
        return tuple(_convert(v, inner, source, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ScenarioError(source, key, f"got {value!r}, expected a table")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ScenarioError(source, key, f"got {value!r}, expected a table")
        return build_dataclass(tp, value, source, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ScenarioError(source, key, f"got {value!r}, must be a finite number")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - programming error in a schema
        raise TypeError(f"unsupported field type {tp!r} at {key}")
    raise ScenarioError(source, key, f"got {value!r} ({type(value).__name__}), expected {_type_name(tp)}")


def _check_constraints(value: Any, meta: Mapping[str, Any], source: str, key: str) -> None:
    items = value if isinstance(value, tuple) else (value,)
    for item in items:
        if item is None:
            continue
        choices = meta.get("choices")
        if choices is not None and item not in choices:
            allowed = ", ".join(repr(c) for c in choices)
            raise ScenarioError(source, key, f"got {item!r}, allowed: {allowed}")
        pattern = meta.get("pattern")
        if pattern is not None and isinstance(item, str) and not re.fullmatch(pattern, item):
            raise ScenarioError(source, key, f"got {item!r}, must be {meta.get('pattern_doc', f'like {pattern}')}")
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            lo, hi, gt, lt = meta.get("min"), meta.get("max"), meta.get("gt"), meta.get("lt")
            if lo is not None and item < lo:
                raise ScenarioError(source, key, f"got {item!r}, must be >= {lo}")
            if hi is not None and item > hi:
                raise ScenarioError(source, key, f"got {item!r}, must be <= {hi}")
            if gt is not None and item <= gt:
                raise ScenarioError(source, key, f"got {item!r}, must be > {gt}")
            if lt is not None and item >= lt:
                raise ScenarioError(source, key, f"got {item!r}, must be < {lt}")


def build_dataclass(cls: type[T], table: Mapping[str, Any], source: str | Path, prefix: str = "") -> T:
    """Build frozen dataclass ``cls`` from a TOML table, rejecting unknown keys,
    wrong types and out-of-range values with a :class:`ScenarioError`."""
    source = str(source)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        bad = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ScenarioError(source, bad, f"unknown key; allowed keys: {', '.join(sorted(fields))}")
    kwargs: dict[str, Any] = {}
    for name, value in table.items():
        key = f"{prefix}.{name}" if prefix else name
        converted = _convert(value, hints[name], source, key)
        _check_constraints(converted, fields[name].metadata, source, key)
        kwargs[name] = converted
    try:
        obj = cls(**kwargs)
    except ScenarioError:
        raise
    except (TypeError, ValueError) as exc:
        raise ScenarioError(source, prefix, str(exc)) from None
    check = getattr(obj, "check", None)
    if check is not None:
        problem = check()
        if problem:
            key, message = problem
            raise ScenarioError(source, f"{prefix}.{key}" if prefix else key, message)
    return obj


def to_table(obj: Any) -> Any:
    """Inverse of :func:`build_dataclass`: a plain dict/list tree for TOML/JSON output."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_table(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_table(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_table(v) for k, v in obj.items()}
    return obj
