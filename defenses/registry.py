"""Registry of defenses: name -> (parameter dataclass, Defense subclass)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from defenses.base import Defense, NoParams
from fedsim.config import ScenarioError, build_dataclass
from fedsim.scenario import DefenseSpec


@dataclass(frozen=True)
class DefenseEntry:
    params_type: type
    defense_type: type[Defense]


DEFENSES: dict[str, DefenseEntry] = {"none": DefenseEntry(NoParams, Defense)}


def resolve_defense_params(spec: DefenseSpec, source: str) -> object:
    """Validate ``[defense]`` against the registry; ScenarioError names file and key."""
    if spec.name not in DEFENSES:
        raise ScenarioError(source, "defense.name", f"got {spec.name!r}, allowed: {', '.join(sorted(DEFENSES))}")
    return build_dataclass(DEFENSES[spec.name].params_type, spec.params, source, "defense")


def build_defense(spec: DefenseSpec, generator: torch.Generator, source: str = "<scenario>") -> Defense:
    entry = DEFENSES[spec.name]
    return entry.defense_type(resolve_defense_params(spec, source), generator)
