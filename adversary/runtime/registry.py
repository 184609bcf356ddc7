"""Registry of attacks: name -> :class:`adversary.attacks.base.Attack`, listed explicitly.

The attack modules import only the attack interface (``adversary.attacks.base``), never this
registry, so the imports run one way: registry -> attacks -> base.
"""
from __future__ import annotations

from typing import Any

from adversary.attacks import dlg, geiping, gias, giml, spear
from adversary.attacks.base import Attack
from fedsim.config import ScenarioError, build_dataclass

ATTACKS: dict[str, Attack] = {attack.name: attack for attack in (geiping.ATTACK, dlg.ATTACK, spear.ATTACK, gias.ATTACK,
                                                                giml.ATTACK)}


def available_attacks() -> tuple[str, ...]:
    return tuple(sorted(ATTACKS))


def get_attack(name: str) -> Attack:
    return ATTACKS[name]


def resolve_attack_params(names: tuple[str, ...], tables: dict, source: str) -> dict[str, Any]:
    """Validate ``[attack.<name>]`` tables; returns name -> params dataclass for each planned attack."""
    allowed = available_attacks()
    for name in names:
        if name not in allowed:
            raise ScenarioError(source, "attack.attacks", f"unknown attack {name!r}; allowed: {', '.join(allowed)}")
    for name in tables:
        if name not in allowed:
            raise ScenarioError(source, f"attack.{name}", f"unknown attack table; allowed: {', '.join(allowed)}")
    return {name: build_dataclass(ATTACKS[name].params_type, tables.get(name, {}), source, f"attack.{name}")
            for name in names}
