"""Registry of defenses: name -> (parameter dataclass, Defense subclass).

``resolve_defense_params`` validates the ``[defense]`` table (unknown names and keys, types,
ranges from field metadata, ``check()`` cross-field rules); given the model spec it also checks
that the defense fits the model (DP-SGD refuses BatchNorm). ``validate_defense(scenario)`` does
both for a loaded scenario.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from defenses.base import Defense, NoParams
from defenses.dp_central import DpCentral, DpCentralParams
from defenses.dp_local import DpLocal, DpLocalParams
from defenses.dp_sgd import DpSgd, DpSgdParams, has_batchnorm
from defenses.noise import GaussianNoise, GaussianParams, LaplaceNoise, LaplaceParams
from defenses.outpost import Outpost, OutpostParams
from defenses.quantize import Quantize, QuantizeParams
from defenses.soteria import Soteria, SoteriaParams
from defenses.topk import Topk, TopkParams
from fedsim.config import ScenarioError, build_dataclass
from fedsim.models import build_model
from fedsim.scenario import DefenseSpec, ModelSpec, Scenario


@dataclass(frozen=True)
class DefenseEntry:
    params_type: type
    defense_type: type[Defense]


DEFENSES: dict[str, DefenseEntry] = {
    "none": DefenseEntry(NoParams, Defense),
    "outpost": DefenseEntry(OutpostParams, Outpost),
    "dp_local": DefenseEntry(DpLocalParams, DpLocal),
    "dp_sgd": DefenseEntry(DpSgdParams, DpSgd),
    "dp_central": DefenseEntry(DpCentralParams, DpCentral),
    "topk": DefenseEntry(TopkParams, Topk),
    "gaussian": DefenseEntry(GaussianParams, GaussianNoise),
    "laplace": DefenseEntry(LaplaceParams, LaplaceNoise),
    "soteria": DefenseEntry(SoteriaParams, Soteria),
    "quantize": DefenseEntry(QuantizeParams, Quantize),
}


def model_has_batchnorm(model: ModelSpec) -> bool:
    """Whether the architecture has BatchNorm layers (built on a tiny input; not run)."""
    return has_batchnorm(build_model(model, (1, 8, 8), 2))


def resolve_defense_params(spec: DefenseSpec, source: str, model: ModelSpec | None = None) -> object:
    """Validate ``[defense]`` against the registry (and against ``model`` when given);
    ScenarioError names file and key."""
    if spec.name not in DEFENSES:
        raise ScenarioError(source, "defense.name", f"got {spec.name!r}, allowed: {', '.join(DEFENSES)}")
    params = build_dataclass(DEFENSES[spec.name].params_type, spec.params, source, "defense")
    if model is not None and spec.name == "dp_sgd" and model_has_batchnorm(model):
        raise ScenarioError(source, "defense.name",
                            f"'dp_sgd' needs per-example gradients, undefined with BatchNorm, and model.name = "
                            f"{model.name!r} has BatchNorm layers; use model.name = 'mlp'")
    return params


def validate_defense(scenario: Scenario) -> object:
    """The scenario's defense parameters, checked against its model."""
    return resolve_defense_params(scenario.defense, scenario.source, scenario.model)


def build_defense(spec: DefenseSpec, generator: torch.Generator, source: str = "<scenario>") -> Defense:
    entry = DEFENSES[spec.name]
    return entry.defense_type(resolve_defense_params(spec, source), generator)
