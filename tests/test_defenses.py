"""Client-side defenses and the DP accountant: each one changes what the server sees, by the
stated rule and amount; bad parameters fail validation with one line naming file and key."""
import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from opacus.accountants import RDPAccountant

from clients.training import train_locally
from defenses.accounting import Mechanism, PrivacyLedger, privacy_mechanism
from defenses.base import Defense, NoParams
from defenses.dp_sgd import DpSgd, DpSgdParams, clip_per_example, per_example_gradients
from defenses.outpost import (Outpost, OutpostParams, layer_risk, noise_masks, outpost_perturb, perturb_probability,
                              prune_masks)
from defenses.quantize import stochastic_quantize
from defenses.registry import DEFENSES, build_defense, resolve_defense_params, validate_defense
from defenses.soteria import feature_mask, feature_scores
from defenses.tensors import clip_to_norm, global_norm
from defenses.topk import Topk, TopkParams
from fedsim.run.cli import main
from fedsim.config import ScenarioError
from fedsim.models import build_model
from fedsim.scenario import DefenseSpec, FederationSpec, ModelSpec, TrainingSpec, load_scenario

ROOT = Path(__file__).resolve().parents[1]
MLP = ModelSpec(name="mlp", hidden=(16,))
CONV = ModelSpec(name="convnet", width=2)
TRAINING = TrainingSpec(epochs=1, batch_size=4, lr=0.1, momentum=0.9, shuffle=False)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _data(spec: ModelSpec, n: int = 8, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(spec, (1, 6, 6), 3).double()
    x = torch.randn(n, 1, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (n,))
    return model, x, y


def _train(spec: ModelSpec, defense: Defense, training: TrainingSpec = TRAINING, n: int = 8) -> dict:
    model, x, y = _data(spec, n)
    return train_locally(model, x, y, training, training.lr, torch.Generator().manual_seed(1), defense).update


def _defense(name: str, **params) -> Defense:
    return build_defense(DefenseSpec(name, params), torch.Generator().manual_seed(5))


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


# --- every defense changes what is uploaded -------------------------------------------------

ACTIVE = sorted(set(DEFENSES) - {"none", "dp_central"})


@pytest.mark.parametrize("name", ACTIVE)
def test_every_defense_changes_the_upload(name):
    plain = _train(MLP, _defense("none"))
    defended = _train(MLP, _defense(name))
    assert set(defended) == set(plain)
    assert _max_diff(defended, plain) > 1e-4, name


@pytest.mark.parametrize("name", ["dp_local", "topk", "gaussian", "laplace", "quantize"])
def test_update_defenses_touch_bn_buffers_but_not_integer_counters(name):
    plain = _train(CONV, _defense("none"))
    defended = _train(CONV, _defense(name))
    counters = [k for k in plain if k.endswith("num_batches_tracked")]
    assert counters and all(torch.equal(defended[k], plain[k]) for k in counters)
    stats = [k for k in plain if k.endswith("running_mean")]
    assert any(not torch.equal(defended[k], plain[k]) for k in stats)


def test_dp_central_is_the_identity_on_the_client_and_marked_for_the_server():
    assert _max_diff(_train(MLP, _defense("dp_central")), _train(MLP, _defense("none"))) == 0.0
    assert DEFENSES["dp_central"].defense_type.acts_on_server is True
    assert not any(DEFENSES[n].defense_type.acts_on_server for n in DEFENSES if n != "dp_central")


# --- Outpost --------------------------------------------------------------------------------

def test_outpost_risk_and_decay_schedule():
    params = [torch.tensor([0.0, 2.0]), torch.tensor([0.0, 0.2]), torch.tensor([3.0])]
    assert layer_risk(params) == pytest.approx([1.0, 0.02, 0.0])  # min(unbiased var, 1); one value: 0
    assert perturb_probability(1, 0.125) == pytest.approx(1 / 1.125)
    assert perturb_probability(8, 0.125) == pytest.approx(0.5)
    assert perturb_probability(5, 0.0) == 1.0


def _counting_outpost(beta: float, step: int, trials: int) -> float:
    model = torch.nn.Linear(4, 4, bias=False)
    defense = Outpost(OutpostParams(beta=beta), torch.Generator().manual_seed(3))
    hits = 0
    for _ in range(trials):
        model.weight.grad = torch.ones(4, 4)
        defense.on_step(model, step, 100)
        hits += not torch.equal(model.weight.grad, torch.ones(4, 4))
    return hits / trials


def test_outpost_perturbs_with_probability_one_over_one_plus_beta_t():
    assert _counting_outpost(0.125, step=7, trials=600) == pytest.approx(0.5, abs=0.07)  # t = 8
    assert _counting_outpost(1.0, step=0, trials=600) == pytest.approx(0.5, abs=0.07)  # t = 1
    assert _counting_outpost(0.0, step=50, trials=50) == 1.0


def test_outpost_noises_phi_percent_of_fisher_entries_with_std_risk_times_noise_base():
    torch.manual_seed(0)
    # equal first axes: the share of gradient entries equals the share of Fisher entries
    grads = [torch.randn(4, 300) * s for s in (0.5, 1.0, 2.0)] + [torch.randn(4, 10, 10)]
    masks = noise_masks(grads, phi=40.0)
    share = sum(int(m.sum()) for m in masks) / sum(g.numel() for g in grads)
    assert share == pytest.approx(0.40, abs=0.01)
    params = OutpostParams(phi=40.0, prune_base=0.0, noise_base=0.8)
    risks = [0.5, 0.5, 0.5, 0.5]
    out = outpost_perturb(grads, risks, params, torch.Generator().manual_seed(99))
    diff = torch.cat([(o - g).reshape(-1) for o, g in zip(out, grads)])
    noised = torch.cat([m.reshape(-1) for m in masks])
    assert torch.all(diff[~noised] == 0) and torch.all(diff[noised] != 0)
    assert float(diff[noised].std()) == pytest.approx(0.5 * 0.8, rel=0.05)


def test_outpost_prunes_prune_base_percent_of_each_layer():
    torch.manual_seed(1)
    grads = [torch.randn(20, 50), torch.randn(7, 3, 3, 3) * 10, torch.randn(500)]
    for g, keep in zip(grads, prune_masks(grads, 80.0)):
        assert 1 - float(keep.double().mean()) == pytest.approx(0.80, abs=1.5 / g.numel() + 1e-9)
    out = outpost_perturb(grads, [0.0] * 3, OutpostParams(prune_base=80.0), torch.Generator())  # risk 0: no noise
    for g, o in zip(grads, out):
        zeroed = o == 0
        assert float(zeroed.double().mean()) == pytest.approx(0.80, abs=1.5 / g.numel() + 1e-9)
        assert g[zeroed].abs().max() <= g[~zeroed].abs().min()  # the smallest |g| go
        assert torch.equal(o[~zeroed], g[~zeroed])


def test_outpost_writes_the_perturbed_gradient_back():
    model = torch.nn.Linear(50, 20)
    model.weight.grad, model.bias.grad = torch.randn(20, 50), torch.randn(20)
    before = model.weight.grad.clone()
    Outpost(OutpostParams(beta=0.0), torch.Generator().manual_seed(0)).on_step(model, 0, 1)
    assert float((model.weight.grad == 0).double().mean()) >= 0.3  # pruned (noise refills ~40 % of columns)
    assert not torch.equal(model.weight.grad, before)


# --- client-level DP on the update ----------------------------------------------------------

def test_dp_local_clips_the_update_to_c_before_noise():
    big = {"w": torch.full((10, 10), 3.0), "b": torch.full((10,), -2.0), "n": torch.tensor(7)}
    clipped = clip_to_norm(big, 0.5)
    assert global_norm(clipped) == pytest.approx(0.5)
    assert torch.equal(clipped["n"], big["n"])
    assert torch.allclose(clipped["w"] / clipped["b"][0], big["w"] / big["b"][0])  # direction kept
    small = {"w": torch.full((2,), 0.1)}
    assert torch.equal(clip_to_norm(small, 0.5)["w"], small["w"])
    # end to end, σ = 0: every uploaded update (BN buffers included) has norm <= C
    for seed in range(3):
        model, x, y = _data(CONV, seed=seed)
        up = train_locally(model, x, y, TRAINING, 0.1, torch.Generator(), _defense("dp_local", clip_norm=0.01,
                                                                                   noise_multiplier=0.0)).update
        assert global_norm(up) <= 0.01 * (1 + 1e-9)
    raw = _train(CONV, _defense("none"))
    assert global_norm(raw) > 0.01


def test_dp_local_noise_std_is_sigma_times_c():
    zeros = {"w": torch.zeros(200, 200, dtype=torch.float64), "n": torch.tensor(3)}
    out = _defense("dp_local", clip_norm=0.5, noise_multiplier=2.0).on_update(zeros)
    assert float(out["w"].std()) == pytest.approx(1.0, rel=0.02)
    assert float(out["w"].mean()) == pytest.approx(0.0, abs=0.01)
    assert torch.equal(out["n"], zeros["n"])


# --- DP-SGD ---------------------------------------------------------------------------------

def test_per_example_gradients_average_to_the_batch_gradient():
    model, x, y = _data(MLP)
    grads, losses = per_example_gradients(model, x, y)
    batch = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    for (name, _), g in zip(model.named_parameters(), batch):
        assert torch.allclose(grads[name].mean(0), g, atol=1e-12)
    assert float(losses.mean()) == pytest.approx(float(F.cross_entropy(model(x), y).detach()))


def test_dp_sgd_clips_every_example_to_c():
    model, x, y = _data(MLP)
    grads, _ = per_example_gradients(model, x, y)
    norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads.values()]).sum(0).sqrt()
    c = float(norms.median())
    clipped = clip_per_example(grads, c)
    after = torch.stack([g.flatten(1).pow(2).sum(1) for g in clipped.values()]).sum(0).sqrt()
    assert torch.all(after <= c * (1 + 1e-9))
    assert torch.allclose(after[norms <= c], norms[norms <= c])  # small ones untouched
    # σ = 0: p.grad is the sum of the clipped gradients over B, so its norm times B is <= B·C
    DpSgd(DpSgdParams(clip_norm=c, noise_multiplier=0.0), torch.Generator()).compute_gradients(model, x, y)
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, clipped[name].sum(0) / len(x), atol=1e-14), name
    total = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters()))
    assert 0 < total * len(x) <= len(x) * c * (1 + 1e-9)


def test_dp_sgd_without_clipping_or_noise_is_plain_sgd_and_noise_changes_it():
    training = TrainingSpec(epochs=2, batch_size=3, lr=0.1, momentum=0.9, weight_decay=1e-3, shuffle=True)
    plain = _train(MLP, _defense("none"), training)
    exact = _train(MLP, _defense("dp_sgd", clip_norm=1e9, noise_multiplier=0.0), training)
    assert _max_diff(exact, plain) < 1e-10
    noisy = _train(MLP, _defense("dp_sgd", clip_norm=1.0, noise_multiplier=1.0), training)
    clipped = _train(MLP, _defense("dp_sgd", clip_norm=1.0, noise_multiplier=0.0), training)
    assert _max_diff(noisy, clipped) > 1e-3


def test_dp_sgd_refuses_batchnorm(tmp_path):
    model, x, y = _data(CONV)
    with pytest.raises(ValueError, match="BatchNorm"):
        _defense("dp_sgd").compute_gradients(model, x, y)
    path = tmp_path / "dp_bn.toml"
    path.write_text('[model]\nname = "convnet"\n[defense]\nname = "dp_sgd"\n')
    with pytest.raises(ScenarioError) as err:
        validate_defense(load_scenario(path))
    message = str(err.value)
    assert len(message.splitlines()) == 1 and str(path) in message
    assert "key 'defense.name'" in message and "model.name = 'convnet'" in message
    path.write_text('[model]\nname = "mlp"\n[defense]\nname = "dp_sgd"\n')
    assert validate_defense(load_scenario(path)) == DpSgdParams()


# --- top-k, quantisation, Soteria -----------------------------------------------------------

def test_topk_keeps_exactly_the_stated_share_per_layer():
    torch.manual_seed(0)
    update = {"a": torch.randn(10, 20), "b": torch.randn(50), "c": torch.randn(4, 5, 5), "n": torch.tensor(9)}
    out = Topk(TopkParams(percent=10.0), torch.Generator()).on_update(update)
    for key, kept in (("a", 20), ("b", 5), ("c", 10)):
        nonzero = out[key] != 0
        assert int(nonzero.sum()) == kept, key
        assert update[key][nonzero].abs().min() >= update[key][~nonzero].abs().max()
        assert torch.equal(out[key][nonzero], update[key][nonzero])
    assert torch.equal(out["n"], update["n"])
    assert torch.equal(Topk(TopkParams(percent=100.0), torch.Generator()).on_update(update)["a"], update["a"])


def test_quantize_is_unbiased_with_at_most_2_to_the_k_levels():
    torch.manual_seed(0)
    x = torch.randn(2000, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    for bits in (1, 2, 8):
        q = stochastic_quantize(x, bits, gen)
        assert len(torch.unique(q)) <= 2 ** bits
        assert q.min() >= x.min() and q.max() <= x.max()
    small = x[:20]
    draws = torch.stack([stochastic_quantize(small, 2, gen) for _ in range(4000)])
    step = float(small.max() - small.min()) / 3
    assert torch.allclose(draws.mean(0), small, atol=0.05 * step * 3)  # ~6 standard errors
    assert float((draws.mean(0) - small).abs().mean()) < 0.01 * step * 3
    assert not torch.equal(draws[0], small)


def test_soteria_scores_and_prunes_the_representation_layer():
    torch.manual_seed(0)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    r = x[:, :1] * scale + 10.0  # r_{b,f} = 10 + s_f·x_{b,0}
    scores = feature_scores(r, x)
    expected = (scale[None, :] / (r.detach() + 0.1)).sum(0)  # ‖∂r_f/∂x_b‖ = s_f
    assert torch.allclose(scores, expected)
    mask = feature_mask(torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0]), 60.0)
    assert mask.tolist() == [1.0, 0.0, 1.0, 0.0, 0.0]  # the 60 % smallest scores are pruned
    model, xs, ys = _data(MLP)
    reference = copy.deepcopy(model)
    _defense("soteria").compute_gradients(model, xs, ys)
    F.cross_entropy(reference(xs), ys).backward()
    last, ref_last = model.layers[-1], reference.layers[-1]
    zero_columns = (last.weight.grad == 0).all(0)
    assert int(zero_columns.sum()) >= round(0.6 * 16) - 1 and int((~zero_columns).sum()) >= 1
    assert torch.allclose(last.weight.grad[:, ~zero_columns], ref_last.weight.grad[:, ~zero_columns], atol=1e-14)
    assert torch.allclose(last.bias.grad, ref_last.bias.grad, atol=1e-14)
    assert torch.allclose(model.layers[0].weight.grad, reference.layers[0].weight.grad, atol=1e-14)
    assert int((ref_last.weight.grad == 0).all(0).sum()) < int(zero_columns.sum())  # it did prune


# --- the accountant -------------------------------------------------------------------------

def test_accountant_matches_opacus_and_composes_in_rdp_space():
    mech = Mechanism("dp_sgd", noise_multiplier=1.1, sample_rate=0.05, steps=40, delta=1e-5)
    opacus = RDPAccountant()
    opacus.history = [(1.1, 0.05, 40)]
    one = opacus.get_epsilon(1e-5)
    assert mech.epsilon() == pytest.approx(one, rel=1e-12)
    ledger = PrivacyLedger()
    ledger.record(3, mech)
    assert ledger.epsilon(3) == pytest.approx(one, rel=1e-12)
    ledger.record(3, mech)
    opacus.history.append((1.1, 0.05, 40))
    two = ledger.epsilon(3)
    assert two == pytest.approx(opacus.get_epsilon(1e-5), rel=1e-12)
    assert one < two < 2 * one  # composed, not added
    assert ledger.epsilon(4) == 0.0 and ledger.worst_epsilon() == two
    zero_noise = Mechanism("dp_local", 0.0, 1.0, 1, 1e-5)
    assert math.isinf(zero_noise.epsilon())


def test_privacy_mechanism_per_defense():
    training = TrainingSpec(batch_size=8)
    federation = FederationSpec(num_clients=10, clients_per_round=2)
    sgd = privacy_mechanism(DpSgdParams(noise_multiplier=1.5), training, 64, 16, federation)
    assert (sgd.noise_multiplier, sgd.sample_rate, sgd.steps, sgd.scope) == (1.5, 8 / 64, 16, "client")
    local = privacy_mechanism(resolve_defense_params(DefenseSpec("dp_local", {"noise_multiplier": 2.0}), "x"),
                              training, 64, 16, federation)
    assert (local.noise_multiplier, local.sample_rate, local.steps) == (2.0, 1.0, 1)
    central = privacy_mechanism(resolve_defense_params(DefenseSpec("dp_central", {}), "x"), training, 64, 16,
                                federation)
    assert (central.sample_rate, central.steps, central.scope) == (0.2, 1, "federation")
    no_amp = privacy_mechanism(resolve_defense_params(DefenseSpec("dp_central", {"amplification": False}), "x"),
                               training, 64, 16, federation)
    assert no_amp.sample_rate == 1.0 and no_amp.epsilon() > central.epsilon()
    assert privacy_mechanism(resolve_defense_params(DefenseSpec("gaussian", {}), "x"), training, 64, 16,
                             federation) is None
    ledger = PrivacyLedger()
    ledger.record(None, central)
    ledger.record(None, central)
    assert ledger.epsilon(7) == pytest.approx(ledger.worst_epsilon()) and ledger.epsilon(7) > central.epsilon()


# --- validation -----------------------------------------------------------------------------

BAD = [
    ('name = "dp_local"\nnoise_multiplier = -1.0\n', "defense.noise_multiplier", "must be >= 0"),
    ('name = "dp_sgd"\nnoise_multiplier = -0.5\n', "defense.noise_multiplier", "must be >= 0"),
    ('name = "gaussian"\nstd = -0.1\n', "defense.std", "must be >= 0"),
    ('name = "outpost"\nphi = 101\n', "defense.phi", "must be <= 100"),
    ('name = "outpost"\nprune_base = -1\n', "defense.prune_base", "must be >= 0"),
    ('name = "outpost"\ngamma = 1\n', "defense.gamma", "unknown key"),
    ('name = "topk"\npercent = 0\n', "defense.percent", "must be > 0"),
    ('name = "topk"\npercent = 150\n', "defense.percent", "must be <= 100"),
    ('name = "quantize"\nbits = 0\n', "defense.bits", "must be >= 1"),
    ('name = "dp_sgd"\ndelta = 1.5\n', "defense.delta", "must be < 1"),
    ('name = "dp_central"\nclip_norm = 0\n', "defense.clip_norm", "must be > 0"),
    ('name = "soteria"\npercent = "most"\n', "defense.percent", "expected float"),
    ('name = "magic"\n', "defense.name", "allowed: none, outpost, dp_local"),
]


@pytest.mark.parametrize("body,key,fragment", BAD, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD)])
def test_bad_defense_parameters_give_one_line_naming_file_and_key(tmp_path, capsys, body, key, fragment):
    path = tmp_path / "bad.toml"
    path.write_text("[defense]\n" + body)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert str(path) in err and f"key '{key}'" in err and fragment in err


@pytest.mark.parametrize("path", sorted((ROOT / "scenarios").glob("defense_*.toml")), ids=lambda p: p.name)
def test_defense_scenarios_fit_their_model(path):
    scenario = load_scenario(path)
    assert scenario.defense.name in DEFENSES and scenario.defense.name != "none"
    validate_defense(scenario)


def test_every_defense_family_has_a_scenario():
    shipped = {load_scenario(p).defense.name for p in (ROOT / "scenarios").glob("defense_*.toml")}
    assert set(DEFENSES) - {"none", "laplace"} <= shipped


def test_identity_defense_type_is_the_base():
    assert DEFENSES["none"].defense_type is Defense and DEFENSES["none"].params_type is NoParams
