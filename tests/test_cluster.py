"""``--ray-address`` on a cluster started the usual way (plain ``ray start --head``, no custom
resources): the attacked quickstart completes with the leakage of a local run, and a plan the
cluster cannot host is refused in one line before round 1."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
FEDSIM = [sys.executable, "-m", "fedsim.run.cli"]
RAY = Path(sys.executable).with_name("ray")

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not RAY.exists(), reason="the ray command is not installed")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A 2-CPU head node on loopback, started as a user would; stopped at the end."""
    port = _free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    temp = tmp_path_factory.mktemp("ray")
    subprocess.run([str(RAY), "start", "--head", "--num-cpus", "2", "--port", str(port), "--node-ip-address",
                    "127.0.0.1", "--include-dashboard=false", "--temp-dir", str(temp), "--disable-usage-stats"],
                   check=True, capture_output=True, env=env, timeout=120)
    yield f"127.0.0.1:{port}"
    # only this cluster's processes (they name its temp folder): 'ray stop' would end every Ray on
    # the machine, other runs included
    ours = [p for p in psutil.process_iter(["cmdline"]) if str(temp) in " ".join(p.info["cmdline"] or [])]
    for process in ours:
        process.terminate()
    _, alive = psutil.wait_procs(ours, timeout=20)
    for process in alive:
        process.kill()


def _leakage(run: Path) -> list[tuple]:
    records = [json.loads(line) for line in (run / "leakage.jsonl").read_text().splitlines()]
    return sorted((r["round"], r["client"], r["attack"], r["status"], round(r["psnr_mean"], 2)) for r in records)


def test_the_attacked_quickstart_runs_on_a_plain_cluster(cluster, tmp_path):
    local, remote = tmp_path / "local", tmp_path / "remote"
    scenario = str(ROOT / "scenarios" / "quickstart_attack.toml")
    subprocess.run([*FEDSIM, "run", scenario, "--out", str(local), "--quiet"], check=True, cwd=ROOT,
                   capture_output=True, timeout=600)
    proc = subprocess.run([*FEDSIM, "run", scenario, "--out", str(remote), "--quiet", "--ray-address", cluster],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rounds = [json.loads(line) for line in (remote / "rounds.jsonl").read_text().splitlines()]
    assert len(rounds) == 3 and json.loads((remote / "summary.json").read_text())["status"] == "completed"
    assert _leakage(remote) == _leakage(local) and _leakage(remote)[0][3] == "ok"


def test_a_plan_the_cluster_cannot_host_is_refused_in_one_line(cluster, tmp_path):
    path = tmp_path / "big.toml"
    path.write_text((ROOT / "scenarios" / "quickstart.toml").read_text() + "\n")
    text = path.read_text().replace("[federation]", "[federation]\nclient_cpus = 4.0", 1)
    assert "client_cpus = 4.0" in text
    path.write_text(text)
    started = time.monotonic()
    proc = subprocess.run([*FEDSIM, "run", str(path), "--out", str(tmp_path / "run"), "--ray-address", cluster],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and time.monotonic() - started < 60
    assert len(lines) == 1 and "federation.client_cpus = 4, but the largest node of the Ray cluster has 2 CPUs" in lines[0]
    assert "ray start --num-cpus 4" in lines[0] and not (tmp_path / "run").exists()
