"""SPEAR: exact batch inversion through a linear+ReLU layer (adversary/attacks/spear.py).

Realistic setting: MLP 3x32x32 -> 256 -> ReLU -> 10 with torch's default init, FedSGD
gradient of the batch-mean cross entropy, photos from the embedded data set
(``fedsim.data``; skimage crops if it is unavailable). Errors are measured after optimal
matching (Hungarian algorithm on pairwise distances).
"""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from adversary.attacks.spear import (SpearParams, estimate_batch_size, invert_observation, spear_fedavg,
                                     spear_invert_linear)
from adversary.observation import Observation
from adversary.registry import ATTACKS, AttackContext
from fedsim.domain import DataDomain
from fedsim.models import MLP, build_model, state_to_tensors
from fedsim.scenario import DataSpec, ModelSpec, TrainingSpec


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The search is vectorised; on shared cores one thread is fastest. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _skimage_crops(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fallback photos: random 32x32 crops of skimage sample images, normalised per channel."""
    from skimage import data as skd

    photos = [skd.astronaut(), skd.chelsea(), skd.coffee(), skd.rocket()]
    rng = np.random.default_rng(seed)
    crops, labels = [], []
    for k in range(count):
        c = int(rng.integers(len(photos)))
        img = photos[c]
        y0, x0 = rng.integers(0, img.shape[0] - 32), rng.integers(0, img.shape[1] - 32)
        crops.append(torch.from_numpy(img[y0:y0 + 32, x0:x0 + 32, :3].copy()).permute(2, 0, 1).float() / 255)
        labels.append(c)
    x = torch.stack(crops)
    x = (x - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), keepdim=True)
    return x, torch.tensor(labels)


@pytest.fixture(scope="module")
def photos() -> tuple[torch.Tensor, torch.Tensor, DataDomain]:
    try:
        from fedsim.data import load_data
    except ImportError:  # pragma: no cover - only before fedsim.data existed
        x, y = _skimage_crops(200, 0)
        return x, y, DataDomain((3, 32, 32), 10, (0.5,) * 3, (0.25,) * 3)
    splits = load_data(DataSpec(train_examples=200, test_examples=10), 0)
    return splits.train_x, splits.train_y, splits.domain


def _batch(photos, b: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y, _ = photos
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:b]
    return x[idx], y[idx]


def _mlp_gradients(x: torch.Tensor, y: torch.Tensor, num_classes: int, hidden: int = 256, seed: int = 0):
    torch.manual_seed(seed)
    model = MLP(x[0].numel(), num_classes, (hidden,))
    loss = F.cross_entropy(model(x), y)
    gw, gb = torch.autograd.grad(loss, [model.layers[0].weight, model.layers[0].bias])
    return model, gw, gb


def _matched_error(X: torch.Tensor, truth: torch.Tensor) -> float:
    """Max abs error after optimal matching of rows; inf if the counts differ."""
    X = X.double().flatten(1)
    truth = truth.double().flatten(1)
    if X.shape != truth.shape:
        return float("inf")
    rows, cols = linear_sum_assignment(torch.cdist(X, truth).numpy())
    return float((X[rows] - truth[cols]).abs().max())


# ----------------------------------------------------------------------------- exact recovery


@pytest.mark.parametrize("b,seed", [(4, 0), (8, 1)])
def test_exact_recovery_on_photos(photos, b, seed):
    x, y = _batch(photos, b, seed)
    model, gw, gb = _mlp_gradients(x, y, 10, seed=seed)
    layer = model.layers[0]
    res = spear_invert_linear(gw, gb, weight=layer.weight, bias=layer.bias, seed=seed,
                              params=SpearParams(time_budget_s=60))
    assert res.status == "exact" and res.exact is True and res.mismatches == 0
    assert res.batch_size == b
    err = _matched_error(res.X, x)
    # measured: b=4 ~3e-8, b=8 ~7e-8 (float32 gradients)
    assert err <= 1e-4, err
    # δ = ∂L/∂Z is recovered too: G = Δᵀ X
    assert torch.allclose(res.delta.T @ res.X, gw.double(), atol=1e-6 * float(gw.abs().max()))


def test_exact_recovery_synthetic_gaussian():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 120, generator=gen)
    y = torch.randint(0, 5, (6,), generator=gen)
    model, gw, gb = _mlp_gradients(x, y, 5, hidden=64, seed=3)
    res = spear_invert_linear(gw, gb, weight=model.layers[0].weight, bias=model.layers[0].bias,
                              params=SpearParams(time_budget_s=30))
    assert res.status == "exact"
    assert _matched_error(res.X, x) <= 1e-4


def test_generic_core_without_weights_is_exact_but_unverified():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(5, 100, generator=gen)
    y = torch.randint(0, 4, (5,), generator=gen)
    _, gw, gb = _mlp_gradients(x, y, 4, hidden=64, seed=5)
    res = spear_invert_linear(gw, gb, params=SpearParams(time_budget_s=30))
    assert res.status == "unverified" and res.exact is None
    assert _matched_error(res.X, x) <= 1e-4


# ----------------------------------------------------------------------------- batch size


@pytest.mark.parametrize("b", [1, 2, 3, 5, 8, 12])
def test_batch_size_from_numerical_rank(b):
    gen = torch.Generator().manual_seed(b)
    x = torch.randn(b, 48, generator=gen)
    y = torch.randint(0, 3, (b,), generator=gen)
    _, gw, _ = _mlp_gradients(x, y, 3, hidden=32, seed=b)
    assert estimate_batch_size(torch.linalg.svdvals(gw.double())) == b


def test_batch_size_estimate_on_photos(photos):
    for b in (10, 16, 25):
        x, y = _batch(photos, b, b)
        _, gw, _ = _mlp_gradients(x, y, 10, seed=b)
        assert estimate_batch_size(torch.linalg.svdvals(gw.double())) == b
    # b = 1: exact in one step (no search)
    x, y = _batch(photos, 1, 0)
    model, gw, gb = _mlp_gradients(x, y, 10)
    res = spear_invert_linear(gw, gb, weight=model.layers[0].weight, bias=model.layers[0].bias)
    assert res.batch_size == 1 and res.status == "exact"
    assert _matched_error(res.X, x) <= 1e-4


# ----------------------------------------------------------------------------- the sparsity filter matters


def test_without_sparsity_filter_the_reconstruction_is_wrong():
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(6, 100, generator=gen)
    y = torch.randint(0, 4, (6,), generator=gen)
    _, gw, gb = _mlp_gradients(x, y, 4, hidden=64, seed=11)
    # generic core (no weights, so no realisability/ReLU checks): the filter is what separates
    with_filter = spear_invert_linear(gw, gb, params=SpearParams(time_budget_s=30), seed=0)
    assert _matched_error(with_filter.X, x) <= 1e-4
    no_filter = spear_invert_linear(gw, gb, params=SpearParams(sparsity_threshold=0.0, time_budget_s=30), seed=0)
    assert no_filter.X is not None and no_filter.X.shape == x.shape
    # every sampled null vector is accepted: b random directions, a wrong batch
    assert _matched_error(no_filter.X, x) > 0.5


# ----------------------------------------------------------------------------- honest failure


def test_budget_exhaustion_is_reported(photos):
    x, y = _batch(photos, 20, 7)
    model, gw, gb = _mlp_gradients(x, y, 10, seed=7)
    layer = model.layers[0]
    res = spear_invert_linear(gw, gb, weight=layer.weight, bias=layer.bias, params=SpearParams(max_samples=1))
    assert res.status == "failed: budget exhausted (samples)"
    assert res.X is None and res.exact is not True and res.samples >= 1 and res.batch_size == 20
    res = spear_invert_linear(gw, gb, weight=layer.weight, bias=layer.bias, deadline=time.monotonic() - 1)
    assert res.status == "failed: budget exhausted (time)" and res.X is None and res.samples == 0


# ----------------------------------------------------------------------------- registered attack


def _observation(photos, b: int, seed: int, training: TrainingSpec, hidden=(256,)):
    x, y = _batch(photos, b, seed)
    domain = photos[2]
    spec = ModelSpec(name="mlp", hidden=hidden)
    torch.manual_seed(seed)
    model = build_model(spec, domain.shape, domain.num_classes)
    before = state_to_tensors(model)
    opt = torch.optim.SGD(model.parameters(), lr=training.lr, momentum=training.momentum,
                          weight_decay=training.weight_decay, nesterov=training.nesterov)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    after = state_to_tensors(model)
    update = {k: after[k] - before[k] for k in before}
    obs = Observation(server_round=1, client_id=0, model=spec, domain=domain, global_state=before,
                      update=update, training=training, num_examples=b, num_steps=1)
    return obs, x, model


def test_registered_attack_runs_on_a_hand_built_observation(photos):
    import adversary.attacks.spear  # noqa: F401  (registers "spear")

    entry = ATTACKS["spear"]
    assert entry.params_type is SpearParams
    training = TrainingSpec(batch_size=6, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    obs, x, _ = _observation(photos, 6, 2, training)
    reports = []
    ctx = AttackContext(seed=0, deadline=time.monotonic() + 60, progress=lambda i, t, o: reports.append(i))
    rec = entry.run(obs, SpearParams(), ctx)
    assert rec.inputs.shape == (6, 3, 32, 32)
    # SPEAR needs no labels; run() reports the last layer's label recovery (one per image)
    assert rec.labels.shape == (6,)
    assert rec.extras["status"] == "exact" and rec.extras["estimated_batch_size"] == 6
    assert rec.extras["feature_space"] is False and rec.extras["layer"] == "layers.0"
    assert rec.iterations == rec.extras["samples"] > 0 and reports
    assert rec.objective < 1e-6
    assert _matched_error(rec.inputs, x) <= 1e-4


def test_registered_attack_reports_failure_without_inputs(photos):
    obs, _, _ = _observation(photos, 20, 7, TrainingSpec(batch_size=20, lr=0.1))
    rec = ATTACKS["spear"].run(obs, SpearParams(max_samples=1), AttackContext(seed=0))
    assert rec.extras["status"] == "failed: budget exhausted (samples)"
    assert rec.inputs.shape == (0, 3, 32, 32) and rec.labels is None
    assert rec.extras["estimated_batch_size"] == 20 and rec.extras["samples"] >= 1


def test_feature_space_layer(photos):
    training = TrainingSpec(batch_size=5, lr=0.05)
    obs, x, model = _observation(photos, 5, 4, training, hidden=(128, 64))
    params = SpearParams(layer="layers.2")
    rec = ATTACKS["spear"].run(obs, params, AttackContext(seed=0))
    assert rec.inputs.shape[0] == 0 and rec.extras["feature_space"] is True
    assert rec.extras["status"] == "exact" and rec.extras["features_recovered"] == 5
    inv = invert_observation(obs, params, AttackContext(seed=0))
    model.load_state_dict(obs.global_state)
    with torch.no_grad():
        features = torch.relu(model.layers[0](x.flatten(1)))
    assert _matched_error(inv.result.X, features) <= 1e-4


def test_output_layer_is_refused(photos):
    domain = photos[2]
    spec = ModelSpec(name="convnet", width=4)  # its only linear layer is the classifier
    state = state_to_tensors(build_model(spec, domain.shape, domain.num_classes))
    obs = Observation(server_round=1, client_id=0, model=spec, domain=domain, global_state=state,
                      update={k: torch.zeros_like(v) for k, v in state.items()}, training=TrainingSpec(),
                      num_examples=4, num_steps=1)
    rec = ATTACKS["spear"].run(obs, SpearParams(), AttackContext())
    assert rec.inputs.shape[0] == 0 and rec.extras["status"].startswith("failed: the layer is the output layer")


# ----------------------------------------------------------------------------- FedAvg extension


def test_fedavg_multi_step_update_without_weight_decay(photos):
    x, y = _batch(photos, 8, 9)
    torch.manual_seed(9)
    model = MLP(3 * 32 * 32, 10)
    theta = state_to_tensors(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(2):  # one epoch, two disjoint batches of 4
        opt.zero_grad()
        F.cross_entropy(model(x[4 * step:4 * step + 4]), y[4 * step:4 * step + 4]).backward()
        opt.step()
    after = state_to_tensors(model)
    dw = after["layers.0.weight"] - theta["layers.0.weight"]
    db = after["layers.0.bias"] - theta["layers.0.bias"]
    res = spear_fedavg(dw, db, theta["layers.0.weight"], theta["layers.0.bias"], lr=0.05, steps=2,
                       momentum=0.9, params=SpearParams(time_budget_s=60))
    assert res.batch_size == 8 and res.status == "unverified"
    assert _matched_error(res.X, x) <= 1e-4


# ----------------------------------------------------------------------------- slow


@pytest.mark.slow
@pytest.mark.parametrize("b,seed", [(16, 0), (16, 1), (20, 0)])
def test_exact_recovery_large_batches(photos, b, seed):
    x, y = _batch(photos, b, seed)
    model, gw, gb = _mlp_gradients(x, y, 10, seed=seed)
    layer = model.layers[0]
    res = spear_invert_linear(gw, gb, weight=layer.weight, bias=layer.bias, seed=seed,
                              params=SpearParams(time_budget_s=300))
    assert res.status == "exact"
    assert _matched_error(res.X, x) <= 1e-4
