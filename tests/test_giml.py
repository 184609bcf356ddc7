"""GIML: the Reptile step of the meta-learner, and the run's sink that learns from every tapped
update and hands the ``giml`` jobs the generator saved after the previous round."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from adversary.attacks.giml import GimlParams
from adversary.maths.matching import attack_labels
from adversary.priors.checkpoint import load_prior, save_prior
from adversary.priors.giml import GimlSettings, MetaLearner
from adversary.priors.search import FlatWeights
from adversary.priors.training import untrained_generator
from adversary.runtime.giml import TASKS, GimlSink
from fedsim.data import load_data
from fedsim.rundir import RunDirectory
from fedsim.scenario import DataSpec, ModelSpec, TrainingSpec
from fedsim.seeding import derive_seed
from helpers import client_update

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SMALL = {"latent_dim": 8, "width": 4}


@pytest.fixture(scope="module")
def updates():
    """Three FedSGD updates of 2 photos each (16x16, ConvNet width 4), rounds 1, 1, 2."""
    photos = load_data(DataSpec(train_examples=40, test_examples=10, image_size=16), seed=0)
    out = []
    for k, server_round in enumerate((1, 1, 2)):
        obs = client_update(ModelSpec(name="convnet", width=4), photos.domain, photos.train_x[2 * k:2 * k + 2],
                            photos.train_y[2 * k:2 * k + 2], TrainingSpec(batch_size=2, lr=0.1), seed=k)
        out.append(replace(obs, server_round=server_round, client_id=k))
    return photos.domain, out


def _learner(domain, meta_lr: float) -> MetaLearner:
    settings = GimlSettings(latent_iterations=5, inner_steps=5, inner_lr=1e-2, meta_lr=meta_lr)
    return MetaLearner(untrained_generator(domain.shape, seed=0, **SMALL), settings, seed=0,
                       device=torch.device("cpu"))


def test_the_reptile_step_moves_the_generator_meta_lr_of_the_way(updates):
    """θ ← θ + ε(θ' − θ): ε = 1 lands on the inner result, ε = 0.25 a quarter of the way."""
    domain, observed = updates
    before = FlatWeights(_learner(domain, 1.0).generator).base
    moved = {}
    for meta_lr in (1.0, 0.25):
        learner = _learner(domain, meta_lr)
        task = learner.learn(observed[0])
        assert task.inner_objective < task.latent_objective  # the inner steps fit the task
        moved[meta_lr] = FlatWeights(learner.generator).base - before
    assert moved[1.0].abs().max() > 1e-3
    torch.testing.assert_close(moved[0.25], 0.25 * moved[1.0], atol=1e-6, rtol=1e-4)


def test_a_conditional_generator_learns_only_the_classes_of_the_update(updates):
    """GIML from a conditional generator asks it for the recovered labels: the weights that read
    the one-hot codes of the update's classes move, those of every other class stay put."""
    domain, observed = updates
    generator = untrained_generator(domain.shape, seed=0, num_classes=domain.num_classes, **SMALL)
    settings = GimlSettings(latent_iterations=5, inner_steps=5, inner_lr=1e-2, meta_lr=1.0)
    learner = MetaLearner(generator, settings, seed=0, device=torch.device("cpu"))
    codes = generator.net[0].weight[SMALL["latent_dim"]:].detach().clone()  # (classes, C', 4, 4)
    learner.learn(observed[0])
    moved = (generator.net[0].weight[SMALL["latent_dim"]:] - codes).flatten(1).abs().amax(1)
    seen = set(attack_labels(observed[0], 2)[0].tolist())
    assert 0 < len(seen) < domain.num_classes
    assert all((moved[c] > 1e-4) == (c in seen) for c in range(domain.num_classes)), (moved, seen)


class FakePool:
    def __init__(self):
        self.submitted = []
        self.closed = False

    def wants(self, server_round: int, client_id: int) -> bool:
        return client_id != 99

    def submit(self, observation, truth, params=None) -> None:
        self.submitted.append((observation.server_round, params["giml"].generator))

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None: ...


def test_the_sink_learns_from_every_update_and_saves_the_generator_per_round(updates, tmp_path):
    domain, observed = updates
    run_dir = RunDirectory.create(tmp_path / "run")
    params = GimlParams(meta_latent_iterations=5, inner_steps=5, inner_lr=1e-2, **SMALL)
    pool = FakePool()
    sink = GimlSink(pool, params, domain, run_dir, torch.device("cpu"), seed=0)
    assert sink.wants(1, 0) and not sink.wants(1, 99)
    for obs in observed:
        sink.submit(obs, None)
    sink.close()
    after_0, after_1, after_2 = (run_dir.path / "giml" / f"after_round_00{r}.pt" for r in (0, 1, 2))
    # round 1's jobs attack with the starting generator, round 2's with the one learned in round 1
    assert pool.submitted == [(1, str(after_0)), (1, str(after_0)), (2, str(after_1))] and pool.closed
    first, header1 = load_prior(after_1, domain.shape)
    last, header2 = load_prior(after_2, domain.shape)
    assert (header1.data["tasks"], header2.data["tasks"]) == (2, 3)
    start, header0 = load_prior(after_0, domain.shape)
    assert header0.data["tasks"] == 0 and header0.data["started_from"] == "untrained"
    untrained = untrained_generator(domain.shape, seed=derive_seed(0, "giml"), **SMALL)
    z = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.equal(start(z), untrained(z))
        assert (first(z) - start(z)).abs().max() > 1e-3 and (last(z) - first(z)).abs().max() > 1e-4
    tasks = run_dir.read(TASKS)
    assert [(t["server_round"], t["client_id"]) for t in tasks] == [(1, 0), (1, 1), (2, 2)]


def test_a_resumed_run_learns_what_an_uninterrupted_run_learns(updates, tmp_path):
    """A crash in round 2 after its first task, resumed after round 1's checkpoint: round 2's
    partial file and task lines are dropped, the re-queued round-1 update is attacked with the
    generator it had but not learned again, and the final generator is bit-identical."""
    domain, observed = updates
    params = GimlParams(meta_latent_iterations=5, inner_steps=5, inner_lr=1e-2, **SMALL)
    straight = RunDirectory.create(tmp_path / "straight")
    sink = GimlSink(FakePool(), params, domain, straight, torch.device("cpu"), seed=0)
    for obs in observed:
        sink.submit(obs, None)
    sink.close()

    crashed = RunDirectory.create(tmp_path / "crashed")
    sink = GimlSink(FakePool(), params, domain, crashed, torch.device("cpu"), seed=0)
    for obs in observed:  # round 2's task learned and saved; then the crash (no close)
        sink.submit(obs, None)
    pool = FakePool()
    resumed = GimlSink(pool, params, domain, crashed, torch.device("cpu"), seed=0, done_rounds=1)
    assert sorted(resumed.saved()) == [0, 1]
    assert [t["server_round"] for t in crashed.read(TASKS)] == [1, 1]
    resumed.submit(observed[1], None)  # a round-1 update whose attacks were not all recorded
    resumed.submit(observed[2], None)
    resumed.close()
    folder = crashed.path / "giml"
    assert pool.submitted == [(1, str(folder / "after_round_000.pt")), (2, str(folder / "after_round_001.pt"))]
    assert [(t["server_round"], t["client_id"]) for t in crashed.read(TASKS)] == [(1, 0), (1, 1), (2, 2)]
    mine, header = load_prior(folder / "after_round_002.pt", domain.shape)
    theirs, _ = load_prior(straight.path / "giml" / "after_round_002.pt", domain.shape)
    assert header.data["tasks"] == 3
    for a, b in zip(mine.state_dict().values(), theirs.state_dict().values()):
        assert torch.equal(a, b)


def test_the_sink_saves_a_checkpoint_prior_with_its_own_config(updates, tmp_path):
    """GIML started from a prior checkpoint (conditional, width 4 where GimlParams says 32) saves
    generators with the checkpoint's config, so they load and a resumed run continues from them."""
    domain, observed = updates
    prior = untrained_generator(domain.shape, seed=3, num_classes=domain.num_classes, **SMALL)
    config = {**SMALL, "num_classes": domain.num_classes}
    save_prior(tmp_path / "prior.pt", prior, config, {"split": "auxiliary"})
    params = GimlParams(generator=str(tmp_path / "prior.pt"), meta_latent_iterations=5, inner_steps=5, inner_lr=1e-2)
    assert params.width != SMALL["width"]
    run_dir = RunDirectory.create(tmp_path / "run")
    sink = GimlSink(FakePool(), params, domain, run_dir, torch.device("cpu"), seed=0)
    sink.submit(observed[0], None)
    start, header = load_prior(run_dir.path / "giml" / "after_round_000.pt", domain.shape)
    assert header.config == config
    z, labels = torch.randn(3, SMALL["latent_dim"]), torch.tensor([0, 1, 2])
    with torch.no_grad():
        assert torch.equal(start(z, labels), prior(z, labels))
    resumed = GimlSink(FakePool(), params, domain, run_dir, torch.device("cpu"), seed=0, done_rounds=1)
    assert resumed.config == config and resumed.learner.generator.num_classes == domain.num_classes
