"""Scenario files: shipped ones are valid; bad ones fail before anything runs, with one
line naming the file and the key."""
import subprocess
import sys
from pathlib import Path

import pytest

from fedsim.run.cli import main
from fedsim.scenario import Scenario, load_scenario, parse_scenario, scenario_to_table
from fedsim.run.preparation import validate_scenario

ROOT = Path(__file__).resolve().parents[1]

# (TOML body, the key the error must name, a fragment of the explanation)
BAD = [
    ("[training]\nlr = -0.1\n", "training.lr", "must be > 0"),
    ("[training]\nbatchsize = 32\n", "training.batchsize", "unknown key"),
    ("[data]\ndataset = \"imagenet\"\n", "data.dataset", "allowed: 'embedded_photos'"),
    ("[model]\nname = \"vgg\"\n", "model.name", "allowed"),
    ("[federation]\nnum_clients = 4\nclients_per_round = 5\n", "federation.clients_per_round", "<= num_clients"),
    ("[training]\nepochs = \"three\"\n", "training.epochs", "expected int"),
    ("[training]\nmomentum = 1.5\n", "training.momentum", "<= 0.999"),
    ("seed = 1.5\n", "seed", "expected int"),
    ("[defense]\nname = \"magic\"\n", "defense.name", "allowed: none"),
    ("[attack]\nattacks = [\"telepathy\"]\n", "attack.attacks", "unknown attack"),
    ("[data]\npartition = \"dirichlet\"\ndirichlet_alpha = 0\n", "data.dirichlet_alpha", "must be > 0"),
    ("[training]\nlr_schedule = \"exp\"\n", "training.lr_schedule", "allowed"),
    ("[attack]\nrounds = [9]\n", "attack.rounds", "past federation.rounds"),
    ("device = \"tpu\"\n", "device", "allowed"),
    ("[training\nlr = 1\n", "", "not valid TOML"),
    ("[data]\nexamples_per_client = 500\n", "data.examples_per_client", "exceeds"),
    ("[training]\nnesterov = true\n", "training.nesterov", "momentum > 0"),
]


@pytest.mark.parametrize("body,key,fragment", BAD, ids=[b[1] or "toml" for b in BAD])
def test_bad_scenario_exits_with_one_line_naming_file_and_key(tmp_path, capsys, body, key, fragment):
    path = tmp_path / "bad.toml"
    path.write_text(body)
    code = main(["run", str(path), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert str(path) in err and fragment in err
    if key:
        assert f"key '{key}'" in err
    assert not (tmp_path / "run").exists()  # nothing ran


def test_missing_file_and_no_traceback_from_the_real_command(tmp_path):
    missing = tmp_path / "nope.toml"
    proc = subprocess.run([sys.executable, "-m", "fedsim.run.cli", "run", str(missing)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"fedsim: error: {missing}: top level: file not found"


@pytest.mark.parametrize("path", sorted((ROOT / "scenarios").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_scenarios_are_valid_and_round_trip(path):
    scenario = validate_scenario(path)
    again = parse_scenario(scenario_to_table(scenario), path)
    assert again == scenario


def test_defaults_and_lr_schedules():
    s = parse_scenario({})
    assert s == Scenario(source="<memory>")
    step = parse_scenario({"training": {"lr": 0.1, "lr_schedule": "step", "lr_milestones": [3, 5], "lr_gamma": 0.5}})
    assert [step.training.lr_at(r, 6) for r in (1, 3, 5)] == pytest.approx([0.1, 0.05, 0.025])
    cos = parse_scenario({"training": {"lr": 0.1, "lr_schedule": "cosine"}, "federation": {"rounds": 5}})
    assert cos.training.lr_at(1, 5) == pytest.approx(0.1) and cos.training.lr_at(5, 5) == pytest.approx(0.0)


def test_attack_subtables_become_params():
    s = parse_scenario({"attack": {"attacks": [], "geiping": {"iterations": 10}}})
    assert s.attack.params == {"geiping": {"iterations": 10}}
    assert load_scenario(ROOT / "scenarios" / "quickstart.toml").name == "quickstart"


def test_a_run_directory_holding_a_run_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "rounds.jsonl").write_text('{"round": 1}\n')
    path = tmp_path / "s.toml"
    path.write_text("")
    code = main(["run", str(path), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert str(out) in err and "already holds a run (rounds.jsonl)" in err
    assert (out / "rounds.jsonl").read_text() == '{"round": 1}\n'  # nothing appended or lost
