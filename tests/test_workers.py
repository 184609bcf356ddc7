"""The Ray inversion pool: one leakage record per planned attack, images on disk, and a
killed worker becomes a failed record without losing anything else."""
import json
import time
from collections import deque

import pytest
import ray
import torch

from adversary.runtime.execution import AttackJob
from adversary.runtime.memory import ReconstructionMemory
from adversary.runtime.workers import InversionPool, take_launch
from fedsim.run.cli import main
from fedsim.rundir import LEAKAGE, RunDirectory
from fedsim.run.single_shot import observe_first_update
from fedsim.run.ray_cluster import start_ray
from fedsim.run.preparation import make_sink, prepare_run

SCENARIO = """
name = "pool"
seed = 5
[data]
train_examples = 200
test_examples = 100
image_size = 16
examples_per_client = 8
[model]
name = "convnet"
width = 4
[federation]
num_clients = 4
clients_per_round = 2
rounds = 2
[training]
batch_size = 1
max_steps = 1
lr = 0.1
[attack]
attacks = ["geiping", "dlg"]
rounds = [1]
clients = []
pool_size = 2
[attack.geiping]
iterations = {geiping_iterations}
[attack.dlg]
iterations = 5
"""


def test_run_with_attack_plan_writes_one_record_per_planned_attack(tmp_path):
    path = tmp_path / "pool.toml"
    path.write_text(SCENARIO.format(geiping_iterations=30))
    assert main(["run", str(path), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / LEAKAGE).read_text().splitlines()]
    rounds = [json.loads(line) for line in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    sampled = rounds[0]["clients"]
    assert sorted((r["client"], r["attack"]) for r in records) == sorted(
        (c, a) for c in sampled for a in ("dlg", "geiping"))
    for r in records:
        assert r["status"] == "ok" and r["round"] == 1 and r["num_images"] == 1
        assert r["psnr_mean"] is not None and 0 < r["ssim_mean"] <= 1 and r["label_acc"] == 1.0
        assert (tmp_path / "run" / r["image"]).stat().st_size > 0


@pytest.fixture
def ray_session():
    start_ray(None, 2)
    yield
    ray.shutdown()


def test_killed_worker_yields_failed_record_and_nothing_else_is_lost(tmp_path, ray_session):
    path = tmp_path / "pool.toml"
    path.write_text(SCENARIO.format(geiping_iterations=100000))
    setup = prepare_run(path, tmp_path / "run", show_progress=False)
    pool: InversionPool = make_sink(setup)
    observation, truth = observe_first_update(setup.scenario, setup.splits, client=0)
    pool.submit(observation, truth)  # geiping (long) and dlg (short)
    deadline = time.monotonic() + 120
    while not pool.kill_worker_running(job_id=0):
        assert time.monotonic() < deadline, "geiping job never started"
        time.sleep(0.2)
    pool.close()
    records = RunDirectory(tmp_path / "run").read(LEAKAGE)
    by_attack = {r["attack"]: r for r in records}
    assert set(by_attack) == {"geiping", "dlg"}
    assert by_attack["geiping"]["status"] == "failed" and "worker died" in by_attack["geiping"]["error"]
    assert by_attack["dlg"]["status"] == "ok"


def test_compatible_queued_jobs_run_in_one_launch(tmp_path, ray_session):
    """Three clients' round-1 updates queued while the only worker is out: with batch_jobs = 3
    they go to one launch (one vectorised Geiping descent) and each gets its own ok record."""
    path = tmp_path / "pool.toml"
    text = SCENARIO.format(geiping_iterations=30).replace('attacks = ["geiping", "dlg"]', 'attacks = ["geiping"]')
    path.write_text(text.replace("pool_size = 2", "pool_size = 1\nbatch_jobs = 3"))
    setup = prepare_run(path, tmp_path / "run", show_progress=False)
    pool: InversionPool = make_sink(setup)
    with pool.lock:
        actor = pool.idle.pop()
    for client in range(3):
        pool.submit(*observe_first_update(setup.scenario, setup.splits, client=client))
    assert len(pool.queue) == 3
    with pool.lock:
        pool.idle.append(actor)
        pool._dispatch()
        assert len(pool.running) == 1 and not pool.queue
    pool.close()
    records = RunDirectory(tmp_path / "run").read(LEAKAGE)
    assert sorted(r["client"] for r in records) == [0, 1, 2]
    assert all(r["status"] == "ok" and r["extras"]["jobs_in_launch"] == 3 for r in records)
    assert len({tuple(r["psnr"]) for r in records}) == 3


def test_reconstruction_memory_gives_the_latest_earlier_round_and_prefers_the_plans_first_attack():
    memory = ReconstructionMemory(("spear", "geiping"))
    geiping_r1, spear_r1, spear_r2 = torch.full((2, 1), 1.0), torch.full((2, 1), 2.0), torch.full((2, 1), 3.0)
    memory.record(1, 0, "geiping", geiping_r1)
    memory.record(1, 0, "spear", spear_r1)  # finished later, but listed first in the plan
    memory.record(1, 0, "geiping", geiping_r1)
    assert memory.prior_for(1, 0) is None and memory.prior_for(2, 1) is None
    round_, prior = memory.prior_for(2, 0)
    assert round_ == 1 and torch.equal(prior, spear_r1)
    memory.record(2, 0, "spear", spear_r2)
    assert memory.prior_for(2, 0)[0] == 1  # a round-2 job never sees round 2
    assert memory.prior_for(3, 0)[0] == 2 and list(memory.rounds[0]) == [2]  # round 1 forgotten


def test_take_launch_skips_jobs_that_are_not_ready_and_keeps_the_order():
    jobs = deque(AttackJob(i, "dlg", None, None, None, "none", 20.0, 1.0, 0) for i in range(4))
    launch = take_launch(jobs, 1, ready=lambda job: job.job_id >= 2)
    assert [j.job_id for j in launch] == [2] and [j.job_id for j in jobs] == [0, 1, 3]
    assert take_launch(jobs, 1, ready=lambda job: False) == [] and len(jobs) == 3


PREVIOUS = """
name = "spear_previous"
seed = 3
[data]
dataset = "embedded_photos"
image_size = 16
examples_per_client = 12
[model]
name = "mlp"
hidden = [128]
[federation]
num_clients = 2
clients_per_round = 2
rounds = 2
[training]
batch_size = 12
max_steps = 1
lr = 0.1
[attack]
attacks = ["spear"]
rounds = [1, 2]
clients = []
pool_size = 2
[attack.spear]
guide = "previous"
"""


@pytest.mark.slow
def test_spear_guide_previous_gets_the_clients_round_1_reconstruction_in_round_2(tmp_path):
    """Both clients keep their 12 images: round 1 runs unguided (nothing earlier), round 2 is
    guided by round 1's exact reconstruction and needs far fewer submatrices."""
    path = tmp_path / "previous.toml"
    path.write_text(PREVIOUS)
    assert main(["run", str(path), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    records = {(r["round"], r["client"]): r for r in RunDirectory(tmp_path / "run").read(LEAKAGE)}
    assert sorted(records) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    for client in (0, 1):
        first, second = records[1, client], records[2, client]
        assert first["extras"]["guide_status"] == "no earlier reconstruction of this client"
        assert second["extras"]["guide_round"] == 1 and second["extras"]["guide_examples"] == 12
        assert second["extras"]["guided_samples"] > 0
        assert first["recovered_share"] == second["recovered_share"] == 1.0
        assert second["extras"]["samples"] < first["extras"]["samples"] / 2
