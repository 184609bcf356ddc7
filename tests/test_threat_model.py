"""Attacks see what an honest-but-curious server sees, never the ground truth."""
import dataclasses
import typing

import pytest
import torch

from adversary.observation import GroundTruth, Observation, observe
from adversary.attacks.base import Attack
from adversary.runtime.registry import ATTACKS, available_attacks
from fedsim.domain import DataDomain
from fedsim.records import ClientUpload
from fedsim.scenario import parse_scenario


def test_every_registered_attack_is_a_function_of_the_observation_only():
    names = available_attacks()
    assert {"geiping", "dlg", "spear", "gias", "giml"} <= set(names)
    for name in names:
        hints = typing.get_type_hints(ATTACKS[name].run)
        assert GroundTruth not in hints.values(), name
        assert hints.get("obs") is Observation or Observation in hints.values(), name
        assert hints.get("return") is not None, name


def test_registry_refuses_an_attack_that_takes_ground_truth():
    def cheating(obs: Observation, params: object, truth: GroundTruth) -> None: ...

    with pytest.raises(TypeError, match="GroundTruth"):
        Attack("cheating", object, cheating)
    assert "cheating" not in ATTACKS


def test_observation_has_no_ground_truth_field():
    for field in dataclasses.fields(Observation):
        assert "GroundTruth" not in str(field.type)


def test_labels_and_defense_only_when_the_scenario_grants_them():
    domain = DataDomain((1, 2, 2), 2, (0.5,), (0.5,))
    upload = ClientUpload({}, 1, 1, 0.0, torch.zeros(1, 1, 2, 2), torch.tensor([1]), [(0,)])
    scenario = parse_scenario({})
    hidden, truth = observe(scenario, domain, scenario.round_training(1), 1, 0, {}, upload)
    assert hidden.labels is None and hidden.defense is None
    assert torch.equal(truth.labels, upload.labels) and truth.batches == ((0,),)
    granting = parse_scenario({"attack": {"grant_labels": True, "knows_defense": True}})
    granted, _ = observe(granting, domain, granting.round_training(1), 1, 0, {}, upload)
    assert torch.equal(granted.labels, upload.labels) and granted.defense.name == "none"
