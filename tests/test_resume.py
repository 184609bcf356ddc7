"""``fedsim run --resume``: a run killed mid-way continues from its last completed round and
ends with the records of an uninterrupted run — no record lost, none duplicated, the attacks
that were queued but not finished run again."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedsim.run.cli import main

ROOT = Path(__file__).resolve().parents[1]
FEDSIM = [sys.executable, "-m", "fedsim.run.cli"]

SCENARIO = """
name = "resume"
seed = 2
[data]
train_examples = 300
test_examples = 100
image_size = 16
examples_per_client = 4
[model]
width = 8
[federation]
num_clients = 6
clients_per_round = 3
rounds = 5
[training]
batch_size = 2
max_steps = 1
lr = 0.05
[attack]
attacks = ["geiping"]
rounds = [1, 2, 3]
clients = []
[attack.geiping]
iterations = 200
"""


def _records(run: Path, name: str) -> list[dict]:
    out = []
    for line in (run / name).read_text().splitlines():
        record = json.loads(line)
        record.pop("seconds")
        record.pop("ended_at", None)
        record.get("extras", {}).pop("seconds", None)
        out.append(record)
    return sorted(out, key=lambda r: (r["round"], r.get("client", -1), r.get("attack", "")))


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_records_of_an_uninterrupted_one(tmp_path):
    path = tmp_path / "resume.toml"
    path.write_text(SCENARIO)
    full, cut = tmp_path / "full", tmp_path / "cut"
    subprocess.run([*FEDSIM, "run", str(path), "--out", str(full), "--quiet"], check=True, cwd=ROOT,
                   capture_output=True, timeout=600)
    proc = subprocess.Popen([*FEDSIM, "run", str(path), "--out", str(cut), "--quiet"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    rounds = cut / "rounds.jsonl"
    deadline = time.monotonic() + 300
    while not (rounds.exists() and len(rounds.read_text().splitlines()) >= 2):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    cut_rounds = len(rounds.read_text().splitlines())
    assert cut_rounds < 5 and list((cut / "pending").glob("*.pt"))  # attacks were still queued
    done = subprocess.run([*FEDSIM, "run", "--resume", str(cut), "--quiet"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _records(cut, "rounds.jsonl") == _records(full, "rounds.jsonl")
    assert _records(cut, "leakage.jsonl") == _records(full, "leakage.jsonl")  # 9 jobs, none twice
    assert len(_records(cut, "leakage.jsonl")) == 9 and not (cut / "pending").exists()
    assert json.loads((cut / "summary.json").read_text())["status"] == "completed"


def test_resume_refuses_what_it_cannot_continue(tmp_path, capsys):
    path = tmp_path / "s.toml"
    path.write_text("")
    cases = [
        (["run", "--resume", str(tmp_path)], "not a run directory (no scenario.toml)"),
        (["run", str(path), "--resume", str(tmp_path)], "not both"),
        (["run"], "give a SCENARIO to run, or --resume RUN_DIR"),
        (["run", "--resume", str(tmp_path), "--out", str(tmp_path / "x")], "leave --out out"),
    ]
    for argv, fragment in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and fragment in err, (argv, err)
    finished = tmp_path / "finished"
    finished.mkdir()
    (finished / "scenario.toml").write_text("[federation]\nrounds = 1\n")
    from fedsim.rundir import RunDirectory
    from server.checkpoint import Checkpoint

    Checkpoint(1, {}, {}).save(RunDirectory(finished))
    assert main(["run", "--resume", str(finished)]) == 2
    assert "all 1 rounds are done; nothing to resume" in capsys.readouterr().err
