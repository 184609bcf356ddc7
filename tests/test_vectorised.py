"""Vectorised Geiping: J jobs × R restarts in one objective call and one descent, and the Ray
pool's grouping of compatible queued jobs into one launch — each problem as if attacked alone.

Fast (seconds) on 16x16 photos and a small ConvNet with BatchNorm (each restart must keep its own
batch statistics); the throughput figures are in ``benchmarks/attack_throughput.py``.
"""
from __future__ import annotations

import shutil
import warnings
from collections import deque
from dataclasses import replace

import pytest
import torch

from adversary.attacks import dlg, geiping
from adversary.attacks.base import AttackContext
from adversary.maths.matching import Matcher, descend_batch, descend_inputs
from adversary.maths.objectives import total_variation
from adversary.observation import GroundTruth
from adversary.runtime.execution import AttackJob
from adversary.runtime.workers import take_launch
from fedsim.data import load_data
from fedsim.scenario import DataSpec, ModelSpec, TrainingSpec
from helpers import client_update

SPEC = ModelSpec(name="convnet", width=4)
#: 2 examples, batches of 1, 2 epochs, momentum: 4 unrolled steps, each restart's BN statistics per step
UNROLLED = TrainingSpec(batch_size=1, epochs=2, lr=0.1, momentum=0.9, weight_decay=5e-4)


@pytest.fixture(scope="module")
def photos16():
    torch.set_num_threads(1)
    return load_data(DataSpec(train_examples=100, test_examples=10, image_size=16), seed=0)


def updates(photos, training: TrainingSpec, jobs: int, per_job: int):
    """``jobs`` clients' updates of the same θ_t (seed 0), different images each."""
    return [client_update(SPEC, photos.domain, photos.train_x[per_job * j:per_job * (j + 1)],
                          photos.train_y[per_job * j:per_job * (j + 1)], training, seed=0) for j in range(jobs)]


def test_values_equal_the_one_by_one_objective_and_gradient(photos16):
    """2 jobs × 3 restarts of the unrolled objective (4 steps, BN statistics compared): values and
    input gradients of the vmap-ed call equal the matcher called on each problem alone."""
    obs = updates(photos16, UNROLLED, jobs=2, per_job=2)
    matcher = Matcher(obs[0], torch.device("cpu"), "unroll", bn_weight=1.0)
    jobs = matcher.stack_targets(obs)
    labels = torch.stack([photos16.train_y[0:2], photos16.train_y[2:4]])
    x = torch.randn(2, 3, 2, *photos16.domain.shape, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    values = matcher.values(x, labels, jobs)
    (grad,) = torch.autograd.grad(values.sum(), x)
    values = values.detach()
    assert values.shape == (2, 3)
    for j, o in enumerate(obs):
        alone = Matcher(o, torch.device("cpu"), "unroll", bn_weight=1.0)
        for r in range(3):
            xr = x[j, r].detach().requires_grad_(True)
            value = alone(xr, labels[j])
            (g,) = torch.autograd.grad(value, xr)
            value = value.detach()
            assert float(values[j, r]) == pytest.approx(value.item(), rel=1e-5)
            assert torch.allclose(grad[j, r], g, rtol=1e-4, atol=1e-5 * float(g.abs().max()))
    # the jobs differ: job 1 scored against job 0's update gives other values
    assert not torch.allclose(values[1], matcher.values(x[1:], labels[1:])[0], rtol=1e-3)


def test_batched_descent_equals_one_descent_per_problem():
    """descend_batch over (2, 3) problems = descend_inputs on each (Adam is elementwise)."""
    target = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(1))
    start = torch.zeros(2, 3, 4, 5)
    batch = descend_batch(lambda x: (x - target).pow(2).sum(dim=(-2, -1)), start, iterations=40, lr=0.05,
                          problem_dims=2)
    assert batch.objectives.shape == (2, 3) and batch.steps == 40
    for j in range(2):
        for r in range(3):
            alone = descend_inputs(lambda x: (x - target[j, r]).pow(2).sum(), start[j, r], iterations=40, lr=0.05)
            assert torch.equal(batch.inputs[j, r], alone.inputs)
            assert float(batch.objectives[j, r]) == alone.objective


def test_restarts_descend_together_as_one_by_one(photos16):
    """Geiping, 3 restarts, 6 unsigned steps (signed steps turn float-rounding differences into
    different iterates): the vectorised restarts reach what the restarts one by one reach."""
    (obs,) = updates(photos16, TrainingSpec(batch_size=2, lr=0.1), jobs=1, per_job=2)
    params = replace(geiping.GeipingParams(), iterations=6, restarts=3, signed=False, lr=0.5)
    together = geiping.run(obs, params, AttackContext(seed=3))
    one_by_one = geiping.run(obs, replace(params, batch_restarts=False), AttackContext(seed=3))
    assert together.extras["restart_objectives"] == pytest.approx(one_by_one.extras["restart_objectives"], rel=1e-5)
    assert len(set(together.extras["restart_objectives"])) == 3  # three different starts
    assert torch.allclose(together.inputs, one_by_one.inputs, atol=1e-4)
    assert together.iterations == one_by_one.iterations == 18


def test_jobs_in_one_launch_equal_each_attacked_alone(photos16):
    """Two clients' updates of one round in one run_many: each job's reconstruction, labels and
    objectives are those of attacking it alone with its own seed."""
    obs = updates(photos16, TrainingSpec(batch_size=1, lr=0.1), jobs=2, per_job=1)
    params = replace(geiping.GeipingParams(), iterations=15, restarts=2)
    together = geiping.run_many(obs, params, [AttackContext(seed=5), AttackContext(seed=6)])
    for o, seed, rec in zip(obs, (5, 6), together):
        alone = geiping.run(o, params, AttackContext(seed=seed))
        assert rec.extras["jobs_in_launch"] == 2 and alone.extras["jobs_in_launch"] == 1
        assert rec.labels.tolist() == alone.labels.tolist()
        assert rec.extras["restart_objectives"] == pytest.approx(alone.extras["restart_objectives"], rel=1e-4)
        assert torch.allclose(rec.inputs, alone.inputs, atol=1e-4)
    assert not torch.allclose(together[0].inputs, together[1].inputs)


def test_incompatible_observation_is_refused(photos16):
    obs = updates(photos16, TrainingSpec(batch_size=1, lr=0.1), jobs=1, per_job=1)[0]
    other = client_update(SPEC, photos16.domain, photos16.train_x[:1], photos16.train_y[:1],
                          TrainingSpec(batch_size=1, lr=0.1), seed=1)  # another θ_t
    matcher = Matcher(obs, torch.device("cpu"), "unroll")
    with pytest.raises(ValueError, match="not compatible"):
        matcher.targets_of(other)


def test_pool_takes_compatible_queued_jobs_together(photos16):
    """take_launch: the next job plus later ones with its key, up to batch_jobs; DLG (no key),
    another round and another config stay queued in order."""
    obs = updates(photos16, TrainingSpec(batch_size=1, lr=0.1), jobs=3, per_job=1)
    params = geiping.GeipingParams()
    truth = GroundTruth(photos16.train_x[:1], photos16.train_y[:1], [(0,)])

    def job(i, o, attack="geiping", p=params):
        return AttackJob(i, attack, p, o, truth, "none", 20.0, 60.0, i)

    queue = deque([job(0, obs[0]), job(1, obs[1], "dlg", dlg.DLGParams()), job(2, replace(obs[1], server_round=2)),
                   job(3, obs[1]), job(4, obs[2], p=replace(params, iterations=5)), job(5, obs[2])])
    assert [j.job_id for j in take_launch(queue, 8)] == [0, 3, 5]
    assert [j.job_id for j in queue] == [1, 2, 4]
    assert [j.job_id for j in take_launch(queue, 8)] == [1]  # DLG runs alone
    queue = deque([job(0, obs[0]), job(1, obs[1]), job(2, obs[2])])
    assert [j.job_id for j in take_launch(queue, 2)] == [0, 1] and [j.job_id for j in queue] == [2]
    queue = deque([job(0, obs[0]), job(1, obs[1])])
    assert [j.job_id for j in take_launch(queue, 1)] == [0]
    one_by_one = replace(params, batch_restarts=False)
    queue = deque([job(0, obs[0], p=one_by_one), job(1, obs[1], p=one_by_one)])
    assert [j.job_id for j in take_launch(queue, 8)] == [0]


# --------------------------------------------------------------------------- compile = true

def test_failed_compile_falls_back_to_the_function_with_one_warning(monkeypatch):
    def broken(_function):
        def call(*_args):
            raise RuntimeError("no C++ compiler found\nsecond line")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    objective = geiping.compiled(lambda x: x.pow(2).sum())
    x = torch.arange(3.0)
    with pytest.warns(RuntimeWarning, match=r"torch.compile failed \(RuntimeError: no C\+\+ compiler found\)"):
        assert objective(x).item() == 5.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fallback is remembered: no second warning
        assert objective(x).item() == 5.0


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile's CPU backend needs a C++ compiler")
def test_compiled_attack_equals_the_eager_one_across_rounds(photos16):
    """compile = true on two updates with different θ_t (seeds 0 and 1) and images, one by one and
    3 restarts vectorised: the same objective and iterate after 2 steps as the eager attack, and
    graphs were compiled (the second update is right whether its compiled code is reused or
    rebuilt: nothing of the first update is baked in)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    x, y = photos16.train_x, photos16.train_y
    observations = [client_update(SPEC, photos16.domain, x[2 * s:2 * s + 2], y[2 * s:2 * s + 2],
                                  TrainingSpec(batch_size=2, lr=0.1), seed=s) for s in (0, 1)]
    for restarts, batch in ((1, False), (3, True)):
        params = replace(geiping.GeipingParams(), iterations=2, restarts=restarts, batch_restarts=batch)
        for obs in observations:
            eager = geiping.run(obs, params, AttackContext(seed=0))
            fast = geiping.run(obs, replace(params, compile=True), AttackContext(seed=0))
            assert fast.objective == pytest.approx(eager.objective, rel=1e-4, abs=1e-6)
            torch.testing.assert_close(fast.inputs, eager.inputs, rtol=0, atol=1e-4)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
