"""``fedsim sweep``: one run per setting, one table, bad settings refused before any run."""
from __future__ import annotations

import csv
import json

import pytest

from fedsim.run.cli import main
from fedsim.run.sweep import parse_param, plan_settings
from fedsim.scenario import load_scenario

TINY = """
name = "tiny"
seed = 4
[data]
train_examples = 200
test_examples = 50
image_size = 16
examples_per_client = 6
[model]
width = 4
[federation]
num_clients = 4
clients_per_round = 2
rounds = 1
[training]
batch_size = 3
max_steps = 1
lr = 0.05
[defense]
name = "dp_local"
clip_norm = 2.0
noise_multiplier = 0.01
[attack]
attacks = ["geiping"]
rounds = [1]
clients = []
[attack.geiping]
iterations = 20
"""


def test_settings_are_the_product_of_what_applies(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    base = load_scenario(path)
    settings = plan_settings(base, ["dp_local", "topk", "none"],
                             [parse_param("defense.noise_multiplier=0.1,1"), parse_param("training.lr=0.01")], 2)
    names = [s.name for s in settings]
    assert len(names) == 2 * 2 + 2 + 2 and len(set(names)) == len(names)
    dp = [s.scenario for s in settings if s.scenario.defense.name == "dp_local"]
    assert sorted({d.defense.params["noise_multiplier"] for d in dp}) == [0.1, 1]
    assert all(d.defense.params["clip_norm"] == 2.0 for d in dp)  # the base's own parameters stay
    topk = [s.scenario for s in settings if s.scenario.defense.name == "topk"]
    assert all(t.defense.params == {} for t in topk)  # dp_local's parameters do not leak into topk
    assert sorted({s.scenario.seed for s in settings}) == [4, 5]
    assert all(s.scenario.training.lr == 0.01 for s in settings)


@pytest.mark.parametrize("defenses,param,fragment", [
    (["topk"], "defense.noise_multiplier=0.1", "no defense of the sweep (topk) takes it"),
    (["magic"], "training.lr=0.1", "allowed: none"),
    (["none"], "training.lr=-1", "must be > 0"),
    (["none"], "training.lr", "expected KEY=V1,V2"),
])
def test_bad_settings_are_refused_before_any_run(tmp_path, capsys, defenses, param, fragment):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    code = main(["sweep", str(path), "--defense", ",".join(defenses), "--param", param, "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and fragment in err
    assert not (tmp_path / "s").exists()


def test_a_sweep_runs_every_setting_and_writes_one_table(tmp_path, capsys):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    out = tmp_path / "sweep"
    assert main(["sweep", str(path), "--defense", "none,dp_local", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    rows = json.loads((out / "sweep.json").read_text())
    assert [r["setting"] for r in rows] == ["none_seed-4", "dp_local_seed-4"]
    for row in rows:
        assert (out / row["setting"] / "rounds.jsonl").exists() and row["rounds"] == 1
        assert 0.0 <= row["final_test_accuracy"] <= 1.0 and row["status"] == "completed"
        assert row["attack_jobs"] == 2 and row["psnr_mean"] is not None and row["psnr_best"] >= row["psnr_mean"]
        assert row["setting"] in printed
    assert rows[0]["epsilon"] is None and rows[1]["epsilon"] > 0  # ε only where the defense is accounted
    with (out / "sweep.csv").open() as fh:
        assert [r["setting"] for r in csv.DictReader(fh)] == [r["setting"] for r in rows]
    # again into the same folder: the setting's folder holds a run, refused before anything runs
    assert main(["sweep", str(path), "--defense", "none", "--out", str(out)]) == 2
    assert "already holds a run" in capsys.readouterr().err
