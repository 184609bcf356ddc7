"""Leakage metrics (PSNR, SSIM, LPIPS), optimal matching, scoring and comparison grids."""
from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import structural_similarity

from adversary.scoring import metrics
from adversary.scoring.images import save_comparison_grid
from adversary.scoring.metrics import (
    LPIPS_ENV_VAR,
    PSNR_CAP_DB,
    LpipsScorer,
    label_accuracy,
    match_reconstructions,
    psnr,
    score_reconstruction,
    ssim,
)


def _images(n: int, c: int = 3, side: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, c, side, side, generator=torch.Generator().manual_seed(seed))


def _skimage_ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    return structural_similarity(
        a.double().numpy(), b.double().numpy(), gaussian_weights=True, sigma=1.5,
        use_sample_covariance=False, data_range=1.0, channel_axis=0,
    )


@pytest.fixture(scope="module")
def random_lpips() -> LpipsScorer:
    return LpipsScorer(device="cpu", random_backbone_seed=0)


# --- PSNR -------------------------------------------------------------------------------

def test_psnr_of_identical_images_is_the_cap() -> None:
    x = _images(5)
    assert psnr(x, x).tolist() == [PSNR_CAP_DB] * 5
    assert psnr(x.double(), x.double() + 1e-16).tolist() == [PSNR_CAP_DB] * 5


def test_psnr_of_gaussian_noise_matches_its_variance() -> None:
    x = _images(4, side=64)
    for sigma in (0.01, 0.05, 0.2):
        noise = sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
        expected = 10 * math.log10(1 / sigma**2)
        assert psnr(x + noise, x).sub(expected).abs().max() < 0.1


def test_psnr_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError):
        psnr(_images(2), _images(3))


# --- SSIM -------------------------------------------------------------------------------

def test_ssim_of_identical_images_is_one() -> None:
    x = _images(3)
    assert torch.allclose(ssim(x, x), torch.ones(3, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("channels,side", [(3, 32), (1, 28), (3, 17)])
def test_ssim_matches_skimage_on_random_images(channels: int, side: int) -> None:
    a = _images(3, channels, side, seed=2)
    b = (a + 0.3 * _images(3, channels, side, seed=3)).clamp(0, 1)  # correlated, not identical
    ours = ssim(a, b)
    for i in range(3):
        assert abs(ours[i].item() - _skimage_ssim(a[i], b[i])) < 1e-6
    unrelated = _images(3, channels, side, seed=4)
    for i in range(3):
        assert abs(ssim(a, unrelated)[i].item() - _skimage_ssim(a[i], unrelated[i])) < 1e-6


def test_ssim_matches_skimage_on_a_smooth_pair() -> None:
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 40), torch.linspace(0, 1, 40), indexing="ij")
    a = torch.stack([0.5 + 0.4 * torch.sin(6 * xx + k) * torch.cos(4 * yy) for k in range(3)])[None]
    b = torch.stack([0.5 + 0.35 * torch.sin(6 * xx + k + 0.3) * torch.cos(4 * yy) for k in range(3)])[None]
    value = ssim(a, b).item()
    assert 0.3 < value < 0.99
    assert abs(value - _skimage_ssim(a[0], b[0])) < 1e-6


def test_ssim_on_images_smaller_than_the_window() -> None:
    x = _images(2, 1, 8)
    assert torch.allclose(ssim(x, x), torch.ones(2, dtype=torch.float64), atol=1e-12)
    assert (ssim(x, _images(2, 1, 8, seed=9)) < 0.5).all()


# --- LPIPS ------------------------------------------------------------------------------

def test_lpips_plumbing_with_random_backbone(random_lpips: LpipsScorer) -> None:
    assert random_lpips.available
    a, b = _images(4, seed=5), _images(4, seed=6)
    same = random_lpips.score(a, a)
    assert same.shape == (4,) and torch.all(same.abs() < 1e-6)
    ab, ba = random_lpips.score(a, b), random_lpips.score(b, a)
    assert ab.shape == (4,) and torch.all(ab > 0)
    assert torch.allclose(ab, ba, rtol=1e-5, atol=1e-7)


def test_lpips_handles_grayscale_and_small_images(random_lpips: LpipsScorer) -> None:
    a, b = _images(3, 1, 28, seed=7), _images(3, 1, 28, seed=8)
    assert torch.all(random_lpips.score(a, a).abs() < 1e-6)
    assert torch.all(random_lpips.score(a, b) > 0)
    rgb = a.expand(-1, 3, -1, -1)
    assert torch.allclose(random_lpips.score(a, b), random_lpips.score(rgb, b.expand(-1, 3, -1, -1)))


def test_lpips_random_backbone_is_seeded() -> None:
    a, b = _images(2, seed=5), _images(2, seed=6)
    first = LpipsScorer(device="cpu", random_backbone_seed=3).score(a, b)
    second = LpipsScorer(device="cpu", random_backbone_seed=3).score(a, b)
    assert torch.equal(first, second)


def test_lpips_loads_a_torchvision_alexnet_checkpoint(tmp_path, monkeypatch) -> None:
    from torchvision.models import alexnet

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        backbone = alexnet(weights=None)
    checkpoint = tmp_path / "alexnet.pth"
    torch.save(backbone.state_dict(), checkpoint)
    monkeypatch.setenv(LPIPS_ENV_VAR, str(checkpoint))
    scorer = LpipsScorer(device="cpu")
    assert scorer.available and scorer.source == str(checkpoint)
    conv5 = dict(scorer._model.net.named_modules())["slice5.10"]
    assert torch.equal(conv5.weight, backbone.features[10].weight)
    assert scorer.score(_images(2), _images(2, seed=1)).shape == (2,)

    monkeypatch.setenv(LPIPS_ENV_VAR, str(tmp_path / "missing.pth"))
    with pytest.raises(FileNotFoundError):
        LpipsScorer(device="cpu")


def test_lpips_unavailable_returns_none_and_warns_once(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv(LPIPS_ENV_VAR, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty hub cache
    monkeypatch.setattr(metrics, "_lpips_unavailable_warned", False)
    with pytest.warns(RuntimeWarning, match=LPIPS_ENV_VAR) as record:
        scorer = LpipsScorer(device="cpu")
    assert len(record) == 1
    assert not scorer.available
    assert scorer.score(_images(2), _images(2, seed=1)) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise
        second = LpipsScorer(device="cpu")
        assert second.score(_images(2), _images(2, seed=1)) is None
    scores = score_reconstruction(_images(2), _images(2), None, torch.tensor([0, 1]), lpips=second)
    assert scores.lpips is None and scores.lpips_mean is None and scores.lpips_best is None


# --- matching and scoring ---------------------------------------------------------------

def test_shuffled_batch_is_matched_back_exactly(random_lpips: LpipsScorer) -> None:
    truth = _images(6, seed=12)
    labels = torch.tensor([3, 1, 4, 1, 5, 9])
    perm = torch.tensor([4, 0, 5, 2, 1, 3])
    recon = truth[perm]
    rows, cols = match_reconstructions(recon, truth)
    assert cols == list(range(6))
    assert [perm[r].item() for r in rows] == cols  # truth j <- recon i with perm[i] == j
    scores = score_reconstruction(recon, truth, labels[perm], labels, lpips=random_lpips)
    assert scores.matching == torch.argsort(perm).tolist()
    assert scores.psnr == [PSNR_CAP_DB] * 6
    assert scores.psnr_mean == PSNR_CAP_DB and scores.psnr_best == PSNR_CAP_DB
    assert all(abs(s - 1) < 1e-12 for s in scores.ssim)
    assert all(abs(v) < 1e-6 for v in scores.lpips) and abs(scores.lpips_best) < 1e-6
    assert scores.recovered_share == 1.0
    assert scores.label_acc == 1.0
    assert scores.num_images == scores.num_reconstructions == 6


def test_mse_and_psnr_costs_recover_a_noisy_permutation() -> None:
    truth = _images(5, seed=13)
    perm = torch.tensor([2, 4, 0, 1, 3])
    recon = (truth[perm] + 0.05 * torch.randn(truth.shape, generator=torch.Generator().manual_seed(2))).clamp(0, 1)
    for cost in ("mse", "psnr"):
        rows, cols = match_reconstructions(recon, truth, cost=cost)
        assert [perm[r].item() for r in rows] == cols == list(range(5))
    with pytest.raises(ValueError):
        match_reconstructions(recon, truth, cost="l1")


def test_more_reconstructions_than_truths() -> None:
    truth = _images(3, seed=14)
    decoys = _images(4, seed=15)
    recon = torch.cat([decoys[:2], truth[2:3], decoys[2:], truth[1:2], truth[0:1]])  # M = 7
    scores = score_reconstruction(recon, truth, None, torch.tensor([0, 1, 2]))
    assert scores.matching == [6, 5, 2]
    assert scores.psnr == [PSNR_CAP_DB] * 3
    assert scores.recovered_share == 1.0
    assert scores.label_acc is None
    assert scores.num_reconstructions == 7


def test_fewer_reconstructions_than_truths() -> None:
    truth = _images(4, seed=16)
    recon = torch.stack([truth[3], (truth[1] + 0.5).clamp(0, 1)])  # one exact, one poor
    scores = score_reconstruction(recon, truth, torch.tensor([7, 7]), torch.tensor([7, 1, 7, 2]),
                                  recovered_psnr=20.0)
    assert scores.matching[3] == 0 and scores.psnr[3] == PSNR_CAP_DB
    assert sum(m is not None for m in scores.matching) == 2
    assert scores.psnr.count(None) == 2 and scores.ssim.count(None) == 2
    assert scores.recovered_share == 0.25  # unmatched truths count as not recovered
    paired = [p for p in scores.psnr if p is not None]
    assert scores.psnr_mean == pytest.approx(sum(paired) / 2) and scores.psnr_best == PSNR_CAP_DB
    assert scores.label_acc == 0.5  # both 7s recovered out of 4 labels
    assert json.loads(json.dumps(scores.to_dict())) == scores.to_dict()


def test_no_reconstructions_at_all() -> None:
    scores = score_reconstruction(torch.zeros(0, 3, 32, 32), _images(2), None, torch.tensor([0, 1]))
    assert scores.matching == [None, None] and scores.psnr == [None, None]
    assert scores.psnr_mean is None and scores.ssim_best is None and scores.recovered_share == 0.0


def test_label_accuracy_counts_multiplicities() -> None:
    truth = torch.tensor([1, 1, 1, 2, 3])
    assert label_accuracy(torch.tensor([1, 2, 3, 4, 5]), truth) == pytest.approx(3 / 5)
    assert label_accuracy(torch.tensor([1, 1, 1, 1, 1]), truth) == pytest.approx(3 / 5)
    assert label_accuracy(torch.tensor([3, 1, 2, 1, 1]), truth) == 1.0
    assert label_accuracy(torch.tensor([1, 1]), truth) == pytest.approx(2 / 5)  # M < N
    assert label_accuracy(torch.tensor([1, 1, 1, 2, 3, 3, 3]), truth) == 1.0  # M > N


def test_scores_to_dict_is_json() -> None:
    truth = _images(3, seed=17)
    recon = (truth + 0.1).clamp(0, 1)
    scores = score_reconstruction(recon, truth, torch.tensor([0, 0, 1]), torch.tensor([0, 1, 1]))
    data = json.loads(json.dumps(scores.to_dict(), allow_nan=False))
    assert data["num_images"] == 3 and data["label_acc"] == pytest.approx(2 / 3)
    assert len(data["psnr"]) == 3 and all(isinstance(v, float) for v in data["psnr"])
    assert data["psnr_best"] == max(data["psnr"]) and data["ssim_best"] == max(data["ssim"])


# --- comparison grid --------------------------------------------------------------------

@pytest.mark.parametrize("channels", [3, 1])
def test_comparison_grid_size_and_content(tmp_path, channels: int) -> None:
    n, side, scale, pad = 5, 32, 4, 2
    gen = torch.Generator().manual_seed(18)
    truth = torch.randint(0, 256, (n, channels, side, side), generator=gen).float() / 255
    recon = torch.randint(0, 256, (n, channels, side, side), generator=gen).float() / 255
    out = save_comparison_grid(tmp_path / "nested" / "grid.png", truth, recon, nrow=3, scale=scale, padding=pad)
    image = np.asarray(Image.open(out).convert("RGB"))
    cols, rows = 3, 2
    assert image.shape == (scale * 2 * (rows * (side + pad) + pad), scale * (cols * (side + pad) + pad), 3)
    top_left = image[scale * pad: scale * (pad + side), scale * pad: scale * (pad + side)]
    expected = (truth[0].expand(3, -1, -1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    expected = expected.repeat(scale, axis=0).repeat(scale, axis=1)
    assert np.array_equal(top_left, expected)
    first_recon_top = scale * (rows * (side + pad) + pad + pad)
    recon_block = image[first_recon_top: first_recon_top + scale * side, scale * pad: scale * (pad + side)]
    expected_recon = (recon[0].expand(3, -1, -1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(recon_block[::scale, ::scale], expected_recon)
