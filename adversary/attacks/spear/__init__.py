"""SPEAR: exact inversion of a batch through a linear layer followed by ReLU.

Dimitrov, Baader, Müller, Vechev, "SPEAR: Exact Gradient Inversion of Batches in
Federated Learning" (NeurIPS'24); facts and pitfalls in ``shared/REFERENCES.md``. Our own
implementation; the sampling is organised differently from the paper (see *Search*).

Notation (one linear layer ``Z = X Wᵀ + b`` per example, batch ``b``, then ReLU):

- ``G = ∂L/∂W = Δᵀ X`` (m×n) with ``Δ = ∂L/∂Z`` (b×m), so ``rank G = b``;
  ``∂L/∂b = Σ_i δ_i``. The batch size is the numerical rank of ``G`` (singular values
  above ``rank_tol`` times the largest; float32 noise sits near 1e-8, the b-th value
  near 1e-2).
- ``G = L R`` (SVD; ``L`` m×b, ``R`` b×n). Then ``Δᵀ = L Q`` and ``X = Q⁻¹ R`` for an
  unknown invertible b×b ``Q``. ReLU makes each column ``δ_i = L q_i`` vanish on the rows
  ``Z_i`` of the neurons example ``i`` leaves inactive (about half of them).
- A set of ``b − 1`` rows of ``L`` inside one ``Z_i`` has ``q_i`` as its null vector; a
  random set is inside some ``Z_i`` with probability ≈ ``b·ρ^(b−1)`` (ρ ≈ ½).
- Candidates: the sparsity filter (at least ``τ·m`` zeros among the live rows), a
  least-squares refit on the whole zero set (float32 gradients bend a direction fitted to
  b − 1 rows), rejection of zero sets with a ≥ 2-D null space, deduplication by direction.
  Spurious *mixtures* ``α q_i + β q_j`` are the main hazard (REFERENCES pitfalls: similar
  images share so many inactive neurons that a mixture vanishing on ``Z_i ∩ Z_j`` is as
  sparse as a true direction). They come from b − 2 sampled rows in ``Z_i ∩ Z_j`` plus
  one row ``a`` that fixes the combination, so without ``a`` their zero set has a 2-D
  null space: candidates whose uniqueness rests on a single row are rejected. With the
  layer's weights, a candidate must also be *realisable*: some input ``x = c R`` in the
  row space of ``G`` must produce exactly its activation pattern (a small LP).
- Scales: ``∂L/∂b = L Q 1`` gives ``Q 1 = s := L⁺ ∂L/∂b``; with unit directions ``Q̂``,
  ``Q = Q̂ diag(α)``, ``α = Q̂⁻¹ s``. ``X = diag(1/α) Q̂⁻¹ R`` is exact whatever the
  loss scaling (the batch-mean ``1/b`` sits in ``Δ`` and cancels in ``X``; so does any
  common factor of both gradients such as lr).
- Selection (two-stage greedy): candidates by decreasing zero count while linearly
  independent; then, if the ReLU check fails, swaps of the worst column for unused
  candidates. Check: ``x_i Wᵀ + b ≤ 0`` exactly where ``δ_i = 0`` (``exact``).
  Without the weights nothing can be checked (``unverified``); then only directions
  reached by at least two sampled submatrices are eligible.
- Noise: G is known only up to rounding (float32 gradients, or an update Δ = θ' − θ
  stored in float32: then about 1e-6 of G). The per-entry noise is estimated from
  ``σ_{b+1}``; every zero test uses a per-row tolerance of at least 5 noise standard
  deviations, rows lost in the noise (e.g. neurons dead for the whole batch, which weight
  decay moves) count as neither zero nor live.

Search
------
Each *submatrix* examined is a set of ``b − 1`` live rows of ``L`` and its null vector,
tested for zeros against other rows. They are organised as a tree so that they share
work: a *root* draws ``b − K`` random rows (``K = free_dims``) and computes their
K-dimensional null space with one small QR; each tree level then adds one more row (a
Householder reflection of the rows still needed, one batched matmul per level, in
float32), branching 2 ways on most levels, 3 on the second-to-last and over a whole
block of 7 rows on the last, so one root yields ~2.7·10³ ``(b − 1)``-row submatrices
("leaves") for little more than the cost of solving a few. Rows of one path come from
disjoint random blocks, so no row repeats on a path. A leaf is tested on 14 further rows
(at least 3 zeros needed); survivors are re-solved in float64 from their ``b − 1`` rows
and go through the checks above. Leaves are what ``samples`` counts. Each leaf is inside
some ``Z_i`` with the paper's probability, at a fraction of the cost, but leaves of one
root are correlated: per leaf the search needs several times more samples than
independent sampling would (``benchmarks/spear.py`` measures both).

Endgame (needs the layer's weights): the rows ``c_i`` of ``Q⁻¹`` satisfy ``c_j · q_i = 0``
(i ≠ j) and ``c_j · s = 1``. With all but ``k ≤ 2`` directions found, the missing
``c_j`` lie on a point (k = 1) or a line (k = 2), and ``x_j = c_j R`` has pre-activation
``M c_j + b`` with ``M = W Rᵀ``. Along the line the activation pattern changes at m
break points; the true ``c_j`` are in the intervals whose inactive rows make ``L_Z``
rank-deficient. This finds the hardest (least sparse) directions in milliseconds, where
sampling would spend about two thirds of its time on the last two.

FedAvg (several local steps)
----------------------------
K local SGD steps give ``−Δ/lr = Σ_j a_j (g_j + wd·θ_j)`` (momentum weights ``a_j``);
:func:`adversary.maths.unroll.observed_gradient` removes the weight-decay part (θ_j by linear
drift). The remainder's weight part is ``Σ_i u_i x_iᵀ`` with ``u_i = Σ_{j ∋ i} a_j δ_i^(j)/B``:
still rank n (the distinct examples), and ``u_i`` still vanishes on every neuron example i
left inactive in *all* its steps. So SPEAR's model holds exactly; what degrades is sparsity
(a neuron that wakes up in any step is lost as a zero), which makes the search longer and
mixtures likelier. The ReLU checks need the weights the gradient was taken at, which moved
after the first step; with full batches the attacker can instead replay the whole local
training on a candidate batch (``adversary.spear_extensions.replay_checker``), which takes
the checks' place ("consistent"); with shuffled mini-batches nothing is checked
("unverified").

The registered attack (:func:`run`, name ``"spear"``) is at the end of the module; images
from feature-space results and the refinement with the unrolled objective live in
``adversary.spear_extensions``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from adversary.maths.matching import BN_WEIGHT, TV_WEIGHT, num_examples
from adversary.observation import Observation, Reconstruction, global_model
from adversary.attacks.base import Attack, AttackContext
from adversary.attacks.spear.replay import (REPLAY_TOL, fit_images_to_features, refine_images, replay_checker,
                                           replay_layer_gradients, slot_labels)
from adversary.maths.unroll import observed_gradient


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


@dataclass
class SpearResult:
    """Outcome of :func:`spear_invert_linear`.

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
    inconsistent: list[int] | None = None  # rows of X the check flagged (None: nothing checked)

    def summary(self) -> dict:
        return {"status": self.status, "estimated_batch_size": self.batch_size, "samples": self.samples,
                "seconds": round(self.seconds, 3), "exact": self.exact, "directions_found": self.found,
                "candidates": self.candidates, "rejected_mixtures": self.rejected_mixtures,
                "rejected_unrealisable": self.rejected_unrealisable, "endgame_used": self.endgame_used,
                "mismatches": self.mismatches, "inconsistent_examples": self.inconsistent}


# ----------------------------------------------------------------------------- rank


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


# ----------------------------------------------------------------------------- candidates


@dataclass
class _Candidate:
    q: torch.Tensor  # (b,) float64 unit direction of δ = L q
    zeros: torch.Tensor  # (m_live,) bool
    count: int
    margin: float | None = None  # LP realisability margin (None if not checked)
    hits: int = 1  # sampled submatrices that led to this direction (true ones recur, mixtures rarely)


class _Problem:
    """The factored gradient and everything derived from it (float64, CPU)."""

    def __init__(self, grad_weight: torch.Tensor, grad_bias: torch.Tensor, b: int,
                 weight: torch.Tensor | None, bias: torch.Tensor | None, U, S, Vh, params: "SpearParams",
                 checker=None):
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
        gb = grad_bias.double().reshape(-1, 1)
        self.s = torch.linalg.lstsq(self.L, gb).solution.squeeze(1)  # Q 1 = s
        self.checker = checker  # per-example consistency of a candidate batch (see spear_invert_linear)
        self.weight = None if weight is None else weight.detach().double().cpu()
        self.bias = None if bias is None else bias.detach().double().cpu()
        if self.weight is not None:
            self.M = self.weight @ self.R.T  # (m, b): pre-activation of x = c R is M c + bias
            self.beta = self.bias if self.bias is not None else torch.zeros(self.m, dtype=torch.float64)


def _zeros(prob: "_Problem", q: torch.Tensor, tol: float) -> torch.Tensor:
    """Zero pattern of the candidate δ = L q over the live rows (per-row noise-aware tolerance)."""
    return (prob.Lh @ q).abs() < prob.row_noise.clamp(min=tol)


def _borderline(prob: "_Problem", q: torch.Tensor, tol: float) -> torch.Tensor:
    """Live rows (m_live,) bool where δ = L q is within a factor 3 of its zero tolerance either
    way: too close to call, so the ReLU-pattern checks (LP, final check) give them no verdict."""
    ratio = (prob.Lh @ q).abs() / prob.row_noise.clamp(min=tol)
    return (ratio > 1 / 3) & (ratio < 3)


def _null_direction(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Right singular vector of the smallest singular value, and all singular values."""
    _, sv, vh = torch.linalg.svd(A, full_matrices=True)
    return vh[-1], sv


def _slack(prob: _Problem, zeros: torch.Tensor, zero_tol: float) -> float:
    """Σ over the zero rows of their squared tolerances: how small ‖L_Z v‖² may be for a
    direction v that vanishes on Z up to noise."""
    return float((prob.row_noise[zeros].clamp(min=zero_tol) ** 2).sum())


def _refit(prob: _Problem, q: torch.Tensor, zero_tol: float, search_tol: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Least-squares refit of direction ``q`` on its whole zero set, tightening the tolerance.

    Each unit row is weighted by the inverse of its zero tolerance (a row of small norm is
    noisy once normalised: unweighted, one such row tilted the fit by 5e-6 rad and halved the
    zero set of a true direction). Rejects (None) zero sets that leave a >= 2-D null space: a
    second direction vanishing on Z up to noise (weighted residual at most 1 per row) means Z
    lies in an intersection Z_i ∩ Z_j (a mixture of directions)."""
    Lh = prob.Lh
    b = prob.b
    weights = 1.0 / prob.row_noise.clamp(min=zero_tol)
    zeros = None
    for tol in (search_tol, math.sqrt(search_tol * zero_tol), zero_tol, zero_tol):
        new = _zeros(prob, q, tol)
        if int(new.sum()) < b - 1:
            return None
        if zeros is not None and torch.equal(new, zeros) and tol == zero_tol:
            break
        zeros = new
        q_new, sv = _null_direction(Lh[zeros] * weights[zeros].unsqueeze(1))
        if b >= 2 and sv.numel() >= b - 1:
            second = float(sv[b - 2])
            if second < 1e-7 * float(sv[0]) or second ** 2 <= int(zeros.sum()):
                return None
        q = q_new
    zeros = _zeros(prob, q, zero_tol)
    if int(zeros.sum()) < b - 1:
        return None
    if q[q.abs().argmax()] < 0:
        q = -q
    return q, zeros


def _single_row_support(prob: _Problem, q: torch.Tensor, zeros: torch.Tensor, zero_tol: float) -> bool:
    """True when the zero set pins ``q`` down only thanks to one row: without that row its
    null space is 2-D (up to noise). That is the signature of a mixture ``α q_i + β q_j``
    sampled from b - 2 rows of ``Z_i ∩ Z_j`` plus one other row ``a``: it vanishes on
    ``Z_i ∩ Z_j ∪ {a}``. Rows are screened by their leverage in the complement of ``q``
    (1 = essential); for the high-leverage ones the downdated Gram matrix is checked."""
    b = prob.b
    if b < 2:
        return False
    basis = torch.linalg.qr(torch.cat([q.unsqueeze(1), torch.eye(b, dtype=q.dtype)], 1))[0][:, 1:b]
    Y = prob.Lh[zeros] @ basis  # (|Z|, b-1)
    U, sv, _ = torch.linalg.svd(Y, full_matrices=False)
    slack = _slack(prob, zeros, zero_tol)
    if float(sv[-1]) ** 2 <= slack or float(sv[-1]) < 1e-12 * float(sv[0]):
        return True
    leverage = (U * U).sum(1)
    if bool((1.0 - leverage).min() < 1e-9):
        return True
    suspects = (leverage > 0.5).nonzero().squeeze(1)
    if suspects.numel() == 0:
        return False
    gram = Y.T @ Y
    ys = Y[suspects]
    down = gram.unsqueeze(0) - ys.unsqueeze(2) * ys.unsqueeze(1)
    return bool((torch.linalg.eigvalsh(down)[:, 0] <= slack).any())


def _lp_margin(prob: _Problem, zeros_live: torch.Tensor, borderline_live: torch.Tensor) -> float:
    """Largest margin t such that some input x = c R is inactive exactly on the zero set.

    Rows: live rows in the zero set and dead rows (inactive for the whole batch) need
    (M c + bias)_r <= -t |(M_r, bias_r)|, the other live rows >= +t |...|. t <= 1.
    Borderline live rows (:func:`_borderline`) are left out.
    """
    from scipy.optimize import linprog

    inactive = torch.ones(prob.m, dtype=torch.bool)
    inactive[prob.live_idx] = zeros_live
    judged = ~prob.uncertain
    judged[prob.live_idx] &= ~borderline_live
    sign = torch.where(inactive, 1.0, -1.0).double()[judged]  # constraint: sign*(Mc + beta) + t*norm <= 0
    M, beta = prob.M[judged], prob.beta[judged]
    scale = torch.cat([M, beta.unsqueeze(1)], 1).norm(dim=1).clamp_min(1e-300)
    A_ub = torch.cat([sign.unsqueeze(1) * M / scale.unsqueeze(1), torch.ones(len(M), 1, dtype=torch.float64)], 1)
    b_ub = -sign * beta / scale
    cost = np.zeros(prob.b + 1)
    cost[-1] = -1.0
    bounds = [(None, None)] * prob.b + [(None, 1.0)]
    res = linprog(cost, A_ub=A_ub.numpy(), b_ub=b_ub.numpy(), bounds=bounds, method="highs")
    if res.status != 0:
        return -math.inf
    return float(res.x[-1])


class _Pool:
    """Accepted, deduplicated candidate directions."""

    def __init__(self, prob: _Problem, params: SpearParams, use_filter: bool, check_lp: bool):
        self.prob = prob
        self.params = params
        self.min_zeros = max(prob.b - 1, math.ceil(params.sparsity_threshold * prob.m_live)) if use_filter else 0
        self.check_lp = check_lp
        self.items: list[_Candidate] = []
        self.rejected_lp = 0
        self.rejected_mixture = 0
        self.seen = 0

    def find(self, q: torch.Tensor) -> _Candidate | None:
        for c in self.items:
            if abs(float(q @ c.q)) > 1 - 1e-9:
                return c
        return None

    def offer_direction(self, q0: torch.Tensor) -> _Candidate | None:
        """Refit, filter, deduplicate, check. Returns the accepted candidate (an existing
        one if it is a duplicate) or None when rejected."""
        self.seen += 1
        fitted = _refit(self.prob, q0, self.params.zero_tol, self.prob.search_tol)
        if fitted is None:
            return None
        q, zeros = fitted
        count = int(zeros.sum())
        if count < self.min_zeros:
            return None
        known = self.find(q)
        if known is not None:
            known.hits += 1
            return known
        if self.min_zeros > 0 and _single_row_support(self.prob, q, zeros, self.params.zero_tol):
            self.rejected_mixture += 1
            return None
        margin = None
        if self.check_lp:
            margin = _lp_margin(self.prob, zeros, _borderline(self.prob, q, self.params.zero_tol))
            if margin < -1e-3:  # measured: true patterns reach the cap (1), mixtures -0.1 .. -0.35
                self.rejected_lp += 1
                return None
        cand = _Candidate(q, zeros, count, margin)
        self.items.append(cand)
        return cand

    def offer_rows(self, rows: torch.Tensor, stop_at: float) -> None:
        """Sampled sets of b-1 live-row indices (H, b-1): their null vectors are candidates.

        Vectorised pre-processing: row sets inside a known zero set only re-find it (counted
        as hits); null vectors by one batched QR; directions already known, not sparse
        enough, or repeated within the batch are dropped before the per-candidate refit."""
        prob, b = self.prob, self.prob.b
        if self.items and self.min_zeros > 0:
            # a path inside the zero set of a known direction re-finds it (or is degenerate)
            known_zeros = torch.stack([c.zeros for c in self.items], 0)  # (k, m_live)
            inside_k = known_zeros[:, rows].all(2)  # (k, H)
            for c, n_in in zip(self.items, inside_k.sum(1).tolist()):
                c.hits += n_in
            rows = rows[~inside_k.any(0)]
        for chunk in rows.split(4096):
            # null vector: last column of the complete QR of A^T (cheaper than an SVD)
            Qc, Rc = torch.linalg.qr(prob.Lh[chunk].transpose(1, 2), mode="complete")
            q = Qc[:, :, -1]  # (H, b)
            diag = Rc.diagonal(dim1=1, dim2=2).abs()
            ok = diag.amin(1) >= 1e-7 * diag.amax(1)  # else >= 2-D null space
            if self.items:
                known = torch.stack([c.q for c in self.items], 1)
                best, which = (q @ known).abs().max(1)
                again = ok & (best >= 1 - 1e-5)
                for k in which[again].tolist():
                    self.items[k].hits += 1
                ok &= best < 1 - 1e-5
            if self.min_zeros > 0:
                zeros = ((q @ prob.Lh.T).abs() < prob.row_noise.clamp(min=prob.search_tol)).sum(1)
                ok &= zeros >= min(self.min_zeros, prob.m_live) * 0.9
            idx = ok.nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            qs = q[idx]
            same = (qs @ qs.T).abs() > 1 - 1e-5
            first = (same.float().tril(-1).sum(1) == 0).nonzero().squeeze(1)  # first of each group
            group = same[first].sum(1).tolist()
            for i, size in zip(first.tolist(), group):
                q0 = qs[i]
                if self.min_zeros == 0:  # sparsity filter disabled: every sample is a candidate
                    self.seen += 1
                    if self.find(q0) is None:
                        z = _zeros(prob, q0, self.params.zero_tol)
                        self.items.append(_Candidate(q0 if q0[q0.abs().argmax()] >= 0 else -q0, z, int(z.sum())))
                    if len(self.items) >= b:
                        return
                else:
                    cand = self.offer_direction(q0)
                    if cand is not None:
                        cand.hits += size - 1
                if time.monotonic() >= stop_at:
                    return


# ----------------------------------------------------------------------------- search tree


@dataclass(frozen=True)
class _TreeShape:
    K: int  # free dimensions at the root
    W: int  # rows per level block
    ntest: int  # test rows per leaf
    branches: tuple[int, ...]  # children per level (K - 1 levels)

    @property
    def leaves_per_root(self) -> int:
        return int(np.prod(self.branches)) if self.branches else 1


def _tree_shape(b: int, m_live: int, free_dims: int) -> _TreeShape | None:
    for K in range(min(free_dims, b), 1, -1):
        avail = m_live - (b - K)
        levels = K - 1
        W = min(7, (avail - 4) // levels) if levels else 0
        if W < 2:
            continue
        ntest = min(14, avail - W * levels)
        if levels == 1:
            branches: tuple[int, ...] = (W,)
        elif levels == 2:
            branches = (min(3, W), W)
        else:
            branches = (2,) * (levels - 2) + (min(3, W), W)
        return _TreeShape(K, W, ntest, branches)
    return None


def _search_round(Lh: torch.Tensor, shape: _TreeShape, n_roots: int, tol: float, min_leaf_zeros: int,
                  gen: torch.Generator) -> tuple[int, torch.Tensor]:
    """One vectorised step: ``n_roots`` trees; returns (leaves examined, (hits, b-1) live-row indices)."""
    m, b = Lh.shape
    dev = Lh.device
    K, W = shape.K, shape.W
    npre = b - K
    levels = K - 1
    pool = levels * W + shape.ntest
    perm = torch.rand(n_roots, m, generator=gen, device=dev).argsort(1)
    pre = perm[:, :npre]
    ids = perm[:, npre:npre + pool]
    if npre > 0:
        A = Lh[pre]  # (n, b-K, b)
        Qf, Rf = torch.linalg.qr(A.transpose(1, 2), mode="complete")
        basis = Qf[:, :, npre:]
        valid = Rf.diagonal(dim1=1, dim2=2).abs().amin(1) > 1e-4
    else:
        basis = torch.eye(b, dtype=Lh.dtype, device=dev).expand(n_roots, b, b)
        valid = torch.ones(n_roots, dtype=torch.bool, device=dev)
    P = Lh[ids] @ basis  # (n, pool, K): rows in coordinates of the null space
    n, d = n_roots, K
    picks: list[torch.Tensor] = []  # per level: (nodes, B) pivot positions in the pool
    for lev, B in enumerate(shape.branches):
        if B >= W:
            js = torch.arange(W, device=dev).view(1, W).expand(n, W)
            B = W
        else:
            j0 = torch.randint(0, W, (n, 1), generator=gen, device=dev)
            step = torch.randint(1, W, (n, 1), generator=gen, device=dev)
            js = (j0 + step * torch.arange(B, device=dev).view(1, B)) % W
        v = torch.gather(P[:, :W], 1, js.unsqueeze(-1).expand(n, B, d))  # pivots (n, B, d)
        vn = v.norm(dim=2, keepdim=True)
        good = vn.squeeze(2) > 1e-4  # a pivot inside the span of the path so far: >= 2-D null space
        u = v / vn.clamp_min(1e-30)
        rest = P[:, W:]
        picks.append(lev * W + js)
        valid = (valid.unsqueeze(1) & good).reshape(-1)
        if d > 2:
            # Householder reflection taking u to ±e_d; its first d-1 columns span u's complement:
            # child coordinates = rest @ (I - w (c w)ᵀ)[:, :d-1], one batched matmul per level
            w = u.clone()
            w[..., -1:] += torch.where(u[..., -1:] >= 0, 1.0, -1.0).to(u.dtype)
            cw = w * (2.0 / (w * w).sum(-1, keepdim=True))
            H = torch.eye(d, dtype=P.dtype, device=dev)[:, :d - 1] - w.unsqueeze(-1) * cw[:, :, None, :d - 1]
            P = torch.matmul(rest.unsqueeze(1), H).reshape(n * B, -1, d - 1)
            n, d = n * B, d - 1
        else:
            # d = 2: the complement of u is (-u1, u0); leaf values are 2-D cross products (rows, B)
            vals = torch.addcmul(rest[..., 0:1] * (-u[..., 1]).unsqueeze(1), rest[..., 1:2], u[..., 0].unsqueeze(1))
            zeros = (vals.abs() < tol).sum(1).reshape(-1)  # (n * B,), child-major within a node
            n, d = n * B, 1
    if d != 1:  # no levels (b = 1 is handled elsewhere)
        raise RuntimeError("search tree did not reach a 1-D null space")
    hit = (valid & (zeros >= min_leaf_zeros)).nonzero().squeeze(1)
    # walk back up: the leaf's pivot positions, level by level
    cols = []
    node = hit
    for js in reversed(picks):
        B = js.shape[1]
        parent, child = node // B, node % B
        cols.append(js[parent, child])
        node = parent
    root = node
    positions = torch.stack(cols[::-1], 1) if cols else torch.empty(len(hit), 0, dtype=torch.long, device=dev)
    rows = torch.cat([pre[root], torch.gather(ids[root], 1, positions)], 1)
    return n, rows


# ----------------------------------------------------------------------------- endgame


def _plane_patterns(prob: _Problem, a: torch.Tensor, Gm: torch.Tensor, zero_tol: float) -> list[torch.Tensor]:
    """Activation patterns (inactive rows, all m) of the cells of the line arrangement
    ``a + Gm t = 0`` (t ∈ R², one line per neuron) whose live inactive rows leave ``L_Z``
    singular up to noise.

    Every cell borders a line; each live neuron's line is swept from end to end in
    parallel (one step per crossing), keeping the Gram matrix of the inactive rows on both
    of its sides by rank-one updates; singularity is tested with a Cholesky factorisation
    of ``G − slack·I`` (fails iff λ_min(G) < slack)."""
    m, b = prob.m, prob.b
    lines = prob.live_idx
    R = len(lines)
    Lh = prob.Lh
    tol2 = prob.row_noise.clamp(min=zero_tol) ** 2  # per live row
    live_pos = torch.full((m,), -1, dtype=torch.long)
    live_pos[lines] = torch.arange(R)
    g = Gm[lines]  # (R, 2)
    gn2 = (g * g).sum(1).clamp_min(1e-300)
    p = -a[lines].unsqueeze(1) * g / gn2.unsqueeze(1)  # a point on each line
    d = torch.stack([-g[:, 1], g[:, 0]], 1)  # direction along each line
    base = a.unsqueeze(0) + p @ Gm.T  # (R, m): pre-activations at p_r
    slope = d @ Gm.T  # (R, m): their change along d_r
    rng = torch.arange(R)
    with torch.no_grad():
        t_cross = torch.where(slope != 0, -base / torch.where(slope != 0, slope, torch.ones_like(slope)),
                              torch.full_like(base, math.inf))
        t_cross[rng, lines] = math.inf
        order = t_cross.argsort(1)
        t_sorted = t_cross.gather(1, order)
    inact = torch.where(slope != 0, slope > 0, base <= 0)  # at t = -inf
    inact[rng, lines] = False
    Wl = inact[:, lines].double()
    G = torch.einsum("rs,si,sj->rij", Wl, Lh, Lh)
    slack = Wl @ tol2
    dead_active = (~inact[:, prob.dead]).sum(1) if bool(prob.dead.any()) else torch.zeros(R, dtype=torch.long)
    is_dead = prob.dead
    own = Lh.unsqueeze(2) * Lh.unsqueeze(1)  # (R, b, b): l_r l_rᵀ of each line's own row
    eye = torch.eye(b, dtype=torch.float64)
    flagged: list[tuple[int, int, int]] = []
    for k in range(m):  # segment k lies before the k-th crossing of each line
        seg_ok = dead_active == 0
        if k > 0:
            seg_ok &= torch.isfinite(t_sorted[:, k - 1])
        for variant in (0, 1):
            Gv = G + own if variant else G
            sv = slack + tol2 if variant else slack
            info = torch.linalg.cholesky_ex(Gv - sv.view(-1, 1, 1) * eye).info
            for r in torch.nonzero(seg_ok & (info > 0)).squeeze(1).tolist():
                flagged.append((r, k, variant))
        if k == m - 1:
            break
        s = order[:, k]
        crossing = torch.isfinite(t_sorted[:, k])
        leaving = (slope[rng, s] > 0) & crossing  # inactive -> active
        entering = (slope[rng, s] < 0) & crossing
        pos = live_pos[s]
        sign = entering.double() - leaving.double()
        live_s = pos >= 0
        if bool(live_s.any()):
            idx = torch.nonzero(live_s).squeeze(1)
            ls = Lh[pos[idx]]
            G[idx] += sign[idx].view(-1, 1, 1) * (ls.unsqueeze(2) * ls.unsqueeze(1))
            slack[idx] += sign[idx] * tol2[pos[idx]]
        dead_s = is_dead[s] & crossing
        dead_active += (dead_s & leaving).long() - (dead_s & entering).long()
    patterns = []
    for r, k, variant in flagged:
        lo = float(t_sorted[r, k - 1]) if k > 0 else -math.inf
        hi = float(t_sorted[r, k])
        if not math.isfinite(lo) and not math.isfinite(hi):
            t_mid = 0.0
        elif not math.isfinite(lo):
            t_mid = hi - 1.0 - abs(hi)
        elif not math.isfinite(hi):
            t_mid = lo + 1.0 + abs(lo)
        else:
            t_mid = 0.5 * (lo + hi)
        pat = (base[r] + t_mid * slope[r]) <= 0
        pat[lines[r]] = bool(variant)
        patterns.append(pat)
    return patterns


def _endgame(prob: _Problem, pool: _Pool, chosen: list[_Candidate]) -> list[_Candidate]:
    """Directions missing from ``chosen`` (k = b - len(chosen) <= 3) from the ReLU pattern."""
    b = prob.b
    k = b - len(chosen)
    Qf = torch.stack([c.q for c in chosen], 1) if chosen else torch.zeros(b, 0, dtype=torch.float64)
    # orthonormal basis of span(chosen)^perp
    full = torch.linalg.qr(torch.cat([Qf, torch.eye(b, dtype=torch.float64)], 1))[0] if chosen else torch.eye(b, dtype=torch.float64)
    P = full[:, len(chosen):b] if chosen else full
    ps = P.T @ prob.s  # c = P u with u . ps = 1
    if float(ps.norm()) < 1e-12:
        return []
    u0 = ps / (ps @ ps)
    patterns: list[torch.Tensor] = []
    a = prob.M @ (P @ u0) + prob.beta  # pre-activation at u0 (all m rows)
    if k == 1:
        patterns.append(a <= 0)
    elif k == 2:
        e = torch.stack([-ps[1], ps[0]])  # u0 + t e stays on u . ps = 1
        g = prob.M @ (P @ e)
        with np.errstate(divide="ignore", invalid="ignore"):
            tb = (-a / g).numpy()
        tb = np.sort(tb[np.isfinite(tb)])
        if tb.size == 0:
            mids = np.array([0.0])
        else:
            span = max(1.0, float(np.abs(tb).max()))
            mids = np.concatenate([[tb[0] - span], (tb[:-1] + tb[1:]) / 2, [tb[-1] + span]])
        mids_t = torch.from_numpy(mids)
        inact = (a.unsqueeze(0) + mids_t.unsqueeze(1) * g.unsqueeze(0)) <= 0  # (intervals, m)
        dead = prob.dead
        ok = inact[:, dead].all(1) if bool(dead.any()) else torch.ones(len(mids), dtype=torch.bool)
        Zl = inact[:, prob.live].double()  # (intervals, m_live)
        gram = torch.einsum("tr,ri,rj->tij", Zl, prob.Lh, prob.Lh)
        ev = torch.linalg.eigvalsh(gram)
        # a true zero set has a null vector q with |l_r . q| below each row's tolerance
        allowed = Zl @ prob.row_noise.clamp(min=pool.params.zero_tol) ** 2
        for t in torch.nonzero(ok & (ev[:, 0] <= allowed)).squeeze(1).tolist():
            patterns.append(inact[t])
    elif k == 3:
        # c = P (u0 + E t), t ∈ R², with E spanning the directions orthogonal to ps
        E = torch.linalg.qr(torch.cat([ps.unsqueeze(1), torch.eye(3, dtype=torch.float64)], 1))[0][:, 1:3]
        patterns = _plane_patterns(prob, a, prob.M @ (P @ E), pool.params.zero_tol)
    else:
        return []
    new: list[_Candidate] = []
    for pat in patterns:
        zl = pat[prob.live]
        if int(zl.sum()) < b - 1:
            continue
        q0, _ = _null_direction(prob.Lh[zl])
        cand = pool.offer_direction(q0)
        if cand is not None and all(cand is not x for x in chosen + new):
            new.append(cand)
    return new


# ----------------------------------------------------------------------------- assembly


def _assemble(prob: _Problem, chosen: list[_Candidate], zero_tol: float):
    """Scales from the bias gradient, then X = Q^-1 R and Δ = (L Q)ᵀ; None if singular."""
    Qh = torch.stack([c.q for c in chosen], 1)  # (b, b) unit columns
    sv = torch.linalg.svdvals(Qh)
    if float(sv[-1]) < 1e-10 * float(sv[0]):
        return None
    alpha = torch.linalg.solve(Qh, prob.s)
    if bool((alpha.abs() < 1e-300).any()):
        return None
    Q = Qh * alpha.unsqueeze(0)
    X = torch.linalg.solve(Q, prob.R)  # (b, n)
    delta = (prob.L @ Q).T  # (b, m)
    return X, delta


def _mismatches(prob: _Problem, out: tuple[torch.Tensor, torch.Tensor], chosen: list[_Candidate]) -> torch.Tensor:
    """Per recovered example (b,) int: the problem's checker on ``out`` = (X, δ) when it has
    one, else the neurons where the forward pattern disagrees with δ's zero pattern."""
    X, delta = out
    if prob.checker is not None:
        return prob.checker(X, delta)
    z = X @ prob.weight.T + prob.beta  # (b, m)
    zscale = (X.abs() @ prob.weight.abs().T + prob.beta.abs()).clamp_min(1e-300)
    ambiguous = z.abs() <= 1e-5 * zscale  # within rounding of the recovered input: no verdict
    zero_obs = torch.ones(X.shape[0], prob.m, dtype=torch.bool)
    for i, c in enumerate(chosen):
        zero_obs[i, prob.live_idx] = c.zeros
        ambiguous[i, prob.live_idx] |= _borderline(prob, c.q, prob.zero_tol)
    bad = ((z <= 0) != zero_obs) & ~ambiguous & ~prob.uncertain
    return bad.sum(1)


def _select(prob: _Problem, pool: _Pool, check: bool, stop_at: float = math.inf):
    """Two-stage greedy: most zeros first while independent; then swaps that fix the check
    (the ReLU pattern, or the problem's checker), until ``stop_at``.

    Without any check only directions sampled at least twice are
    eligible: a true direction is reached from many row sets, a spurious one (a mixture
    pinned by one or two rows outside an intersection of zero sets) from very few."""
    items = sorted(pool.items, key=lambda c: -c.count)
    if not check and pool.min_zeros > 0:
        items = [c for c in items if c.hits >= 2]
    chosen: list[_Candidate] = []
    for c in items:
        trial = chosen + [c]
        M = torch.stack([t.q for t in trial], 1)
        sv = torch.linalg.svdvals(M)
        if float(sv[-1]) > 1e-6:
            chosen = trial
        if len(chosen) == prob.b:
            break
    if len(chosen) < prob.b:
        return chosen, None, None
    out = _assemble(prob, chosen, pool.params.zero_tol)
    if out is None or not check:
        return chosen, out, None
    bad = _mismatches(prob, out, chosen)
    if int(bad.sum()) == 0 or len(items) == len(chosen):
        return chosen, out, bad
    # stage 2: swap the worst columns for unused candidates while it helps
    for _ in range(len(items)):
        worst = int(bad.argmax())
        if int(bad[worst]) == 0:
            break
        improved = False
        for c in items:
            if any(c is x for x in chosen):
                continue
            if time.monotonic() > stop_at:  # a checker (replay) can make each swap costly
                return chosen, out, bad
            trial = list(chosen)
            trial[worst] = c
            o = _assemble(prob, trial, pool.params.zero_tol)
            if o is None:
                continue
            tb = _mismatches(prob, o, trial)
            if int(tb.sum()) < int(bad.sum()):
                chosen, out, bad, improved = trial, o, tb, True
                break
        if not improved:
            break
    return chosen, out, bad


# ----------------------------------------------------------------------------- main entry


def spear_invert_linear(grad_weight: torch.Tensor, grad_bias: torch.Tensor, *,
                        weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                        checker: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                        params: SpearParams | None = None, device: torch.device | str = "cpu",
                        seed: int = 0, deadline: float | None = None,
                        progress=None) -> SpearResult:
    """Recover the inputs of a linear layer (followed by ReLU) from its gradients.

    ``grad_weight`` (m×n) and ``grad_bias`` (m,) are ∂L/∂W and ∂L/∂b of the batch loss.
    ``weight`` (m×n) and ``bias`` (m,) are the layer's parameters at the time the gradient
    was computed; with them candidates are checked for realisability, the endgame can run
    and the result is verified against the ReLU pattern. Without them, ``checker(X, δ)``
    (per-example inconsistency counts (b,) int64 of a candidate batch) takes the ReLU
    check's place in the selection, and a batch it passes is "consistent"; multi-step
    updates use :func:`adversary.spear_extensions.replay_checker`. ``deadline`` is a
    ``time.monotonic()`` value; ``progress(samples, max_samples, directions_found)``.
    """
    params = params or SpearParams()
    t0 = time.monotonic()
    stop_at = t0 + params.time_budget_s
    if deadline is not None:
        stop_at = min(stop_at, deadline)
    device = torch.device(device)
    G = grad_weight.detach().double().cpu()
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    svals = [float(v) for v in S[: min(len(S), 64)]]
    b = params.batch_size or estimate_batch_size(S, params.rank_tol)
    pool: _Pool | None = None
    samples = 0

    def result(status, X=None, delta=None, exact=None, endgame=False, bad=None) -> SpearResult:
        items = len(pool.items) if pool else 0
        return SpearResult(X, delta, b, samples, time.monotonic() - t0, exact, status, svals, items,
                           pool.seen if pool else 0, endgame, None if bad is None else int(bad.sum()),
                           pool.rejected_mixture if pool else 0, pool.rejected_lp if pool else 0,
                           None if bad is None else bad.nonzero().flatten().tolist())

    if b == 0:
        return result("failed: zero gradient")
    if b > min(G.shape):
        return result("failed: batch size exceeds the layer dimensions")
    prob = _Problem(G, grad_bias, b, weight, bias, U, S, Vh, params, checker)
    relu = prob.weight is not None  # ReLU-pattern check, realisability LP and endgame
    check = relu or checker is not None
    use_filter = params.sparsity_threshold > 0
    pool = _Pool(prob, params, use_filter, check_lp=relu)

    def finish(chosen, out, bad, endgame) -> SpearResult:
        X, delta = out
        if check:
            ok = int(bad.sum()) == 0
            if not relu:
                return result("consistent" if ok else "inconsistent", X, delta, None, endgame, bad)
            return result("exact" if ok else "inconsistent", X, delta, ok, endgame, bad)
        return result("unverified", X, delta, None, endgame, None)

    if b == 1:
        zeros = prob.Lh[:, 0].abs() < params.zero_tol
        c = _Candidate(torch.ones(1, dtype=torch.float64), zeros, int(zeros.sum()))
        pool.items.append(c)
        out = _assemble(prob, [c], params.zero_tol)
        return finish([c], out, _mismatches(prob, out, [c]) if check else None, False)

    # the float32 search uses the rows whose noise is well below its tolerance
    search_idx = (prob.row_noise < prob.search_tol).nonzero().squeeze(1)
    shape = _tree_shape(b, len(search_idx), params.free_dims)
    if shape is None:
        return result("failed: too few active neurons for this batch size")
    Lh_search = prob.Lh[search_idx].to(device=device, dtype=torch.float32)
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    per_step = params.batch_per_step or (2 ** 21 if device.type == "cuda" else 2 ** 17)
    max_roots = max(1, per_step // shape.leaves_per_root)
    n_roots = max(1, min(max_roots, 4096 // shape.leaves_per_root))  # start small, double per step
    min_leaf = min(3, shape.ntest) if use_filter else 0
    examined = None  # pool state at the last selection attempt
    endgame_for: set | None = None  # the directions the endgame last started from
    last_out = None

    def pool_state():
        if check:
            return len(pool.items)
        return len(pool.items), sum(c.hits >= 2 for c in pool.items)

    while True:
        if pool_state() != examined and len(pool.items) >= b - (params.endgame if relu else 0):
            examined = pool_state()
            chosen, out, bad = _select(prob, pool, check, stop_at)
            if out is not None:
                last_out = (chosen, out, bad)
                if not check or int(bad.sum()) == 0:
                    return finish(chosen, out, bad, False)
            k = b - len(chosen)
            # k = 3 sweeps ~m² cells (~0.5 s at m = 256): only once sampling has become slow
            k_max = params.endgame if time.monotonic() - t0 > 2.0 else min(params.endgame, 2)
            if relu and 1 <= k <= k_max and {id(c) for c in chosen} != endgame_for:
                endgame_for = {id(c) for c in chosen}
                extra = _endgame(prob, pool, chosen)
                if len(extra) == k:
                    trial = chosen + extra
                    o = _assemble(prob, trial, params.zero_tol)
                    if o is not None:
                        tb = _mismatches(prob, o, trial)
                        if int(tb.sum()) == 0:
                            return finish(trial, o, tb, True)
                examined = pool_state()
        exhausted = None
        if samples >= params.max_samples:
            exhausted = "samples"
        elif time.monotonic() >= stop_at:
            exhausted = "time"
        if exhausted:
            status = f"failed: budget exhausted ({exhausted})"
            if last_out is not None:  # b directions but not consistent: report them, flagged
                chosen, (X, delta), bad = last_out
                return result(status, X, delta, False if relu else None, False, bad)
            return result(status)
        leaves, rows = _search_round(Lh_search, shape, n_roots, prob.search_tol, min_leaf, gen)
        samples += leaves
        pool.offer_rows(search_idx[rows.cpu()], stop_at)
        n_roots = min(2 * n_roots, max_roots)
        if progress is not None:
            progress(samples, params.max_samples, len(pool.items))


# ----------------------------------------------------------------------------- registered attack


def find_linear(model: nn.Module, name: str = "") -> tuple[str, nn.Linear]:
    """The linear layer called ``name`` (module path), or the first ``nn.Linear`` of the model."""
    for mod_name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and (not name or mod_name == name):
            return mod_name, mod
    raise ValueError(f"no linear layer {name!r} in the model" if name else "the model has no linear layer")


def _layer_role(model: nn.Module, layer: nn.Module, shape: tuple[int, int, int]) -> tuple[bool, bool]:
    """(input is the flattened image itself, output is the model's output) for ``layer``."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    hook = layer.register_forward_hook(lambda mod, inp, out: seen.append((inp[0].detach(), out.detach())))
    probe = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(probe)
    finally:
        hook.remove()
        model.train(was_training)
    if not seen:
        return False, False
    inp, out = seen[0]
    image = inp.shape == (2, probe[0].numel()) and torch.equal(inp, probe.flatten(1))
    return image, out.shape == logits.shape and torch.equal(out, logits)


@dataclass
class LayerInversion:
    """:func:`invert_observation`'s answer: the attacked layer, SPEAR's result and whether the
    layer's input is the (flattened) image; otherwise ``result.X`` holds feature vectors."""

    layer: str
    result: SpearResult | None
    image_space: bool
    gradient: torch.Tensor | None  # the ∂L/∂W estimate that was inverted
    model: nn.Module  # the architecture holding θ_t
    status: str = ""


def invert_observation(obs: Observation, params: SpearParams, ctx: AttackContext) -> LayerInversion:
    """Run SPEAR on the layer ``params.layer`` (default: the first linear layer) of ``obs``."""
    shape = tuple(obs.domain.shape)
    model = global_model(obs)
    name, layer = find_linear(model, params.layer)
    image_space, is_output = _layer_role(model, layer, shape)
    if is_output:
        return LayerInversion(name, None, image_space, None, model,
                              "failed: the layer is the output layer (no ReLU after it); choose a hidden layer")
    if layer.bias is None:
        return LayerInversion(name, None, image_space, None, model,
                              "failed: the layer has no bias (SPEAR fixes the scales from the bias gradient)")
    weight = obs.global_state[f"{name}.weight"]
    bias = obs.global_state[f"{name}.bias"]

    def progress(samples: int, total: int, found: int) -> None:
        ctx.report(samples, total, float(found))

    # Σ_j a_j g_j of the layer; for FedSGD the gradient itself up to a common factor, which X ignores
    grads = observed_gradient(obs, [f"{name}.weight", f"{name}.bias"])
    gw, gb = grads[f"{name}.weight"], grads[f"{name}.bias"]
    one_step = obs.num_steps <= 1  # the ReLU checks need the weights the gradient was taken at
    # several full-batch steps on the image-fed layer: replay the local training instead
    replay = not one_step and image_space and obs.training.batch_size >= obs.num_distinct_examples
    res = spear_invert_linear(gw, gb, weight=weight if one_step else None, bias=bias if one_step else None,
                              checker=replay_checker(obs, model, name) if replay else None, params=params,
                              device=ctx.device, seed=ctx.seed, deadline=ctx.deadline,
                              progress=progress)
    return LayerInversion(name, res, image_space, gw, model, res.status)


def run(obs: Observation, params: SpearParams, ctx: AttackContext) -> Reconstruction:
    """SPEAR on the observed update, then (optionally) images from its result.

    For a layer fed by the image (the MLP's first layer) the recovered inputs are the images
    (b, C, H, W), normalised. For a deeper layer SPEAR recovers that layer's input features
    (``extras``: count and dimension; :func:`invert_observation` returns them); with
    ``feature_fit_iterations`` images are fitted to them. ``refine_iterations`` then descends
    Geiping's unrolled update-matching objective from those images
    (``adversary.spear_extensions``). Labels: SPEAR needs none; each recovered example's label is
    read from its own ∂L/∂Z through the layers after the attacked one."""
    shape = tuple(obs.domain.shape)
    inv = invert_observation(obs, params, ctx)
    extras: dict = {"layer": inv.layer, "num_steps": obs.num_steps, "feature_space": not inv.image_space,
                    "expected_batch_size": obs.num_distinct_examples}
    inputs = torch.empty(0, *shape)
    res = inv.result
    if res is None:
        extras["status"] = inv.status
        return Reconstruction(inputs, None, 0, float("nan"), extras)
    extras.update(res.summary())
    if res.X is None:  # not even an inconsistent batch of b directions
        return Reconstruction(inputs, None, res.samples, float("nan"), extras)
    G = inv.gradient.double()
    objective = float((G - res.delta.T @ res.X).norm() / G.norm().clamp_min(1e-300))
    layer = inv.model.get_submodule(inv.layer)
    labels = slot_labels(inv.model, layer, res.X, res.delta, shape)
    iterations = res.samples
    if inv.image_space:
        inputs = res.X.reshape(-1, *shape).float()
    else:
        extras["features_recovered"] = int(res.X.shape[0])
        extras["feature_dim"] = int(res.X.shape[1])
        if params.feature_fit_iterations:
            start = torch.randn((len(res.X), *shape), generator=torch.Generator().manual_seed(ctx.seed))
            fit = fit_images_to_features(obs, inv.model, layer, res.X, start, iterations=params.feature_fit_iterations,
                                         lr=params.fit_lr, tv_weight=TV_WEIGHT, deadline=ctx.deadline)
            inputs, iterations = fit.inputs, iterations + fit.steps
            extras["feature_fit_objective"] = fit.objective
    # fitted images all move; recovered images only where the check flagged them (an exact or
    # consistent example stays as it is). An unchecked batch (shuffled mini-batches) is left
    # alone: the attacker's batch schedule would put its exact images in the wrong steps, and
    # the descent then trades them away (measured: 155 dB -> 18 dB).
    movable = torch.zeros(len(inputs), dtype=torch.bool) if inv.image_space else torch.ones(len(inputs), dtype=torch.bool)
    if inv.image_space:
        movable[res.inconsistent or []] = True
    if params.refine_iterations and inv.image_space and res.inconsistent is None:
        extras["refine"] = "skipped: nothing checked the batch (mini-batch steps: the schedule is unknown)"
    elif params.refine_iterations and len(inputs) and movable.any():
        if num_examples(obs) != len(inputs):
            extras["refine"] = f"skipped: SPEAR found {len(inputs)} examples, the update reports {num_examples(obs)}"
        else:
            refined = refine_images(obs, inputs, labels, iterations=params.refine_iterations, lr=params.refine_lr,
                                    tv_weight=params.refine_tv_weight, bn_weight=BN_WEIGHT,
                                    device=ctx.device, movable=movable, deadline=ctx.deadline)
            inputs, iterations = refined.inputs.cpu(), iterations + refined.steps
            extras["refine"] = f"{int(movable.sum())} images, {refined.steps} steps, objective {refined.objective:.4g}"
    return Reconstruction(inputs, labels if len(inputs) else None, iterations, objective, extras)


ATTACK = Attack("spear", SpearParams, run)
