"""GIAS: update matching through a generator (latent search, per-image parameter search), on
16x16 photos and a small ConvNet (seconds). The full-size comparison with Geiping's attack is
``benchmarks/gias.py``."""
from __future__ import annotations

import importlib.util
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from adversary.attacks import geiping, gias
from adversary.attacks.base import AttackContext
from adversary.maths.matching import Matcher
from adversary.maths.objectives import total_variation
from adversary.priors.checkpoint import save_prior
from adversary.scoring.metrics import score_reconstruction
from fedsim.data import load_data
from fedsim.scenario import DataSpec, ModelSpec, TrainingSpec
from helpers import client_update

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parents[1]
SPEC = ModelSpec(name="convnet", width=8)


class BankGenerator(nn.Module):
    """A user generator whose range holds a bank of images: G(z) = Σ_k softmax(z)_k · bank_k."""

    def __init__(self, image_shape: tuple[int, int, int], latent_dim: int = 12, width: int = 0):
        super().__init__()
        self.image_shape, self.latent_dim = tuple(image_shape), latent_dim
        self.bank = nn.Parameter(torch.zeros(latent_dim, *image_shape))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.einsum("nk,kchw->nchw", torch.softmax(4 * z, dim=1), self.bank)


class ClassBankGenerator(nn.Module):
    """A conditional user generator: one bank of images per class, G(z, y) = Σ_k softmax(z)_k · bank[y]_k."""

    def __init__(self, image_shape: tuple[int, int, int], latent_dim: int = 3, width: int = 0, num_classes: int = 10):
        super().__init__()
        self.image_shape, self.latent_dim, self.num_classes = tuple(image_shape), latent_dim, num_classes
        self.bank = nn.Parameter(torch.zeros(num_classes, latent_dim, *image_shape))

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return torch.einsum("nk,nkchw->nchw", torch.softmax(4 * z, dim=1), self.bank[labels])


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A FedSGD update of 4 photos, and a prior whose bank holds them among 12 photos."""
    photos = load_data(DataSpec(train_examples=40, test_examples=10, image_size=16), seed=0)
    x, y = photos.train_x[:4], photos.train_y[:4]
    obs = client_update(SPEC, photos.domain, x, y, TrainingSpec(batch_size=4, lr=0.1), seed=0)
    bank = BankGenerator(photos.domain.shape)
    with torch.no_grad():
        bank.bank.copy_(photos.domain.to_unit(photos.train_x[torch.tensor([10, 0, 11, 1, 12, 2, 13, 3, 14, 15, 16, 17])]))
    path = tmp_path_factory.mktemp("prior") / "bank.pt"
    save_prior(path, bank, {"latent_dim": 12, "width": 0}, {"split": "test bank"})
    params = gias.GiasParams(generator=str(path), generator_class=f"{BankGenerator.__module__}:BankGenerator",
                             latent_iterations=150, parameter_iterations=50, latent_lr=0.1,
                             parameter_lr=1e-2)  # the bank is in pixel units
    return photos.domain, obs, x, y, params


def _mean_psnr(domain, rec, x, y) -> float:
    """Mean PSNR after optimal matching (the scorer of every run)."""
    return score_reconstruction(domain.to_unit(rec.inputs), domain.to_unit(x), rec.labels, y, 20.0, None).psnr_mean


def test_latent_search_through_a_prior_holding_the_images_recovers_them(case):
    """GI-z finds the batch in the generator's range (> 25 dB); GI-x with the same number of
    objective evaluations does not come close at b = 4."""
    domain, obs, x, y, params = case
    rec = gias.run(obs, replace(params, stage="z"), AttackContext(seed=0))
    assert rec.iterations == params.latent_iterations and rec.extras["stage"] == "z"
    assert sorted(rec.labels.tolist()) == sorted(y.tolist())  # recovered from the update and rec.inputs.shape == x.shape
    pixels = geiping.run(obs, replace(geiping.GeipingParams(), iterations=150), AttackContext(seed=0))
    assert _mean_psnr(domain, rec, x, y) > 25.0 > _mean_psnr(domain, pixels, x, y) + 5.0


def test_a_conditional_prior_searches_the_images_of_the_recovered_labels(case, tmp_path):
    """Class y's bank holds the batch's images of class y among photos of no client's batch, and
    no other class's: GIAS finds them only by asking the generator for the labels it recovered."""
    domain, obs, x, y, params = case
    photos = load_data(DataSpec(train_examples=40, test_examples=10, image_size=16), seed=0)
    prior = ClassBankGenerator(domain.shape, num_classes=domain.num_classes)
    others = iter(photos.train_x[10:])
    with torch.no_grad():
        for c in range(domain.num_classes):
            mine = [image for image, label in zip(x, y) if label == c]
            images = (mine + [next(others) for _ in range(3 - len(mine))])[:3]
            prior.bank[c].copy_(domain.to_unit(torch.stack(images)))
    path = tmp_path / "classes.pt"
    save_prior(path, prior, {"latent_dim": 3, "width": 0, "num_classes": domain.num_classes}, {"split": "test"})
    conditional = replace(params, generator=str(path), generator_class=f"{__name__}:ClassBankGenerator")
    for stage in ("z", "z/w"):
        rec = gias.run(obs, replace(conditional, stage=stage), AttackContext(seed=0))
        assert _mean_psnr(domain, rec, x, y) > 25.0, stage


def test_the_parameter_search_does_not_end_worse_than_the_latents(case):
    """GI-z/w spends latent + parameter iterations and returns the better of the two stages;
    GI-w alone moves the per-image weights away from an uninformative start."""
    domain, obs, x, y, params = case
    calls = []
    ctx = AttackContext(seed=0, progress=lambda i, total, value: calls.append((i, total)))
    both = gias.run(obs, replace(params, report_every=50), ctx)
    assert both.iterations == params.evaluations == 200 and calls[-1] == (200, 200)
    assert both.objective <= both.extras["restart_objectives"][0] + 1e-9
    weights_only = gias.run(obs, replace(params, stage="w"), AttackContext(seed=0))
    start = gias.run(obs, replace(params, stage="w", parameter_iterations=1), AttackContext(seed=0))
    assert weights_only.objective < 0.85 * start.objective
    lo, hi = domain.bounds(both.inputs)
    assert bool(((both.inputs >= lo - 1e-5) & (both.inputs <= hi + 1e-5)).all())


def test_untrained_generator_and_restarts(case):
    domain, obs, x, y, _ = case
    params = gias.GiasParams(latent_iterations=5, parameter_iterations=5, restarts=2, latent_dim=8, width=4)
    rec = gias.run(obs, params, AttackContext(seed=0))
    assert rec.iterations == 15 and len(rec.extras["restart_objectives"]) == 2
    assert rec.extras["generator"] == "untrained"


def test_deadline_is_respected(case):
    domain, obs, x, y, params = case
    start = time.monotonic()
    rec = gias.run(obs, replace(params, latent_iterations=100_000), AttackContext(seed=0, deadline=start + 1.0))
    assert rec.extras["stopped_early"] and time.monotonic() - start < 5.0
    assert rec.inputs.shape == x.shape and 0 < rec.iterations < 100_000


def test_gias_scores_images_by_geipings_objective(case):
    """With the defaults GI-x and GIAS differ only in what they search over: the objective GIAS
    reports for its images is Geiping's (matching + Geiping's TV weight × TV) at those images."""
    domain, obs, x, y, params = case
    rec = gias.run(obs, replace(params, stage="z", latent_iterations=5), AttackContext(seed=0))
    pixels = geiping.GeipingParams()
    matcher = Matcher(obs, torch.device("cpu"), "unroll", bn_weight=pixels.bn_weight)
    tv = pixels.tv_weight * total_variation(rec.inputs)
    assert tv.item() > 1e-3 * rec.objective  # the TV term is ten times the tolerance below
    assert rec.objective == pytest.approx((matcher(rec.inputs, rec.labels) + tv).item(), rel=1e-4)


def test_the_benchmark_gives_every_method_the_same_budget():
    """benchmarks/gias.py: GI-x, GI-z, GI-z/w, and with the ablations GI-w and the untrained-
    generator rows, each spend exactly E objective evaluations."""
    spec = importlib.util.spec_from_file_location("gias_benchmark", ROOT / "benchmarks" / "gias.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    chosen = bench.methods(Path("prior.pt"), 300, ablations=True)
    assert list(chosen) == ["GI-x", "GI-z", "GI-w", "GI-z/w", "GI-z (untrained G)", "GI-w (untrained G)",
                            "GI-z/w (untrained G)"]
    budgets = {name: p.iterations * p.restarts if attack == "geiping" else p.evaluations
               for name, (attack, p) in chosen.items()}
    assert set(budgets.values()) == {300}
    stages = {name: p.stage for name, (attack, p) in chosen.items() if attack == "gias"}
    assert stages["GI-w"] == stages["GI-w (untrained G)"] == "w" and stages["GI-z/w"] == "z/w"
    assert [p.generator for name, (_, p) in chosen.items() if "untrained" in name] == ["untrained"] * 3
    assert list(bench.methods(Path("prior.pt"), 300, ablations=False)) == ["GI-x", "GI-z", "GI-z/w"]
    extra = bench.methods(Path("prior.pt"), 300, ablations=True, giml_prior=Path("giml.pt"),
                          conditional_prior=Path("conditional.pt"))
    for kind, path in (("GIML G", "giml.pt"), ("conditional G", "conditional.pt")):
        rows = {name: p for name, (_, p) in extra.items() if name.endswith(f"({kind})")}
        assert [name.split()[0] for name in rows] == ["GI-z", "GI-w", "GI-z/w"]
        assert {p.generator for p in rows.values()} == {path} and {p.evaluations for p in rows.values()} == {300}
