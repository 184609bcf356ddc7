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
  row space of ``G`` must produce exactly its activation pattern (a small LP). Realisable
  mixtures remain among look-alike photos of one label (b = 50: 18 of 48 accepted). When
  ReLU(Z) feeds one linear layer ``W_next`` (the MLP), ``δ_i = diag(z_i > 0) W_nextᵀ ∂L/∂y_i``:
  on its nonzero rows a true direction lies in the o-dimensional column space of ``W_nextᵀ``
  (relative residual ~1e-7 after the refit), a mixture does not (≥ 0.15). This *next-layer
  test* runs first (also before the refit), and a direction that passes it at float32 noise
  skips the single-row mixture test, which refuses near twins' true directions.
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
sampling would spend about two thirds of its time on the last two. The k = 3 sweep costs
about m_live·m·b³ and is skipped beyond 4·10⁹ (b = 100 of 1024 neurons).

Guided sampling (large b)
-------------------------
An approximate batch X̃ (a Geiping run on the same update, or the server's earlier
reconstruction of the client, ``Observation.prior``) predicts each example's pre-activations;
``guide`` ranks each guide example's live rows by how surely they are inactive and draws b − 1
of the best after Gumbel noise, skipping rows that add no rank (look-alike photos share their
most confident rows, which span fewer than b − 1 dimensions), interleaved with the unchanged
uniform tree (own random stream, at most ``guide_draws`` per example; while guided draws remain
the tree gets no more wall time than they took). An example stops drawing once its noiseless
draw lies in a found zero set. Found directions constrain the missing examples'
coordinates (``c·q_i = 0``, ``c·s = 1``, as in the endgame), so the guide is re-ranked from the
projection of X̃ onto that set as directions come in. ``active_zeros``: zero rows that may be
active neurons with a gradient entry below the noise floor (LP and ReLU check forgive them).

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
training on a candidate batch (``adversary.attacks.spear.replay.replay_checker``), which takes
the checks' place ("consistent"); with shuffled mini-batches nothing is checked
("unverified").

Modules
-------
``problem`` (parameters, result, rank estimate, the factored problem and its zero tests),
``candidates`` (refit, mixture test, LP margin, the candidate pool), ``search`` (the search
tree), ``endgame``, ``selection`` (assembly, check, greedy selection), ``inversion``
(:func:`spear_invert_linear`), ``guide`` (the guided sampler), ``attack`` (the registered attack :func:`run`, name
``"spear"``), ``labels`` (:func:`slot_labels`), ``replay`` (the replay check) and ``images``
(images from feature-space results and the refinement with the unrolled objective).
"""
from adversary.attacks.spear.attack import ATTACK, LayerInversion, find_linear, invert_observation, run
from adversary.attacks.spear.images import fit_images_to_features, refine_images
from adversary.attacks.spear.inversion import spear_invert_linear
from adversary.attacks.spear.labels import slot_labels
from adversary.attacks.spear.problem import SpearParams, SpearResult, estimate_batch_size
from adversary.attacks.spear.replay import REPLAY_TOL, replay_checker, replay_layer_gradients

__all__ = [
    "SpearParams", "SpearResult", "estimate_batch_size", "spear_invert_linear", "invert_observation",
    "LayerInversion", "find_linear", "run", "ATTACK", "slot_labels", "replay_checker", "replay_layer_gradients",
    "REPLAY_TOL", "refine_images", "fit_images_to_features",
]
