"""How much leaked: PSNR, SSIM and LPIPS of reconstructions against the ground truth.

Every function here takes images in **[0, 1]** (``DataDomain.to_unit`` of the normalised
tensors), batched as ``(N, C, H, W)``. Reconstructions come back in arbitrary order and
possibly in a different number than the true examples, so they are first paired with the
ground truth by an optimal one-to-one assignment (:func:`match_reconstructions`) and then
scored pair by pair (:func:`score_reconstruction`).

PSNR is finite by construction: identical images score exactly :data:`PSNR_CAP_DB`, and
no pair ever scores more. The cap is the same in the per-image scores, the matching cost
and the stored records (JSON cannot hold ``inf``). It is high enough that an exact
float64 reconstruction (e.g. SPEAR) is not clipped below what a float32 one reaches.
"""
from __future__ import annotations

import os
import warnings
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

PSNR_CAP_DB = 300.0
"""Upper limit of every PSNR value, in dB (reached by identical images: MSE ≤ 1e-30)."""

_MSE_FLOOR = 10.0 ** (-PSNR_CAP_DB / 10.0)

SSIM_WINDOW = 11
"""Side of the Gaussian SSIM window (Wang et al. 2004; skimage's ``gaussian_weights``)."""
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03

LPIPS_ENV_VAR = "FEDSIM_LPIPS_ALEXNET"
"""Environment variable naming torchvision's AlexNet ImageNet checkpoint (``.pth``)."""
LPIPS_MIN_SIDE = 32
"""Images smaller than this (per side) are bilinearly upsampled before LPIPS: AlexNet's
feature stack needs at least 31 pixels per side."""

MatchCost = Literal["psnr", "mse"]


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dim() != 4 or a.shape != b.shape:
        raise ValueError(
            f"expected two image batches of equal shape (N, C, H, W), got {tuple(a.shape)} "
            f"and {tuple(b.shape)}"
        )


def _psnr_from_mse(mse: torch.Tensor) -> torch.Tensor:
    """PSNR in dB for a data range of 1, capped at :data:`PSNR_CAP_DB`."""
    return -10.0 * torch.log10(mse.clamp_min(_MSE_FLOOR))


def _mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image mean squared error in float64; (N, C, H, W) × 2 -> (N,)."""
    return (a.double() - b.double()).pow(2).flatten(1).mean(dim=1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio 10·log10(1 / MSE) in dB, per image.

    ``a``, ``b``: (N, C, H, W) in [0, 1]. Returns (N,) float64 on the inputs' device,
    capped at :data:`PSNR_CAP_DB` (identical images score exactly the cap).
    """
    _check_pair(a, b)
    return _psnr_from_mse(_mse(a, b))


def _gaussian_window(size: int, sigma: float, like: torch.Tensor) -> torch.Tensor:
    """Normalised 1-D Gaussian taps, shape (size,), centred, dtype/device of ``like``."""
    x = torch.arange(size, dtype=like.dtype, device=like.device) - (size - 1) / 2
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    return g / g.sum()


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004), per image, averaged over channels.

    ``a``, ``b``: (N, C, H, W) in [0, 1] (data range 1). Gaussian window of side
    :data:`SSIM_WINDOW`, σ = :data:`SSIM_SIGMA`, K1 = 0.01, K2 = 0.03, population
    (co)variances. Local statistics are taken only where the window fits inside the image
    ("valid" filtering) and the SSIM map is averaged over those positions — exactly the
    region ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=1)`` averages after cropping its borders, so
    the two agree. Images smaller than the window use the largest odd window that fits
    (same σ, renormalised taps). Returns (N,) float64 on the inputs' device.
    """
    _check_pair(a, b)
    x, y = a.double(), b.double()
    channels, height, width = x.shape[1:]
    side = min(SSIM_WINDOW, height, width)
    side -= 1 - side % 2  # largest odd size that fits
    g = _gaussian_window(side, SSIM_SIGMA, x)
    kernel_h = g.view(1, 1, side, 1).expand(channels, 1, side, 1)
    kernel_w = g.view(1, 1, 1, side).expand(channels, 1, 1, side)

    def local_mean(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t, kernel_h, groups=channels), kernel_w, groups=channels)

    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x = local_mean(x * x) - mu_x * mu_x
    var_y = local_mean(y * y) - mu_y * mu_y
    cov_xy = local_mean(x * y) - mu_x * mu_y
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / (
        (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    )
    return ssim_map.flatten(1).mean(dim=1)


_lpips_unavailable_warned = False


def _default_alexnet_checkpoint() -> Path:
    """Where ``torchvision.models.alexnet(weights=IMAGENET1K_V1)`` caches its download."""
    from torchvision.models import AlexNet_Weights

    filename = os.path.basename(AlexNet_Weights.IMAGENET1K_V1.url)
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def lpips_checkpoint(alexnet_weights: str | os.PathLike[str] | None = None) -> Path | None:
    """The AlexNet checkpoint LPIPS will use (see :class:`LpipsScorer`), or None, after one
    warning per process that says how to enable LPIPS. An explicit path that does not exist
    raises FileNotFoundError."""
    global _lpips_unavailable_warned
    explicit = alexnet_weights if alexnet_weights is not None else os.environ.get(LPIPS_ENV_VAR)
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise FileNotFoundError(f"LPIPS AlexNet checkpoint not found: {path}")
        return path
    path = _default_alexnet_checkpoint()
    if path.is_file():
        return path
    if not _lpips_unavailable_warned:
        _lpips_unavailable_warned = True
        warnings.warn(
            f"LPIPS disabled: torchvision's ImageNet AlexNet checkpoint is not at {path} and "
            f"{LPIPS_ENV_VAR} is not set; LPIPS scores will be None. To enable LPIPS, copy "
            f"{path.name} (https://download.pytorch.org/models/{path.name}) there or "
            f"set {LPIPS_ENV_VAR}=/path/to/the/checkpoint.pth.",
            RuntimeWarning,
            stacklevel=3,
        )
    return None


class LpipsScorer:
    """LPIPS (Zhang et al. 2018, AlexNet trunk, v0.1 linear heads) as a leakage metric.

    LPIPS needs two sets of weights: its linear heads, which ship inside the ``lpips``
    package, and torchvision's ImageNet AlexNet, which is normally downloaded on first use.
    This class never downloads. It looks for the AlexNet checkpoint in, in order: the
    ``alexnet_weights`` argument, the :data:`LPIPS_ENV_VAR` environment variable, and the
    torch hub cache (``$TORCH_HOME/hub/checkpoints/alexnet-owt-7be5be79.pth``). A path
    given explicitly (argument or environment variable) must exist. When none is given and
    the cache has no checkpoint, :attr:`available` is False, :meth:`score` returns None
    and a single warning per process says how to enable LPIPS.
    """

    def __init__(
        self,
        alexnet_weights: str | os.PathLike[str] | None = None,
        device: str | torch.device | None = None,
        *,
        random_backbone_seed: int | None = None,
    ) -> None:
        """``device``: where the network runs; default ``cuda`` when available, else CPU.

        ``random_backbone_seed``: instead of loading the ImageNet trunk, initialise it
        randomly from this seed. That is not a perceptual metric; it exercises the
        plumbing (tests) with the real architecture and the real linear heads.
        """
        self.device = torch.device(
            device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        )
        self.source: str | None = None  # where the trunk weights came from; None: unavailable
        self._model: torch.nn.Module | None = None
        if random_backbone_seed is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(random_backbone_seed)
                self._model = self._build(None)
            self.source = f"random AlexNet trunk (seed {random_backbone_seed})"
            return
        path = lpips_checkpoint(alexnet_weights)
        if path is None:
            return
        self._model = self._build(path)
        self.source = str(path)

    def _build(self, checkpoint: Path | None) -> torch.nn.Module:
        """lpips.LPIPS with a random trunk (no download), then, when ``checkpoint`` is given,
        the trunk loaded from that torchvision AlexNet state dict (``features.<i>.*``)."""
        import lpips

        with warnings.catch_warnings():  # lpips uses torchvision's deprecated `pretrained=`
            warnings.simplefilter("ignore", UserWarning)
            model = lpips.LPIPS(net="alex", version="0.1", pretrained=True, pnet_rand=True, verbose=False)
        if checkpoint is not None:
            alexnet_state = torch.load(checkpoint, map_location="cpu", weights_only=True)
            trunk = {}
            for key in model.net.state_dict():  # "slice<k>.<i>.<param>" -> "features.<i>.<param>"
                torch_key = "features." + key.split(".", 1)[1]
                if torch_key not in alexnet_state:
                    raise ValueError(f"{checkpoint} is not a torchvision AlexNet state dict: no {torch_key!r}")
                trunk[key] = alexnet_state[torch_key]
            model.net.load_state_dict(trunk)
        return model.to(self.device).eval().requires_grad_(False)


    @property
    def available(self) -> bool:
        """Whether :meth:`score` computes LPIPS (False: the AlexNet weights are missing)."""
        return self._model is not None

    @torch.no_grad()
    def score(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
        """LPIPS distance per image pair (lower = more similar, 0 for identical images).

        ``a``, ``b``: (N, C, H, W) in [0, 1], C = 1 or 3 (grayscale is repeated to RGB);
        sides below :data:`LPIPS_MIN_SIDE` are bilinearly upsampled. Returns (N,) float32
        on the inputs' device, or None when :attr:`available` is False.
        """
        _check_pair(a, b)
        if self._model is None:
            return None
        if a.shape[0] == 0:
            return torch.zeros(0, device=a.device)
        height, width = a.shape[-2:]
        size = (max(height, LPIPS_MIN_SIDE), max(width, LPIPS_MIN_SIDE))

        def prepare(t: torch.Tensor) -> torch.Tensor:
            t = t.to(self.device, torch.float32)
            if t.shape[1] == 1:
                t = t.expand(-1, 3, -1, -1)
            if t.shape[-2:] != size:
                t = F.interpolate(t, size=size, mode="bilinear", align_corners=False)
            return t * 2.0 - 1.0

        return self._model(prepare(a), prepare(b)).flatten().to(a.device)


def _pairwise_cost(recon: torch.Tensor, truth: torch.Tensor, cost: MatchCost) -> np.ndarray:
    """(M, C, H, W), (N, C, H, W) -> (M, N) float64 cost: MSE, or −PSNR (capped)."""
    truth64 = truth.double().flatten(1)
    mse = torch.zeros(len(recon), len(truth), dtype=torch.float64, device=truth.device)
    for i, r in enumerate(recon):  # row by row: (M, N, C·H·W) at once may not fit in memory
        mse[i] = (truth64 - r.double().flatten()).pow(2).mean(dim=1)
    if cost == "psnr":
        return (-_psnr_from_mse(mse)).cpu().numpy()
    if cost == "mse":
        return mse.cpu().numpy()
    raise ValueError(f"unknown matching cost {cost!r}; allowed: 'psnr', 'mse'")


def match_reconstructions(
    recon: torch.Tensor, truth: torch.Tensor, cost: MatchCost = "psnr"
) -> tuple[list[int], list[int]]:
    """Optimal one-to-one pairing of reconstructions with ground-truth images.

    ``recon`` (M, C, H, W) and ``truth`` (N, C, H, W), both in [0, 1]. Minimises the summed
    pairwise cost (``"psnr"``: −PSNR, i.e. maximises total PSNR; ``"mse"``: total MSE) with
    the Hungarian algorithm. min(M, N) pairs are formed; surplus reconstructions or truths
    stay unpaired. Returns ``(rows, cols)``: ``recon[rows[k]]`` is paired with
    ``truth[cols[k]]``, ordered by ascending truth index (``cols == list(range(N))`` when
    M ≥ N).
    """
    if recon.dim() != 4 or truth.dim() != 4 or recon.shape[1:] != truth.shape[1:]:
        raise ValueError(
            f"expected (M, C, H, W) and (N, C, H, W) batches, got {tuple(recon.shape)} and "
            f"{tuple(truth.shape)}"
        )
    rows, cols = linear_sum_assignment(_pairwise_cost(recon, truth, cost))
    order = np.argsort(cols)
    return rows[order].tolist(), cols[order].tolist()


@dataclass(frozen=True)
class LeakageScores:
    """Leakage of one reconstruction against its ground truth, after optimal matching.

    Per-image lists have one entry per ground-truth image, in ground-truth order; an entry
    is None when no reconstruction was paired with that image (fewer reconstructions than
    truths). Means and bests are over the paired images only (None if there are none);
    ``recovered_share`` counts unpaired images as not recovered. PSNR in dB (capped at
    :data:`PSNR_CAP_DB`), SSIM in [-1, 1], LPIPS ≥ 0 (lower is better; the LPIPS fields
    are None when LPIPS was not computed).
    """

    num_images: int  # N, ground-truth images
    num_reconstructions: int  # M, images the attack returned
    matching: list[int | None]  # per truth: index of its reconstruction, or None
    psnr: list[float | None]
    ssim: list[float | None]
    lpips: list[float | None] | None
    psnr_mean: float | None
    psnr_best: float | None  # max
    ssim_mean: float | None
    ssim_best: float | None  # max
    lpips_mean: float | None
    lpips_best: float | None  # min
    label_acc: float | None  # multiset overlap of labels / N; None when no labels were recovered
    recovered_psnr: float  # threshold, dB
    recovered_share: float  # fraction of truths whose paired PSNR >= recovered_psnr

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (ints, floats, None, lists)."""
        return asdict(self)


def label_accuracy(recon_labels: torch.Tensor, truth_labels: torch.Tensor) -> float:
    """Fraction of true labels recovered, compared as multisets (order-free, counting
    multiplicities): |recon ∩ truth| / N. ``recon_labels`` (M,), ``truth_labels`` (N,), N ≥ 1."""
    overlap = Counter(recon_labels.tolist()) & Counter(truth_labels.tolist())
    return sum(overlap.values()) / len(truth_labels)


def _per_truth(values: torch.Tensor, cols: list[int], n: int) -> list[float | None]:
    out: list[float | None] = [None] * n
    for col, value in zip(cols, values.tolist()):
        out[col] = float(value)
    return out


def _mean(values: torch.Tensor) -> float | None:
    return float(values.double().mean()) if len(values) else None


def _extreme(values: torch.Tensor, largest: bool) -> float | None:
    if not len(values):
        return None
    return float(values.max() if largest else values.min())


def score_reconstruction(
    recon_unit: torch.Tensor,
    truth_unit: torch.Tensor,
    recon_labels: torch.Tensor | None,
    truth_labels: torch.Tensor,
    recovered_psnr: float = 20.0,
    lpips: LpipsScorer | None = None,
) -> LeakageScores:
    """Match ``recon_unit`` (M, C, H, W) to ``truth_unit`` (N, C, H, W) — both in [0, 1] —
    by maximum total PSNR and score every pair.

    ``recon_labels`` (M,) int or None (attack recovered none); ``truth_labels`` (N,) int.
    ``recovered_psnr``: dB threshold at or above which a truth counts as recovered.
    ``lpips``: scorer to use; LPIPS fields are None without one or when it is unavailable.
    """
    n = truth_unit.shape[0]
    if n == 0:
        raise ValueError("cannot score against an empty ground-truth batch")
    if truth_labels.shape != (n,):
        raise ValueError(f"truth_labels must have shape ({n},), got {tuple(truth_labels.shape)}")
    rows, cols = match_reconstructions(recon_unit, truth_unit)
    paired_recon, paired_truth = recon_unit[rows], truth_unit[cols]
    psnr_vals = psnr(paired_recon, paired_truth)
    ssim_vals = ssim(paired_recon, paired_truth)
    lpips_vals = lpips.score(paired_recon, paired_truth) if lpips is not None else None

    matching: list[int | None] = [None] * n
    for row, col in zip(rows, cols):
        matching[col] = row
    return LeakageScores(
        num_images=n,
        num_reconstructions=recon_unit.shape[0],
        matching=matching,
        psnr=_per_truth(psnr_vals, cols, n),
        ssim=_per_truth(ssim_vals, cols, n),
        lpips=None if lpips_vals is None else _per_truth(lpips_vals, cols, n),
        psnr_mean=_mean(psnr_vals),
        psnr_best=_extreme(psnr_vals, largest=True),
        ssim_mean=_mean(ssim_vals),
        ssim_best=_extreme(ssim_vals, largest=True),
        lpips_mean=None if lpips_vals is None else _mean(lpips_vals),
        lpips_best=None if lpips_vals is None else _extreme(lpips_vals, largest=False),
        label_acc=None if recon_labels is None else label_accuracy(recon_labels, truth_labels),
        recovered_psnr=float(recovered_psnr),
        recovered_share=int((psnr_vals >= recovered_psnr).sum()) / n,
    )
