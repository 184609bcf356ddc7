"""SPEAR: exact batch inversion through a linear+ReLU layer (adversary/attacks/spear/).

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

from adversary.attacks.spear import (REPLAY_TOL, SpearParams, estimate_batch_size, invert_observation, refine_images,
                                     replay_checker, replay_layer_gradients, spear_invert_linear)
from adversary.scoring.metrics import psnr
from adversary.maths.unroll import observed_gradient
from adversary.observation import Observation
from adversary.attacks.base import AttackContext
from adversary.runtime.registry import ATTACKS
from fedsim.domain import DataDomain
from fedsim.models import MLP, build_model, state_to_tensors
from fedsim.scenario import DataSpec, ModelSpec, TrainingSpec
from helpers import client_update


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # the search is vectorised


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


def _gaussian_gradients(b: int, dim: int, classes: int, hidden: int, seed: int):
    """Gradients of an MLP (dim -> hidden -> classes) on b Gaussian inputs with random labels:
    the inputs, the model and its first layer's ∂L/∂W, ∂L/∂b."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, dim, generator=gen)
    y = torch.randint(0, classes, (b,), generator=gen)
    return (x, *_mlp_gradients(x, y, classes, hidden=hidden, seed=seed))


def _matched_error(X: torch.Tensor, truth: torch.Tensor) -> float:
    """Max abs error after optimal matching of rows; inf if the counts differ."""
    X = X.double().flatten(1)
    truth = truth.double().flatten(1)
    if X.shape != truth.shape:
        return float("inf")
    rows, cols = linear_sum_assignment(torch.cdist(X, truth).numpy())
    return float((X[rows] - truth[cols]).abs().max())


# ----------------------------------------------------------------------------- exact recovery


def _invert_photo_batch(photos, b: int, seed: int, budget: float):
    """SPEAR with the layer weights on the FedSGD gradient of b photos: (photos, ∂L/∂W, result)."""
    x, y = _batch(photos, b, seed)
    model, gw, gb = _mlp_gradients(x, y, 10, seed=seed)
    layer = model.layers[0]
    res = spear_invert_linear(gw, gb, weight=layer.weight, bias=layer.bias, seed=seed,
                              params=SpearParams(time_budget_s=budget))
    return x, gw, res


@pytest.mark.parametrize("b,seed", [(4, 0), (8, 1)])
def test_exact_recovery_on_photos(photos, b, seed):
    x, gw, res = _invert_photo_batch(photos, b, seed, budget=60)
    assert res.status == "exact" and res.exact is True and res.mismatches == 0
    assert res.batch_size == b
    err = _matched_error(res.X, x)
    # measured: b=4 ~3e-8, b=8 ~7e-8 (float32 gradients)
    assert err <= 1e-4, err
    # δ = ∂L/∂Z is recovered too: G = Δᵀ X
    assert torch.allclose(res.delta.T @ res.X, gw.double(), atol=1e-6 * float(gw.abs().max()))


def test_exact_recovery_synthetic_gaussian():
    x, model, gw, gb = _gaussian_gradients(6, 120, 5, hidden=64, seed=3)
    res = spear_invert_linear(gw, gb, weight=model.layers[0].weight, bias=model.layers[0].bias,
                              params=SpearParams(time_budget_s=30))
    assert res.status == "exact"
    assert _matched_error(res.X, x) <= 1e-4


def test_generic_core_without_weights_is_exact_but_unverified():
    x, _, gw, gb = _gaussian_gradients(5, 100, 4, hidden=64, seed=5)
    res = spear_invert_linear(gw, gb, params=SpearParams(time_budget_s=30))
    assert res.status == "unverified" and res.exact is None
    assert _matched_error(res.X, x) <= 1e-4


# ----------------------------------------------------------------------------- batch size


@pytest.mark.parametrize("b", [1, 2, 3, 5, 8, 12])
def test_batch_size_from_numerical_rank(b):
    _, _, gw, _ = _gaussian_gradients(b, 48, 3, hidden=32, seed=b)
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
    x, _, gw, gb = _gaussian_gradients(6, 100, 4, hidden=64, seed=11)
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
    """A client's update on ``b`` photos from an MLP (seeded init), the photos, the untrained model."""
    x, y = _batch(photos, b, seed)
    spec = ModelSpec(name="mlp", hidden=hidden)
    obs = client_update(spec, photos[2], x, y, training, seed)
    model = build_model(spec, photos[2].shape, photos[2].num_classes)
    model.load_state_dict(obs.global_state)
    return obs, x, model


def test_registered_attack_runs_on_a_hand_built_observation(photos):
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


def test_fedavg_full_batch_epochs_are_inverted_and_replay_checked(photos):
    # 8 examples revisited for 5 full-batch epochs with momentum and weight decay: the first
    # layer's Σ_j a_j g_j is still rank 8 and each column vanishes where its example stayed
    # inactive in every step, so SPEAR is exact (measured error ~3e-6); replaying the local
    # training on the recovered batch confirms it ("consistent"). Without removing the
    # weight-decay part Δ is full rank and nothing is found.
    training = TrainingSpec(batch_size=8, epochs=5, lr=0.01, momentum=0.9, weight_decay=5e-4)
    obs, x, _ = _observation(photos, 8, 0, training)
    assert obs.num_steps == 5
    rec = ATTACKS["spear"].run(obs, SpearParams(time_budget_s=60), AttackContext(seed=0))
    assert rec.extras["status"] == "consistent" and rec.extras["estimated_batch_size"] == 8
    assert rec.extras["inconsistent_examples"] == []
    assert _matched_error(rec.inputs, x) <= 1e-4
    _, y = _batch(photos, 8, 0)
    assert sorted(rec.labels.tolist()) == sorted(y.tolist())


def test_fedavg_mini_batches_are_inverted_unverified(photos):
    # 6 steps of 4 over 3 epochs: still rank 8 with sparse columns, but the client's shuffle
    # hides which step used which example, so nothing can be replayed: "unverified". The
    # refinement leaves such a batch alone (with the attacker's schedule it would trade the
    # exact images for a better match of the wrong steps)
    training = TrainingSpec(batch_size=4, epochs=3, lr=0.01, momentum=0.9, weight_decay=5e-4)
    obs, x, _ = _observation(photos, 8, 1, training)
    assert obs.num_steps == 6
    rec = ATTACKS["spear"].run(obs, SpearParams(time_budget_s=60, refine_iterations=50), AttackContext(seed=0))
    assert rec.extras["status"] == "unverified" and rec.extras["inconsistent_examples"] is None
    assert rec.extras["refine"].startswith("skipped")
    assert _matched_error(rec.inputs, x) <= 1e-4


def test_replay_check_refuses_a_batch_with_spurious_directions(photos):
    # a multi-epoch update where the least sparse directions are hard to sample: the plain
    # greedy selection returns a batch with mixtures in it (measured error 1.4); the replay
    # check refuses it (every reported batch replays within 1e-3 per example)
    training = TrainingSpec(batch_size=8, epochs=5, lr=0.01, momentum=0.9, weight_decay=5e-4)
    obs, x, model = _observation(photos, 8, 12, training)
    grads = observed_gradient(obs, ["layers.0.weight", "layers.0.bias"])
    gw, gb = grads["layers.0.weight"], grads["layers.0.bias"]
    plain = spear_invert_linear(gw, gb, params=SpearParams(time_budget_s=10), seed=0)
    assert plain.status == "unverified" and _matched_error(plain.X, x) > 0.5
    checked = spear_invert_linear(gw, gb, params=SpearParams(time_budget_s=10), seed=0,
                                  checker=replay_checker(obs, model, "layers.0"))
    assert checked.status != "consistent"
    assert checked.X is None or checked.inconsistent


def test_replayed_columns_match_the_true_batch(photos):
    training = TrainingSpec(batch_size=8, epochs=10, lr=0.1, momentum=0.9, weight_decay=5e-4)
    obs, x, _ = _observation(photos, 8, 3, training)
    _, y = _batch(photos, 8, 3)
    grads = observed_gradient(obs, ["layers.0.weight"])["layers.0.weight"]
    columns = grads @ torch.linalg.pinv(x.flatten(1).double())  # (m, n): example i's column
    replayed = replay_layer_gradients(obs, "layers.0", x, y)
    rel = (replayed - columns.T).norm(dim=1) / columns.T.norm(dim=1)
    # measured 1.7e-4 at this lr x steps (the linear weight-decay drift of observed_gradient):
    # well inside the replay check's 1e-3
    assert float(rel.max()) < REPLAY_TOL / 3
    wrong = replay_layer_gradients(obs, "layers.0", x, (y + 1) % 10)
    assert float(((wrong - columns.T).norm(dim=1) / columns.T.norm(dim=1)).min()) > 1e-2


def test_slot_labels_are_exact_for_fedsgd(photos):
    obs, x, model = _observation(photos, 8, 4, TrainingSpec(batch_size=8, lr=0.1))
    _, y = _batch(photos, 8, 4)
    rec = ATTACKS["spear"].run(obs, SpearParams(time_budget_s=60), AttackContext(seed=0))
    assert rec.extras["status"] == "exact"
    rows, cols = linear_sum_assignment(torch.cdist(rec.inputs.flatten(1), x.flatten(1)).numpy())
    assert torch.equal(rec.labels[rows], y[cols])  # each image carries its own label


def test_refinement_repairs_only_the_flagged_images(photos):
    # the true batch of a 5-epoch full-batch update with two images replaced by noise: the
    # unrolled update-matching descent moves only those two, towards the truth
    training = TrainingSpec(batch_size=8, epochs=5, lr=0.01, momentum=0.9, weight_decay=5e-4)
    obs, x, _ = _observation(photos, 8, 0, training)
    _, y = _batch(photos, 8, 0)
    start = x.clone()
    start[[1, 5]] = torch.randn(2, *x.shape[1:], generator=torch.Generator().manual_seed(0))
    movable = torch.zeros(8, dtype=torch.bool)
    movable[[1, 5]] = True
    domain = photos[2]
    before = psnr(domain.to_unit(start), domain.to_unit(x))
    d = refine_images(obs, start, y, iterations=300, lr=0.1, tv_weight=0.0, bn_weight=1.0,
                      device=torch.device("cpu"), movable=movable)
    after = psnr(domain.to_unit(d.inputs), domain.to_unit(x))
    assert torch.equal(d.inputs[~movable], start[~movable])
    assert bool((after[movable] > before[movable] + 12.0).all()), (before, after)  # measured +43 and +17 dB


def test_convnet_head_features_seed_images(photos):
    # SPEAR on the hidden layer of a conv model's head: the 4 pooled feature vectors exactly,
    # each with its label; images fitted to them (feature_fit_iterations) carry the match
    domain = photos[2]
    x, y = _batch(photos, 4, 0)
    spec = ModelSpec(name="convnet", width=8, head=(64,))
    obs = client_update(spec, domain, x, y, TrainingSpec(batch_size=4, lr=0.1), 0)
    model = build_model(spec, domain.shape, domain.num_classes)
    model.load_state_dict(obs.global_state)
    captured = []
    model.classifier[0].register_forward_pre_hook(lambda mod, args: captured.append(args[0].detach()))
    model.train()
    model(x)
    features = captured[0]
    inv = invert_observation(obs, SpearParams(), AttackContext(seed=0))
    assert inv.layer == "classifier.0" and inv.result.status == "exact" and not inv.image_space
    assert _matched_error(inv.result.X, features) <= 1e-4
    only_features = ATTACKS["spear"].run(obs, SpearParams(), AttackContext(seed=0))
    assert only_features.inputs.shape[0] == 0 and only_features.extras["features_recovered"] == 4
    rec = ATTACKS["spear"].run(obs, SpearParams(feature_fit_iterations=300), AttackContext(seed=0))
    assert rec.inputs.shape == x.shape and sorted(rec.labels.tolist()) == sorted(y.tolist())
    assert rec.extras["feature_fit_objective"] < 0.01  # measured 2e-3: ‖F(x) − f‖² / ‖f‖²
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    lo, hi = domain.bounds(noise)
    noise = torch.maximum(torch.minimum(noise, hi), lo)
    rows, cols = linear_sum_assignment(torch.cdist(rec.inputs.flatten(1), x.flatten(1)).numpy())
    fitted = psnr(domain.to_unit(rec.inputs[rows]), domain.to_unit(x[cols]))
    # measured 14.1 dB against 9.4 for clipped noise: pooled 4x4 features hold less than the image
    assert float(fitted.mean()) > float(psnr(domain.to_unit(noise), domain.to_unit(x)).mean()) + 3.0


# ----------------------------------------------------------------------------- slow


@pytest.mark.slow
@pytest.mark.parametrize("b,seed", [(16, 0), (16, 1), (20, 0)])
def test_exact_recovery_large_batches(photos, b, seed):
    x, _, res = _invert_photo_batch(photos, b, seed, budget=300)
    assert res.status == "exact"
    assert _matched_error(res.X, x) <= 1e-4
