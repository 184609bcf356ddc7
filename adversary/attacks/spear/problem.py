"""SPEAR's parameters and result, the batch-size estimate (numerical rank of G), and the
factored problem ``G = L R`` with its candidate type and noise-aware zero tests."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SpearParams:
    """Parameters of the SPEAR attack (``[attack.spear]``)."""

    batch_size: int = field(default=0, metadata={"min": 0, "doc": "batch size; 0 = estimate from the numerical rank of the weight gradient"})
    rank_tol: float = field(default=1e-10, metadata={"gt": 0.0, "max": 1.0, "doc": "singular values below rank_tol x the largest are ignored; the batch size sits at the largest gap of the spectrum above that"})
    sparsity_threshold: float = field(default=0.2, metadata={"min": 0.0, "max": 1.0, "doc": "tau: a candidate needs at least tau x (live rows) zeros; 0 disables the sparsity filter"})
    zero_tol: float = field(default=1e-6, metadata={"gt": 0.0, "doc": "|l_r . q| below this (unit rows, unit q) counts as a zero after refitting"})
    search_tol: float = field(default=3e-5, metadata={"gt": 0.0, "doc": "zero tolerance of the float32 search (before refitting)"})
    batch_per_step: int = field(default=0, metadata={"min": 0, "doc": "submatrices (b-1 rows) examined per vectorised step; 0 = 2^17 on CPU, 2^21 on CUDA (paper: ~1e4 per GPU step)"})
    max_samples: int = field(default=10**13, metadata={"min": 1, "doc": "budget of submatrices examined (the time budget usually binds first)"})
    time_budget_s: float = field(default=600.0, metadata={"gt": 0.0, "doc": "wall-clock budget of the search (the context deadline also applies)"})
    free_dims: int = field(default=10, metadata={"min": 2, "max": 16, "doc": "K: null-space dimension at a search-tree root (b - K rows solved by QR, K - 1 added by reflections)"})
    endgame: int = field(default=3, metadata={"min": 0, "max": 3, "doc": "complete the last <= endgame directions from the ReLU pattern (needs the layer weights)"})
    layer: str = field(default="", metadata={"doc": "module name of the linear layer to invert; empty = the first nn.Linear"})
    feature_fit_iterations: int = field(default=0, metadata={"min": 0, "doc": "layer deeper than the image: signed-Adam steps fitting images to the recovered features (0 = report the features only)"})
    fit_lr: float = field(default=0.1, metadata={"gt": 0.0, "doc": "Adam step size of the feature fit (signed steps, from random images)"})
    refine_iterations: int = field(default=0, metadata={"min": 0, "doc": "Geiping steps on the unrolled update-matching objective from SPEAR's images (0 = off): fitted images all move, recovered ones only where SPEAR's check flagged them (unchecked batches are left alone)"})
    refine_lr: float = field(default=0.01, metadata={"gt": 0.0, "doc": "Adam step size of the refinement (signed steps; small: the start is close)"})
    refine_tv_weight: float = field(default=0.0, metadata={"min": 0.0, "doc": "TV prior of the refinement (Geiping uses 0.01 from random images; SPEAR's start needs none)"})
    active_zeros: int = field(default=0, metadata={"min": 0, "doc": "zero rows of a direction that may belong to active neurons (a gradient entry below the noise floor): the realisability LP and the ReLU check forgive up to this many per example; 0 = every zero must be an inactive neuron"})
    guide: str = field(default="none", metadata={"choices": ("none", "geiping", "previous"), "doc": "what supplies an approximate batch whose predicted inactive neurons guide the sampling: none (uniform search only), geiping (a Geiping run on the same update, guide_iterations steps), previous (the server's earlier reconstruction of this client, Observation.prior)"})
    guide_iterations: int = field(default=500, metadata={"min": 1, "doc": "Geiping steps of the guide (guide = geiping); they count against the attack's deadline"})
    guide_draws: int = field(default=8192, metadata={"min": 1, "doc": "guided submatrices per guide example at most (bounds what a useless guide costs on top of the uniform search)"})


@dataclass
class SpearResult:
    """Outcome of :func:`adversary.attacks.spear.inversion.spear_invert_linear`.

    ``X`` (b×n) the layer inputs, ``delta`` (b×m) the pre-activation gradients ∂L/∂Z,
    both float64 on the CPU, None on failure. ``exact`` is True when every recovered
    input reproduces the observed zero pattern of its δ (None when the weights were not
    given). ``status`` is "exact", "consistent" (a checker, not the weights, passed the
    batch), "unverified" (nothing to check against), "inconsistent" or "failed: ...".
    """

    X: torch.Tensor | None
    delta: torch.Tensor | None
    batch_size: int
    samples: int
    seconds: float
    exact: bool | None
    status: str
    singular_values: list[float]
    found: int
    candidates: int
    endgame_used: bool = False
    mismatches: int | None = None  # the check's count summed over the batch
    rejected_mixtures: int = 0
    rejected_unrealisable: int = 0
    rejected_next_layer: int = 0  # candidates whose δ is not W_nextᵀ g on its nonzero rows
    inconsistent: list[int] | None = None  # rows of X the check flagged (None: nothing checked)
    guided_samples: int = 0  # submatrices drawn from the guide (included in samples)
    guide_covered: int | None = None  # guide examples whose noiseless draw lies in a found zero set

    def summary(self) -> dict:
        return {"status": self.status, "estimated_batch_size": self.batch_size, "samples": self.samples,
                "seconds": round(self.seconds, 3), "exact": self.exact, "directions_found": self.found,
                "candidates": self.candidates, "rejected_mixtures": self.rejected_mixtures,
                "rejected_unrealisable": self.rejected_unrealisable,
                "rejected_next_layer": self.rejected_next_layer, "endgame_used": self.endgame_used,
                "mismatches": self.mismatches, "inconsistent_examples": self.inconsistent,
                "guided_samples": self.guided_samples, "guide_covered": self.guide_covered}


def estimate_batch_size(singular_values: torch.Tensor, rank_tol: float = 1e-10) -> int:
    """Numerical rank of G from its singular values (descending): the position of the largest
    gap σ_k / σ_{k+1} (≥ 1e3) among the values above ``rank_tol`` times the largest. Float32
    gradients show ~1e6 between signal and rounding noise, updates rounded to float32 ~1e4.
    The drop from the last value above the floor to the floor only counts when there is no
    other gap (noise entirely below the floor, e.g. float64 gradients)."""
    s = singular_values.double()
    if s.numel() == 0 or float(s[0]) <= 0.0:
        return 0
    floor = rank_tol * float(s[0])
    k = int((s > floor).sum())
    ratios = s[:k] / torch.cat([s[1:], s.new_zeros(1)])[:k].clamp_min(floor)
    inner = ratios[:k - 1] if k < s.numel() else ratios
    if inner.numel() and float(inner.max()) >= 1e3:
        return int(inner.argmax()) + 1
    return k  # the drop to the floor, or no gap at all: every value above the floor is signal


@dataclass
class Candidate:
    q: torch.Tensor  # (b,) float64 unit direction of δ = L q
    zeros: torch.Tensor  # (m_live,) bool
    count: int
    margin: float | None = None  # LP realisability margin (None if not checked)
    hits: int = 1  # sampled submatrices that led to this direction (true ones recur, mixtures rarely)


class Problem:
    """The factored gradient and everything derived from it (float64, CPU)."""

    def __init__(self, grad_weight: torch.Tensor, grad_bias: torch.Tensor, b: int,
                 weight: torch.Tensor | None, bias: torch.Tensor | None, U, S, Vh, params: "SpearParams",
                 checker=None, next_weight: torch.Tensor | None = None):
        self.m, self.n = grad_weight.shape
        self.b = b
        self.L = U[:, :b] * S[:b]  # (m, b)
        self.R = Vh[:b]  # (b, n)
        norms = self.L.norm(dim=1)
        # noise floor of G (float32 gradients, or Δ = θ' − θ rounded to float32): σ_{b+1}
        self.noise = float(S[b]) if b < len(S) else 0.0
        self.dead = norms <= 1e-12 * float(norms.max())  # neurons inactive for the whole batch
        self.live = norms > max(1e-12 * float(norms.max()), self.noise)
        self.uncertain = ~self.live & ~self.dead  # rows lost in the noise: no verdict on them
        self.live_idx = self.live.nonzero().squeeze(1)
        self.Lh = self.L[self.live] / norms[self.live].unsqueeze(1)  # unit rows (m_live, b)
        self.m_live = int(self.live.sum())
        # per-entry noise of G: σ_{b+1} ≈ σ_e (√(m−b) + √(n−b)) for i.i.d. rounding noise σ_e; a
        # unit row's product with a unit q then carries noise ≈ σ_e / |L_r|. The factor L itself
        # is off by about σ_{b+1}/σ_b (Davis-Kahan: the noise tilts the rank-b subspace), which
        # dominates for small updates rounded to float32 (Δ of lr 0.01: true zeros measured at
        # up to 0.13 σ_{b+1}/σ_b, 20x the entry noise). row_noise, the floor of each row's zero
        # tolerance, is the larger of 5x the entry noise and 0.3 σ_{b+1}/σ_b (higher lets
        # genuinely small entries pass as zeros).
        m, n = grad_weight.shape
        sigma_e = self.noise / (math.sqrt(max(m - b, 1)) + math.sqrt(max(n - b, 1)))
        tilt = 0.3 * self.noise / float(S[b - 1]) if b >= 1 else 0.0
        self.row_noise = (5.0 * sigma_e / norms[self.live]).clamp(min=tilt)
        # the float32 search needs a tolerance above the floor (leaf tests, refit start)
        self.search_tol = max(params.search_tol, 3.0 * tilt)
        self.zero_tol = params.zero_tol
        self.active_zeros = params.active_zeros  # zeros per example the ReLU check forgives on active neurons
        gb = grad_bias.double().reshape(-1, 1)
        self.s = torch.linalg.lstsq(self.L, gb).solution.squeeze(1)  # Q 1 = s
        self.checker = checker  # per-example consistency of a candidate batch (see spear_invert_linear)
        self.weight = None if weight is None else weight.detach().double().cpu()
        self.bias = None if bias is None else bias.detach().double().cpu()
        if self.weight is not None:
            self.M = self.weight @ self.R.T  # (m, b): pre-activation of x = c R is M c + bias
            self.beta = self.bias if self.bias is not None else torch.zeros(self.m, dtype=torch.float64)
        # (o, m) weight of the linear layer fed by ReLU(Z) alone, at the gradient's θ (None: unknown)
        self.next_weight = None if next_weight is None else next_weight.detach().double().cpu()


def zero_pattern(prob: "Problem", q: torch.Tensor, tol: float) -> torch.Tensor:
    """Zero pattern of the candidate δ = L q over the live rows (per-row noise-aware tolerance)."""
    return (prob.Lh @ q).abs() < prob.row_noise.clamp(min=tol)


def borderline(prob: "Problem", q: torch.Tensor, tol: float) -> torch.Tensor:
    """Live rows (m_live,) bool where δ = L q is within a factor 3 of its zero tolerance either
    way: too close to call, so the ReLU-pattern checks (LP, final check) give them no verdict."""
    ratio = (prob.Lh @ q).abs() / prob.row_noise.clamp(min=tol)
    return (ratio > 1 / 3) & (ratio < 3)


def null_direction(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Right singular vector of the smallest singular value, and all singular values."""
    _, sv, vh = torch.linalg.svd(A, full_matrices=True)
    return vh[-1], sv
