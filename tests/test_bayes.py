"""The defense-aware (Bayes-optimal) attacker (Balunović et al., ICLR'22): the defense models'
likelihoods on fixed tensors, their plumbing through the shared Matcher on updates made by the
real defense code, an end-to-end PSNR measurement against the cosine objective, the scenario
check, and top-k's optional noise on the kept entries."""
from __future__ import annotations

import itertools
import math
from dataclasses import replace

import pytest
import torch

from adversary.attacks import geiping
from adversary.attacks.base import AttackContext
from adversary.maths.defense_model import (BAYES_DEFENSES, DefenseModel, check_bayes_loss, clip_update,
                                           defense_model, gaussian_nll, laplace_nll)
from adversary.maths.matching import Matcher
from adversary.maths.unroll import batchnorm_buffer_names
from adversary.observation import Observation
from adversary.runtime.registry import resolve_attack_params
from adversary.scoring.metrics import psnr
from clients.training import train_locally
from defenses.registry import build_defense
from defenses.tensors import clip_to_norm
from defenses.topk import Topk, TopkParams, topk_tensor
from fedsim.config import ScenarioError
from fedsim.data import load_data
from fedsim.models import build_model
from fedsim.run.cli import main
from fedsim.scenario import DataSpec, DefenseSpec, ModelSpec, TrainingSpec, load_scenario

FEDSGD = TrainingSpec(batch_size=1, lr=0.1, shuffle=False)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def photos16():
    return load_data(DataSpec(train_examples=100, test_examples=10, image_size=16), seed=0)


def defended_update(data, spec: ModelSpec, x: torch.Tensor, y: torch.Tensor, training: TrainingSpec,
                    defense: DefenseSpec, seed: int) -> Observation:
    """The server's view of a client that trains an untrained ``spec`` on (x, y) behind the real
    ``defense`` (clients.training.train_locally + defenses.registry), the defense known."""
    torch.manual_seed(seed)
    model = build_model(spec, data.domain.shape, data.domain.num_classes)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train_locally(model, x, y, training, training.lr, torch.Generator().manual_seed(100 + seed),
                           build_defense(defense, torch.Generator().manual_seed(200 + seed)))
    return Observation(1, 0, spec, data.domain, before, result.update, training, len(x), len(result.batches),
                       defense=defense)


def matched_psnr(domain, recon: torch.Tensor, truth: torch.Tensor) -> float:
    r, t = domain.to_unit(recon), domain.to_unit(truth)
    return max(psnr(r[list(p)], t).mean().item() for p in itertools.permutations(range(len(t))))


# --------------------------------------------------------------------------- the likelihoods

PRED = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([[0.0, -1.0], [2.0, 0.5]])]
OBS = [torch.tensor([1.5, 2.0, 1.0]), torch.tensor([[1.0, -1.0], [0.0, 0.0]])]
# residuals OBS - PRED: 0.5, 0, -2 | 1, 0, -2, -0.5  -> squares sum 9.5, |.| sum 6, 7 entries;
# kept (non-zero observed) entries: the first 5 -> squares sum 5.25, |.| sum 3.5


def test_gaussian_and_laplace_nll_are_per_entry_means_of_the_hand_computed_sums():
    assert float(gaussian_nll(PRED, OBS, 2.0)) == pytest.approx(9.5 / (2 * 4.0) / 7)
    assert float(laplace_nll(PRED, OBS, 0.5)) == pytest.approx(6.0 / 0.5 / 7)
    masks = [o != 0 for o in OBS]
    assert float(gaussian_nll(PRED, OBS, 2.0, masks)) == pytest.approx(5.25 / (2 * 4.0) / 5)
    assert float(laplace_nll(PRED, OBS, 0.5, masks)) == pytest.approx(3.5 / 0.5 / 5)


def test_defense_models_read_the_defense_parameters_and_score_by_name():
    names = ["a", "b"]
    pred = dict(zip(names, PRED))
    gauss = defense_model(DefenseSpec("gaussian", {"std": 2.0}))
    lap = defense_model(DefenseSpec("laplace", {"scale": 0.5}))
    dp = defense_model(DefenseSpec("dp_local", {"clip_norm": 3.0, "noise_multiplier": 0.5}))
    top = defense_model(DefenseSpec("topk", {"percent": 50.0, "noise_std": 2.0}))
    assert (gauss.noise, gauss.scale, gauss.clip_norm, gauss.masked) == ("gaussian", 2.0, None, False)
    assert (lap.noise, lap.scale) == ("laplace", 0.5)
    assert (dp.noise, dp.scale, dp.clip_norm, dp.masked) == ("gaussian", 1.5, 3.0, False)
    assert (top.noise, top.scale, top.masked) == ("gaussian", 2.0, True)
    assert float(gauss.likelihood(OBS, names)(pred)) == pytest.approx(9.5 / 8 / 7)
    assert float(lap.likelihood(OBS, names)(pred)) == pytest.approx(6.0 / 0.5 / 7)
    masked = top.likelihood(OBS, names)
    # kept: 5.25 / (2·2²) over 5 entries, weighted 5/7; pruned: b's τ = 1, excesses (2 − 1, 0) -> 1 / (2·2²) / 7
    assert masked.count == 5 and float(masked(pred)) == pytest.approx(5.25 / 8 / 5 * 5 / 7 + 1.0 / 8 / 7)
    # a pruned entry costs nothing while |Δ_pred| stays below τ = 1, and grows past it
    inside = {"a": PRED[0], "b": torch.tensor([[0.0, -1.0], [0.9, -1.0]])}
    assert float(masked(inside)) == pytest.approx(5.25 / 8 / 5 * 5 / 7)
    outside = {"a": PRED[0], "b": torch.tensor([[0.0, -1.0], [3.0, -1.0]])}
    assert float(masked(outside)) == pytest.approx(5.25 / 8 / 5 * 5 / 7 + 4.0 / 8 / 7)
    # noise-free top-k: the scale is the kept observed entries' RMS (sqrt(9.25 / 5))
    plain = defense_model(DefenseSpec("topk", {"percent": 50.0})).likelihood(OBS, names)
    assert plain.scale == pytest.approx(math.sqrt(9.25 / 5))
    assert float(plain(pred)) == pytest.approx((5.25 * 5 / 7 / 5 + 1.0 / 7) / (2 * 9.25 / 5))


def test_defense_models_refuse_an_unknown_or_unsupported_defense():
    with pytest.raises(ValueError, match="knows_defense"):
        defense_model(None)
    with pytest.raises(ValueError, match="outpost.*supported: gaussian, laplace, dp_local, topk"):
        defense_model(DefenseSpec("outpost", {}))
    with pytest.raises(ValueError, match="noise law"):
        DefenseModel("x", "cauchy", 1.0)


def test_dp_local_model_clips_the_prediction_like_the_defense():
    torch.manual_seed(0)
    c = 0.5
    names = ["w", "bn.running_var"]
    direction = {"w": torch.randn(30), "bn.running_var": torch.randn(4), "bn.num_batches_tracked": torch.tensor(1)}
    norm = math.sqrt(sum(float(v.pow(2).sum()) for k, v in direction.items() if v.is_floating_point()))
    big = {k: v * (10 * c / norm) if v.is_floating_point() else v for k, v in direction.items()}
    clipped = clip_update(big, c)
    reference = clip_to_norm(big, c)  # the defense's own clipping
    assert all(torch.allclose(clipped[k], reference[k]) for k in names)
    assert torch.equal(clipped["bn.num_batches_tracked"], big["bn.num_batches_tracked"])
    small = {k: v * 0.1 for k, v in clipped.items() if v.is_floating_point()}
    assert all(torch.equal(clip_update(small, c)[k], small[k]) for k in names)  # inside the ball: unchanged

    model = defense_model(DefenseSpec("dp_local", {"clip_norm": c, "noise_multiplier": 0.1}))
    observed = [reference[k] + 0.05 * torch.randn(reference[k].shape) for k in names]
    score = model.likelihood(observed, names)
    # norm 10·C scores as its clipped version (not as itself), comparing only part of the entries
    assert float(score(big)) == pytest.approx(float(score(reference)), rel=1e-6)
    unclipped = float(gaussian_nll([big[k] for k in names], observed, 0.1 * c))
    assert unclipped > 50 * float(score(big))
    only_w = model.likelihood(observed[:1], names[:1])  # the norm still spans the uncompared BN entry
    assert float(only_w(big)) == pytest.approx(float(gaussian_nll([reference["w"]], observed[:1], 0.1 * c)), rel=1e-6)
    leaf = big["w"].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(score({**big, "w": leaf}), leaf)
    assert torch.isfinite(grad).all() and float(grad.abs().sum()) > 0


# --------------------------------------------------------------------------- through the Matcher

DEFENSES = [
    DefenseSpec("gaussian", {"std": 0.01}),
    DefenseSpec("laplace", {"scale": 0.01}),
    DefenseSpec("dp_local", {"clip_norm": 0.5, "noise_multiplier": 0.02}),
    DefenseSpec("topk", {"percent": 10.0}),
    DefenseSpec("topk", {"percent": 10.0, "noise_std": 0.005}),
]


@pytest.mark.parametrize("defense", DEFENSES, ids=lambda d: "-".join([d.name, *map(str, d.params.values())]))
def test_true_inputs_score_lower_than_random_dummies_under_each_defense(photos16, defense):
    """Tiny BN ConvNet, FedSGD on 2 images behind the real defense: the Bayes objective of the
    true batch is below that of each of 5 random batches."""
    assert defense.name in BAYES_DEFENSES
    spec = ModelSpec(name="convnet", width=4)
    x, y = photos16.train_x[:2], photos16.train_y[:2]
    obs = defended_update(photos16, spec, x, y, TrainingSpec(batch_size=2, lr=0.1, shuffle=False), defense, 0)
    matcher = Matcher(obs, torch.device("cpu"), "unroll", loss="bayes", bn_weight=1.0)
    like = matcher.likelihood
    assert matcher.scale == 1.0  # Δ units
    assert matcher.buffer_names == batchnorm_buffer_names(matcher.model) != []
    assert like.names == matcher.param_names + matcher.buffer_names  # BN statistics in the one NLL
    if defense.name == "topk":
        assert like.count == sum(int((obs.update[k] != 0).sum()) for k in like.names)
        assert like.count < 0.2 * sum(obs.update[k].numel() for k in like.names)
    truth = float(matcher(x, y).detach())
    generator = torch.Generator().manual_seed(1)
    randoms = [float(matcher(torch.randn(x.shape, generator=generator), y).detach()) for _ in range(5)]
    assert truth < min(randoms), (truth, randoms)
    # dp_local: the clipping norm needs the BN statistics even when they are not compared
    no_bn = Matcher(obs, torch.device("cpu"), "unroll", loss="bayes", bn_weight=0.0)
    assert no_bn.buffer_names == [] and no_bn.predict_buffers == (defense.name == "dp_local")


def test_bayes_loss_needs_the_defense_in_the_observation(photos16):
    x, y = photos16.train_x[:1], photos16.train_y[:1]
    obs = defended_update(photos16, ModelSpec(name="mlp", hidden=(8,)), x, y, FEDSGD, DEFENSES[1], 0)
    with pytest.raises(ValueError, match="knows_defense"):
        Matcher(replace(obs, defense=None), torch.device("cpu"), "unroll", loss="bayes")


# --------------------------------------------------------------------------- end to end

@pytest.mark.parametrize("scale,margin", [(1.0, -1.0), (0.01, 3.0)], ids=["b=1", "b=0.01"])
def test_bayes_geiping_against_cosine_on_laplace_noised_updates(photos16, scale, margin):
    """MLP 768→64→10, FedSGD (lr 0.1, one 16x16 photo per update, 3 updates), real Laplace
    defense of scale b, labels recovered, 300 iterations, same seeds for both losses.

    The update's entries have an RMS of about 5e-3 here. At b = 1 (200x that) the update is
    swamped: neither objective recovers anything (measured: cosine 10.9 dB, bayes 12.3 dB mean);
    the likelihood is flat there, so the Bayes attack falls back to the TV prior's flat image
    while the cosine fits the noise — the bar is bayes >= cosine - 1 dB (1 dB: the spread of a
    3-image mean at that level). At b = 0.01 (2x the RMS) the likelihood is informative and the
    bar is a win by 3 dB (measured: cosine 19.0 dB, bayes 24.4 dB)."""
    spec = ModelSpec(name="mlp", hidden=(64,))
    scores: dict[str, list[float]] = {"cosine": [], "bayes": []}
    for k in range(3):
        x, y = photos16.train_x[k:k + 1], photos16.train_y[k:k + 1]
        obs = defended_update(photos16, spec, x, y, FEDSGD, DefenseSpec("laplace", {"scale": scale}), k)
        for loss in scores:
            rec = geiping.run(obs, replace(geiping.GeipingParams(), iterations=300, loss=loss), AttackContext(seed=k))
            assert rec.iterations == 300
            scores[loss].append(matched_psnr(photos16.domain, rec.inputs, x))
    cosine, bayes = (sum(v) / len(v) for v in (scores["cosine"], scores["bayes"]))
    assert bayes >= cosine + margin, scores
    if scale == 1.0:
        assert max(scores["cosine"] + scores["bayes"]) < 15.0, scores  # nothing recovered by either


# --------------------------------------------------------------------------- the scenario check

def _scenario(tmp_path, defense: str, knows: bool, loss: str = "bayes"):
    path = tmp_path / "bayes.toml"
    path.write_text(f'[defense]\n{defense}\n[attack]\nattacks = ["geiping"]\nknows_defense = {str(knows).lower()}\n'
                    f'[attack.geiping]\nloss = "{loss}"\n')
    return path


@pytest.mark.parametrize("defense,knows,fragment", [
    ('name = "laplace"\nscale = 0.1', False, "needs attack.knows_defense = true"),
    ('name = "outpost"', True, "no model of defense.name = 'outpost'; supported: gaussian, laplace, dp_local, topk"),
    ('name = "none"', True, "no model of defense.name = 'none'"),
], ids=["no-knows_defense", "outpost", "none"])
def test_bayes_loss_validation_is_one_line_naming_file_and_key(tmp_path, capsys, defense, knows, fragment):
    path = _scenario(tmp_path, defense, knows)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert str(path) in err and "key 'attack.geiping.loss'" in err and fragment in err


@pytest.mark.parametrize("defense", ['name = "gaussian"', 'name = "laplace"', 'name = "dp_local"',
                                     'name = "topk"\nnoise_std = 0.01'])
def test_bayes_loss_validates_with_a_known_supported_defense(tmp_path, capsys, defense):
    path = _scenario(tmp_path, defense, True)
    assert main(["validate", str(path)]) == 0
    scenario = load_scenario(path)
    params = resolve_attack_params(scenario.attack.attacks, scenario.attack.params, scenario.source)
    assert params["geiping"].loss == "bayes"
    check_bayes_loss(scenario, params)
    # the cosine needs neither
    cosine = load_scenario(_scenario(tmp_path, 'name = "outpost"', False, loss="cosine"))
    check_bayes_loss(cosine, resolve_attack_params(cosine.attack.attacks, cosine.attack.params, cosine.source))


def test_check_bayes_loss_raises_scenario_error():
    from fedsim.scenario import parse_scenario
    scenario = parse_scenario({"defense": {"name": "soteria"}, "attack": {"attacks": ["geiping"],
                               "knows_defense": True, "geiping": {"loss": "bayes"}}}, "s.toml")
    params = resolve_attack_params(scenario.attack.attacks, scenario.attack.params, scenario.source)
    with pytest.raises(ScenarioError) as info:
        check_bayes_loss(scenario, params)
    assert info.value.source == "s.toml" and info.value.key == "attack.geiping.loss"


# --------------------------------------------------------------------------- top-k with noise

def test_topk_noise_std_noises_only_the_kept_entries():
    torch.manual_seed(0)
    t = torch.randn(200, 50, dtype=torch.float64)
    clean = topk_tensor(t, 10.0)
    noisy = topk_tensor(t, 10.0, 0.3, torch.Generator().manual_seed(0))
    kept = clean != 0
    assert int(kept.sum()) == 1000 and torch.equal(noisy[~kept], torch.zeros_like(noisy[~kept]))
    noise = noisy[kept] - clean[kept]
    assert abs(float(noise.mean())) < 0.03 and float(noise.std()) == pytest.approx(0.3, rel=0.08)
    full = topk_tensor(t, 100.0, 0.3, torch.Generator().manual_seed(0))  # everything kept: noise everywhere
    assert float((full - t).std()) == pytest.approx(0.3, rel=0.03)
    update = {"w": t, "n": torch.tensor(3)}
    out = Topk(TopkParams(percent=10.0, noise_std=0.3), torch.Generator().manual_seed(0)).on_update(update)
    assert torch.equal(out["n"], update["n"]) and torch.equal(out["w"] == 0, ~kept)


def test_topk_default_draws_nothing_and_is_the_plain_pruning():
    t = torch.randn(40, 10, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(7)
    assert TopkParams().noise_std == 0.0
    out = Topk(TopkParams(percent=10.0, noise_std=0.0), generator).on_update({"w": t})
    assert torch.equal(out["w"], topk_tensor(t, 10.0))
    assert torch.equal(generator.get_state(), torch.Generator().manual_seed(7).get_state())


def test_topk_noise_std_is_validated(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text('[defense]\nname = "topk"\nnoise_std = -0.1\n')
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and "key 'defense.noise_std'" in err and ">= 0" in err
