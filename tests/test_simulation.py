"""End to end through Flower + Ray: reproducible rounds, a failing client, and the tap."""
import json
from pathlib import Path

import pytest
import torch

from clients.app import client_partitions
from clients.training import train_locally
from defenses.registry import build_defense
from fedsim.models import build_model
from fedsim.seeding import generator
from fedsim.run.ray_cluster import start_ray
from fedsim.run.simulation import run_federation
from fedsim.run.preparation import prepare_run
from helpers import RecordingSink

TINY = """
name = "tiny"
seed = 3
[data]
train_examples = 200
test_examples = 100
image_size = 16
examples_per_client = 12
[model]
name = "convnet"
width = 4
[federation]
num_clients = 4
clients_per_round = 3
rounds = 2
failing_clients = [1]
[training]
epochs = 2
batch_size = 5
lr = 0.05
momentum = 0.9
weight_decay = 5e-4
"""


def _run(tmp_path: Path, name: str):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    start_ray(None, 0)
    setup = prepare_run(path, tmp_path / name, show_progress=False)
    setup.sink = RecordingSink()
    try:
        run_federation(setup)
    finally:
        import ray

        ray.shutdown()
    lines = (tmp_path / name / "rounds.jsonl").read_text().splitlines()
    return setup, [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sim")
    return _run(tmp, "a"), _run(tmp, "b")


def test_same_seed_gives_identical_rounds(two_runs):
    (_, first), (_, second) = two_runs
    assert len(first) == 2
    strip = lambda recs: [{k: v for k, v in r.items() if k not in ("seconds", "ended_at")} for r in recs]  # noqa: E731
    assert strip(first) == strip(second)
    assert all(0.0 <= r["test_accuracy"] <= 1.0 and r["train_loss"] > 0 for r in first)


def test_failing_client_is_recorded_and_round_completes(two_runs):
    (setup, records), _ = two_runs
    for rec in records:
        failed = [f["client"] for f in rec["failures"]]
        assert failed == ([1] if 1 in rec["clients"] else [])
        if failed:
            assert "fails by scenario" in rec["failures"][0]["error"]
    assert any(rec["failures"] for rec in records), "the seeded sampling should pick client 1 at least once"
    survivors = sum(len(r["clients"]) - len(r["failures"]) for r in records)
    assert len(setup.sink.taps) == survivors


def test_tapped_update_is_the_clients_real_update(two_runs):
    """The Observation's Δ equals local training replayed from θ_t, and the ground truth is
    exactly the batches the client used."""
    (setup, _), _ = two_runs
    obs, truth = setup.sink.taps[0]
    scenario = setup.scenario
    splits, parts = client_partitions(setup.scenario_text)
    index = parts[obs.client_id]
    model = build_model(scenario.model, splits.domain.shape, splits.domain.num_classes)
    model.load_state_dict(obs.global_state)
    rng = generator(scenario.seed, "client", obs.server_round, obs.client_id)
    result = train_locally(model, splits.train_x[index], splits.train_y[index], scenario.training,
                           obs.training.lr, rng, build_defense(scenario.defense, rng))
    for key, delta in result.update.items():
        assert torch.allclose(obs.update[key].float(), delta.float(), atol=1e-6), key
    assert obs.num_steps == 2 * 3 and obs.num_examples == 12
    assert len(truth.batches) == 6 and sorted({i for b in truth.batches for i in b}) == list(range(12))
    assert torch.equal(truth.inputs, splits.train_x[index][sorted({i for b in result.batches for i in b})])
    assert obs.labels is None and obs.defense is None  # not granted by this scenario
