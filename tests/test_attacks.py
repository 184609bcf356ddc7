"""Attack side of the adversary: unrolled local training, matching objectives, Geiping, DLG.

Fast (seconds each) on 16x16 embedded photos and small models; the full-size numbers are in
``benchmarks/geiping.py``.
"""
from __future__ import annotations

import copy
import itertools
import time
import typing
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from adversary.attacks import dlg, geiping
from adversary.scoring.metrics import psnr
from adversary.maths.objectives import cosine_distance, l2_distance, layer_weights, total_variation
from adversary.observation import GroundTruth, Observation
from adversary.attacks.base import AttackContext
from adversary.runtime.registry import available_attacks, get_attack, resolve_attack_params
from adversary.maths.matching import descend_inputs
from adversary.maths.unroll import observed_gradient, step_coefficients, unroll_local_training
from fedsim.data import load_data
from fedsim.domain import DataDomain
from fedsim.models import build_model
from fedsim.scenario import DataSpec, ModelSpec, TrainingSpec
from fedsim.schedule import local_batches
from helpers import client_update

MULTISTEP = TrainingSpec(batch_size=2, epochs=5, lr=0.1, momentum=0.9, weight_decay=5e-4)


@pytest.fixture(scope="module")
def photos16():
    torch.set_num_threads(1)
    return load_data(DataSpec(train_examples=100, test_examples=10, image_size=16), seed=0)




def matched_psnr(domain: DataDomain, recon: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean PSNR on [0, 1] images under the best assignment (brute force, small batches)."""
    r, t = domain.to_unit(recon), domain.to_unit(truth)
    return max(psnr(r[list(p)], t).mean().item() for p in itertools.permutations(range(len(t))))


# --------------------------------------------------------------------------- unrolling

@pytest.mark.parametrize("nesterov", [False, True], ids=["momentum", "nesterov"])
@pytest.mark.parametrize("spec", [ModelSpec(name="convnet", width=4), ModelSpec(name="mlp", hidden=(16,))],
                         ids=["convnet", "mlp"])
def test_unroll_matches_torch_sgd(spec, nesterov):
    """5 steps (2 epochs of batches of 2 over 5 examples, capped), momentum 0.9, wd 5e-4, float64:
    the functional replay equals torch.optim.SGD on every parameter and BN running statistic."""
    torch.manual_seed(0)
    domain_shape = (3, 8, 8)
    model = build_model(spec, domain_shape, 5).double()
    x = torch.randn(5, *domain_shape, dtype=torch.float64)
    y = torch.randint(0, 5, (5,))
    training = TrainingSpec(lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=nesterov, batch_size=2, epochs=2,
                            max_steps=5)
    batches = local_batches(5, 2, 2, 5)
    assert len(batches) == 5 and len(batches[2]) == 1
    state = {k: v.clone() for k, v in model.state_dict().items()}

    ref = copy.deepcopy(model).train()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=nesterov)
    for idx in batches:
        opt.zero_grad()
        F.cross_entropy(ref(x[list(idx)]), y[list(idx)]).backward()
        opt.step()
    truth = {k: v - state[k] for k, v in ref.state_dict().items()}

    pred = unroll_local_training(model, state, x, y, training, batches, buffers=True)
    expected = {k for k in truth if not k.endswith("num_batches_tracked")}
    assert set(pred) == expected
    for k in expected:
        torch.testing.assert_close(pred[k], truth[k], rtol=0, atol=1e-6, msg=k)
    # the caller's model and state are untouched
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


def test_unroll_is_differentiable_in_inputs_and_soft_labels():
    torch.manual_seed(0)
    model = build_model(ModelSpec(name="mlp", hidden=(8,)), (1, 4, 4), 3).double()
    state = model.state_dict()
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    training = TrainingSpec(lr=0.1, momentum=0.9, batch_size=1, epochs=2)
    batches = local_batches(2, 1, 2)

    def f(x, logits):
        delta = unroll_local_training(model, state, x, logits, training, batches)
        return sum((d * d).sum() for d in delta.values())

    assert torch.autograd.gradcheck(f, (x, logits), eps=1e-6, atol=1e-5)


# --------------------------------------------------------------------------- objectives

def test_matching_losses():
    a = [torch.randn(3, 4), torch.randn(5)]
    assert cosine_distance(a, a).item() == pytest.approx(0.0, abs=1e-6)
    assert cosine_distance(a, [-t for t in a]).item() == pytest.approx(2.0, abs=1e-6)
    assert cosine_distance(a, [3 * t for t in a], per_layer=True).item() == pytest.approx(0.0, abs=1e-6)
    assert cosine_distance(a, [a[0], -a[1]], per_layer=True).item() == pytest.approx(2.0, abs=1e-6)
    # weight 0 on the second tensor makes its mismatch invisible
    assert cosine_distance(a, [a[0], -a[1]], weights=[1.0, 0.0]).item() == pytest.approx(0.0, abs=1e-6)
    b = [t + 1 for t in a]
    assert l2_distance(a, b).item() == pytest.approx(17.0)
    assert l2_distance(a, [2 * t for t in a], relative=True).item() == pytest.approx(0.5)  # 2 x 1/4
    assert layer_weights(4, "linear").tolist() == [1.0, 0.75, 0.5, 0.25]
    flat = torch.ones(2, 3, 8, 8)
    assert total_variation(flat).item() == 0.0
    stripes = torch.zeros(1, 1, 4, 4)
    stripes[..., 1::2] = 1.0  # |dx| = 1 everywhere, dy = 0
    assert total_variation(stripes).item() == pytest.approx(1.0)


def test_observed_gradient_removes_weight_decay_with_the_parameter_drift():
    """10 full-batch steps, momentum 0.9, wd 5e-4, lr 0.1: −Δ/lr − wd·Σ_j a_j θ_j recovers
    Σ_j a_j g_j; with θ_j ≈ θ_t + ((j − 1)/K)·Δ the residual (7e-5) is ~10x smaller than with θ_j ≈ θ_t."""
    torch.manual_seed(0)
    spec, shape = ModelSpec(name="mlp", hidden=(32,)), (3, 8, 8)
    training = TrainingSpec(batch_size=6, epochs=10, lr=0.1, momentum=0.9, weight_decay=5e-4)
    model = build_model(spec, shape, 4).double()
    x, y = torch.randn(6, *shape, dtype=torch.float64), torch.randint(0, 4, (6,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a = step_coefficients(10, 0.9, False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    truth = 0
    for j in range(10):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        truth = truth + a[j] * model.layers[0].weight.grad.clone()
        opt.step()
    update = {k: v - before[k] for k, v in model.state_dict().items()}
    obs = Observation(1, 0, spec, DataDomain(shape, 4, (0.5,) * 3, (0.25,) * 3), before, update, training, 6, 10)
    estimate = observed_gradient(obs, ["layers.0.weight"])["layers.0.weight"]
    no_drift = -update["layers.0.weight"] / 0.1 - 5e-4 * float(a.sum()) * before["layers.0.weight"]
    err = float((estimate - truth).norm() / truth.norm())
    assert err < 2e-4 and float((no_drift - truth).norm() / truth.norm()) > 5 * err


def test_descent_moves_only_the_movable_inputs():
    target = torch.randn(4, 3, 5, 5)
    start = torch.zeros(4, 3, 5, 5)
    movable = torch.tensor([True, False, True, False])
    d = descend_inputs(lambda x: (x - target).pow(2).sum(), start, iterations=200, lr=0.05, movable=movable)
    assert torch.equal(d.inputs[~movable], start[~movable])
    assert float((d.inputs[movable] - target[movable]).abs().max()) < 0.02
    assert d.steps == 200 and not d.stopped


# --------------------------------------------------------------------------- Geiping

def test_geiping_recovers_single_image(photos16):
    """b = 1, FedSGD, untrained ConvNet (width 16), 16x16 photos, 300 iterations: >= 18 dB median."""
    spec = ModelSpec(name="convnet", width=16)
    params = replace(geiping.GeipingParams(), iterations=300)
    scores = []
    for k in range(3):
        x, y = photos16.train_x[k:k + 1], photos16.train_y[k:k + 1]
        obs = client_update(spec, photos16.domain, x, y, TrainingSpec(batch_size=1, lr=0.1), seed=k)
        rec = geiping.run(obs, params, AttackContext(seed=k))
        assert rec.inputs.shape == x.shape and rec.iterations == 300
        assert rec.labels.tolist() == y.tolist()  # recovered, not granted
        assert rec.extras["label_source"] == "recovered" and not rec.extras["stopped_early"]
        lo, hi = photos16.domain.bounds(rec.inputs)
        assert bool(((rec.inputs >= lo - 1e-6) & (rec.inputs <= hi + 1e-6)).all())
        scores.append(matched_psnr(photos16.domain, rec.inputs, x))
    assert sorted(scores)[1] >= 18.0, scores


def test_unrolled_attack_beats_naive_on_multistep_update(photos16):
    """5 local steps (2 examples, batch 2, 5 epochs), momentum 0.9, wd 5e-4, MLP: modelling the
    local training beats treating Δ as one gradient, on every case, by a wide margin."""
    spec = ModelSpec(name="mlp", hidden=(64,))
    params = replace(geiping.GeipingParams(), iterations=300)
    for k in range(2):
        x, y = photos16.train_x[2 * k:2 * k + 2], photos16.train_y[2 * k:2 * k + 2]
        obs = client_update(spec, photos16.domain, x, y, MULTISTEP, seed=k)
        assert obs.num_steps == 5
        unrolled = geiping.run(obs, replace(params, multistep="unroll"), AttackContext(seed=k))
        naive = geiping.run(obs, replace(params, multistep="naive"), AttackContext(seed=k))
        assert unrolled.extras["mode"] == "unroll" and naive.extras["mode"] == "naive"
        p_unrolled = matched_psnr(photos16.domain, unrolled.inputs, x)
        p_naive = matched_psnr(photos16.domain, naive.inputs, x)
        assert p_unrolled > p_naive + 5.0, (p_unrolled, p_naive)
        assert p_unrolled >= 25.0


def test_geiping_uses_granted_labels_and_restarts(photos16):
    spec = ModelSpec(name="mlp", hidden=(32,))
    x, y = photos16.train_x[:2], photos16.train_y[:2]
    obs = client_update(spec, photos16.domain, x, y, TrainingSpec(batch_size=2, lr=0.1), seed=0)
    obs = replace(obs, labels=y.clone())
    calls = []
    ctx = AttackContext(seed=0, progress=lambda i, total, value: calls.append((i, total, value)))
    rec = geiping.run(obs, replace(geiping.GeipingParams(), iterations=20, restarts=3, report_every=10), ctx)
    assert rec.extras["label_source"] == "granted" and rec.labels.tolist() == y.tolist()
    assert rec.extras["restarts_done"] == 3 and rec.iterations == 60
    assert rec.objective == pytest.approx(min(rec.extras["restart_objectives"]))
    # the 3 restarts descend side by side: 3 restart-iterations per step, reported past each 10
    assert [c[0] for c in calls[:-1]] == [12, 21, 30, 42, 51, 60] and all(c[1] == 60 for c in calls)


@pytest.mark.parametrize("name", ["geiping", "dlg"])
def test_deadline_is_respected(photos16, name):
    spec = ModelSpec(name="convnet", width=8)
    x, y = photos16.train_x[:1], photos16.train_y[:1]
    obs = client_update(spec, photos16.domain, x, y, TrainingSpec(batch_size=1, lr=0.1), seed=0)
    entry = get_attack(name)
    params = replace(entry.params_type(), iterations=100_000)
    start = time.monotonic()
    rec = entry.run(obs, params, AttackContext(seed=0, deadline=start + 1.0))
    elapsed = time.monotonic() - start
    assert rec.extras["stopped_early"] is True
    assert elapsed < 8.0  # one step past the deadline at most, plus set-up
    assert 0 < rec.iterations < 100_000 and rec.inputs.shape == x.shape
    assert torch.isfinite(rec.inputs).all()


# --------------------------------------------------------------------------- DLG

def test_dlg_runs_and_beats_noise(photos16):
    """DLG (joint soft labels, L-BFGS) on a tiny MLP, b = 1: better than its random start."""
    spec = ModelSpec(name="mlp", hidden=(32,))
    x, y = photos16.train_x[:1], photos16.train_y[:1]
    obs = client_update(spec, photos16.domain, x, y, TrainingSpec(batch_size=1, lr=0.1), seed=0)
    params = replace(dlg.DLGParams(), iterations=15)
    rec = dlg.run(obs, params, AttackContext(seed=0))
    assert rec.inputs.shape == x.shape and rec.labels.shape == (1,)
    start = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    assert matched_psnr(photos16.domain, rec.inputs, x) > matched_psnr(photos16.domain, start, x) + 3.0
    rec2 = dlg.run(obs, replace(params, label_mode="recover", iterations=3), AttackContext(seed=0))
    assert rec2.labels.tolist() == y.tolist() and rec2.extras["label_source"] == "recovered"


# --------------------------------------------------------------------------- registry

def test_attacks_are_registered_with_validated_params():
    assert {"geiping", "dlg"} <= set(available_attacks())
    resolved = resolve_attack_params(("geiping", "dlg"), {"geiping": {"iterations": 10, "multistep": "naive"}},
                                     "x.toml")
    assert resolved["geiping"].iterations == 10 and resolved["dlg"] == dlg.DLGParams()
    from fedsim.config import ScenarioError

    with pytest.raises(ScenarioError, match="multistep"):
        resolve_attack_params(("geiping",), {"geiping": {"multistep": "sometimes"}}, "x.toml")
    with pytest.raises(ScenarioError, match="tv_weight"):
        resolve_attack_params(("geiping",), {"geiping": {"tv_weight": -1.0}}, "x.toml")
