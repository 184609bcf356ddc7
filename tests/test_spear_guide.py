"""SPEAR's prior-guided sampling (adversary/attacks/spear/guide.py): a guide that is wrong still
ends exact, a fair guide finds batches the uniform search cannot within the same budget, and
the constraint the found directions put on the missing examples is exact."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from adversary.attacks.base import AttackContext
from adversary.attacks.spear import SpearParams, spear_invert_linear
from adversary.attacks.spear.attack import next_linear
from adversary.attacks.spear.candidates import NEXT_LAYER_TOL, CandidatePool, next_layer_residual
from adversary.attacks.spear.guide import Guide, GuidedSampler, constrained_coordinates, independent_rows
from adversary.attacks.spear.problem import Problem, zero_pattern
from adversary.runtime.registry import ATTACKS
from fedsim.models import MLP
from fedsim.scenario import TrainingSpec
from test_spear import _matched_error, _observation, photos  # noqa: F401 - photos is a fixture

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _fedsgd(photos, b: int, seed: int):
    """(batch x, first layer, ∂L/∂W, ∂L/∂b, ∂L/∂Z) of MLP 3072 -> 256 -> 10 on b photos."""
    pool = photos[0]
    x = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:b]]
    y = torch.arange(b) % 10
    torch.manual_seed(seed)
    model = MLP(x[0].numel(), 10, (256,))
    layer = model.layers[0]
    z = layer(x.flatten(1))
    loss = F.cross_entropy(model.layers[2](torch.relu(z)), y)
    gw, gb, gz = torch.autograd.grad(loss, [layer.weight, layer.bias, z])
    return x, layer, gw, gb, gz


def _invert(x, layer, gw, gb, seed: int, guide_inputs: torch.Tensor | None, **params):
    guide = None if guide_inputs is None else Guide(guide_inputs.flatten(1), layer.weight.detach(),
                                                     layer.bias.detach())
    return spear_invert_linear(gw, gb, weight=layer.weight.detach(), bias=layer.bias.detach(), seed=seed,
                               params=SpearParams(**params), guide=guide)


def test_a_random_guide_still_ends_exact(photos):
    """Random images as the guide: its draws are wasted, the uniform search alongside finds the batch."""
    x, layer, gw, gb, _ = _fedsgd(photos, 10, 3)
    wrong = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    res = _invert(x, layer, gw, gb, 3, wrong, time_budget_s=60, guide_draws=512)
    assert res.status == "exact" and _matched_error(res.X, x) <= 1e-4
    assert 0 < res.guided_samples <= 10 * 512  # the cap per guide example bounds the guide's cost


def test_a_fair_guide_finds_what_the_uniform_search_cannot_in_the_same_budget(photos):
    """b = 20 needs ~4·10⁷ uniform submatrices (benchmark); within 2·10⁵ only the guided search
    (guide: the batch plus noise of std 0.5, i.e. about 13 dB) ends exact."""
    x, layer, gw, gb, _ = _fedsgd(photos, 20, 0)
    budget = dict(max_samples=200_000, time_budget_s=60)
    uniform = _invert(x, layer, gw, gb, 0, None, **budget)
    noisy = x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    guided = _invert(x, layer, gw, gb, 0, noisy, **budget)
    assert uniform.status.startswith("failed") and uniform.samples >= 200_000
    assert guided.status == "exact" and _matched_error(guided.X, x) <= 1e-4
    assert guided.samples < 200_000 and guided.guided_samples > 0


def test_found_directions_pin_the_missing_example(photos):
    """With every direction but example j's known, its coordinates (row j of Q⁻¹) are a single
    point, whatever the guide says; re-ranked there, the guide's most confident rows are j's zeros."""
    x, layer, gw, gb, gz = _fedsgd(photos, 8, 5)
    G = gw.double()
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    prob = Problem(G, gb, 8, layer.weight, layer.bias, U, S, Vh, SpearParams())
    Q = torch.linalg.lstsq(prob.L, gz.double().T).solution  # Δᵀ = L Q
    C = torch.linalg.inv(Q)  # rows: the examples' coordinates, x_i = c_i R
    j = 3
    found = torch.cat([Q[:, :j], Q[:, j + 1:]], 1)
    found = found / found.norm(dim=0)
    pinned = constrained_coordinates(prob, torch.randn(2, 8, dtype=torch.float64), found)
    assert torch.allclose(pinned, C[j].expand(2, 8), atol=1e-8 * float(C[j].norm()))
    sampler = GuidedSampler(prob, Guide(torch.randn(1, x[0].numel()), layer.weight, layer.bias), 16, 0)
    sampler.refine(list(found.T))
    inactive = (x[j].flatten().double() @ layer.weight.double().T + layer.bias.double() <= 0)[prob.live_idx]
    assert bool(inactive[sampler.top[0]].all())  # the b − 1 most confident rows


def test_fedavg_replay_path_takes_the_previous_rounds_images_as_guide(photos):
    """Several full-batch epochs (replay check instead of the ReLU check), guide = "previous"
    from ``Observation.prior``; without a prior the search runs unguided and says so."""
    training = TrainingSpec(batch_size=8, epochs=5, lr=0.01, momentum=0.9, weight_decay=5e-4)
    obs, x, _ = _observation(photos, 8, 0, training)
    prior = x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    params = SpearParams(guide="previous", time_budget_s=60)
    rec = ATTACKS["spear"].run(replace(obs, prior=prior), params, AttackContext(seed=0))
    assert rec.extras["status"] == "consistent" and rec.extras["guide"] == "previous"
    assert rec.extras["guided_samples"] > 0 and _matched_error(rec.inputs, x) <= 1e-4
    bare = ATTACKS["spear"].run(obs, params, AttackContext(seed=0))
    assert bare.extras["status"] == "consistent" and bare.extras["guided_samples"] == 0
    assert bare.extras["guide_status"] == "no earlier reconstruction of this client"


@pytest.mark.slow
def test_the_b25_scenario_is_recovered_exactly(tmp_path):
    """``fedsim attack scenarios/spear_mlp_b25.toml``: Geiping's guide, then the guided search."""
    from pathlib import Path

    from fedsim.run.single_shot import attack_once

    scenario = Path(__file__).resolve().parents[1] / "scenarios" / "spear_mlp_b25.toml"
    _, records = attack_once(scenario, tmp_path / "run", show_progress=False)
    (record,) = records
    assert record["extras"]["status"] == "exact" and record["recovered_share"] == 1.0
    assert record["extras"]["guide"] == "geiping"


def test_guided_draws_skip_rows_that_add_no_rank():
    """Look-alike photos share their most surely inactive rows, which span fewer than b − 1
    dimensions: a draw of the b − 1 best rows is degenerate. The draw skips rows inside the span of
    those before it and reaches down the ranking."""
    b = 20
    gen = torch.Generator().manual_seed(0)
    Lh = torch.randn(200, b, generator=gen, dtype=torch.float64)
    Lh[:30, :3] = 0.0  # the 30 best-ranked rows span 17 dimensions
    Lh = Lh / Lh.norm(dim=1, keepdim=True)
    order = torch.stack([torch.arange(200), torch.cat([torch.arange(30, 200), torch.arange(30)])])
    taken = independent_rows(Lh, order, b - 1)
    assert int(torch.linalg.matrix_rank(Lh[order[0, :b - 1]])) == 17  # the plain choice
    assert taken[0].tolist() == list(range(17)) + [30, 31]
    assert taken[1].tolist() == list(range(30, 30 + b - 1))  # full rank already: unchanged
    assert all(int(torch.linalg.matrix_rank(Lh[t])) == b - 1 for t in taken)


def test_next_layer_test_passes_true_directions_and_rejects_mixtures(photos):
    """δ_i = diag(z_i > 0) W_nextᵀ ∂L/∂y_i: a true direction is in the column space of W_nextᵀ on its
    nonzero rows (residual at float32 noise), a mixture of two examples is not."""
    x, layer, gw, gb, gz = _fedsgd(photos, 8, 5)
    torch.manual_seed(5)
    W2 = MLP(x[0].numel(), 10, (256,)).layers[2].weight.detach()  # the model _fedsgd built
    G = gw.double()
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    prob = Problem(G, gb, 8, layer.weight, layer.bias, U, S, Vh, SpearParams(), next_weight=W2)
    Q = torch.linalg.lstsq(prob.L, gz.double().T).solution
    Q = Q / Q.norm(dim=0)
    true = [next_layer_residual(prob, q, zero_pattern(prob, q, 1e-6)) for q in Q.T]
    mixed = (Q[:, 0] + Q[:, 1]) / (Q[:, 0] + Q[:, 1]).norm()
    assert max(true) < 1e-5
    assert next_layer_residual(prob, mixed, zero_pattern(prob, mixed, 1e-6)) > 0.3 > NEXT_LAYER_TOL


def test_next_linear_is_the_layer_fed_by_relu():
    model = MLP(3 * 32 * 32, 10, (256,))
    assert next_linear(model, model.layers[0], (3, 32, 32)) == "layers.2"
    assert next_linear(model, model.layers[2], (3, 32, 32)) is None  # the output layer feeds nothing


def _twins(photos, b: int = 8, eps: float = 0.02):
    """b photos where photo 1 is photo 0 plus noise of std ``eps`` (their zero sets differ in a
    few rows): (batch, model, problem with the next layer, unit true directions (b, b))."""
    pool = photos[0]
    x = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(0))[:b]].clone()
    x[1] = x[0] + eps * torch.randn(x[0].shape, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    model = MLP(x[0].numel(), 10, (256,))
    layer = model.layers[0]
    z = layer(x.flatten(1))
    loss = F.cross_entropy(model.layers[2](torch.relu(z)), torch.arange(b) % 10)
    gw, gb, gz = torch.autograd.grad(loss, [layer.weight, layer.bias, z])
    G = gw.double()
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    prob = Problem(G, gb, b, layer.weight, layer.bias, U, S, Vh, SpearParams(), next_weight=model.layers[2].weight)
    Q = torch.linalg.lstsq(prob.L, gz.double().T).solution
    return x, model, prob, Q / Q.norm(dim=0)


def test_a_near_twins_true_direction_is_kept_by_the_next_layer_test(photos):
    """Photos 0 and 1 differ in 2 zero rows: each direction's zero set rests on one row beyond the
    other's, which the single-row mixture test takes for a mixture. In the next layer's column
    space at float32 noise, the pool keeps it; without the next layer both twins are refused."""
    x, model, prob, Q = _twins(photos)
    with_next = CandidatePool(prob, SpearParams(), True, True)
    assert all(with_next.offer_direction(q) is not None for q in Q.T) and with_next.rejected_mixture == 0
    prob.next_weight = None
    without = CandidatePool(prob, SpearParams(), True, True)
    assert [without.offer_direction(q) is not None for q in Q.T][:2] == [False, False]
    assert without.rejected_mixture == 2


def test_a_twins_direction_does_not_cover_the_other_twin(photos):
    """The guide holds every photo but 1, and only photo 1's direction is found: photo 0, its twin,
    shares almost all its most confident rows with that zero set but is not covered (its draw has
    rank b − 1 inside its own zero set, so it cannot lie in photo 1's); a look-alike covered that
    way stopped drawing for good. With photo 0's direction found, photo 0 is covered."""
    x, model, prob, Q = _twins(photos, b=16)  # b − 1 = 15 rows: 90 % of them is not all
    layer = model.layers[0]
    guide = torch.cat([x[:1], x[2:]]).flatten(1)
    sampler = GuidedSampler(prob, Guide(guide, layer.weight, layer.bias), 16, 0)
    pool = CandidatePool(prob, SpearParams(), True, True)
    assert pool.offer_direction(Q[:, 1]) is not None
    shared = float(pool.items[0].zeros[sampler.top[0]].double().mean())
    sampler.update_covered(pool)
    assert shared >= 0.9 and not bool(sampler.covered.any())
    assert pool.offer_direction(Q[:, 0]) is not None
    sampler.update_covered(pool)
    assert sampler.covered.tolist() == [True] + [False] * 14
