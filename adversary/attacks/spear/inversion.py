"""SPEAR's inversion of one linear layer from its gradients: :func:`spear_invert_linear`
(rank, search rounds, selection and endgame until the batch checks or the budget runs out)."""
from __future__ import annotations

import math
import time
from typing import Callable

import torch

from adversary.attacks.spear.candidates import CandidatePool
from adversary.attacks.spear.endgame import endgame_directions
from adversary.attacks.spear.guide import Guide, GuidedSampler
from adversary.attacks.spear.problem import Candidate, Problem, SpearParams, SpearResult, estimate_batch_size
from adversary.attacks.spear.search import search_round, tree_shape
from adversary.attacks.spear.selection import assemble, greedy_independent, mismatches, select


def with_twins(pool: CandidatePool, chosen: list[Candidate], share: float = 0.25) -> list[Candidate]:
    """Members of ``chosen`` whose zero set differs from another pool item's in at most ``share``
    of its zeros (fewest zeros first): where a spurious mixture sits next to a true direction."""
    if len(pool.items) < 2:
        return []
    Z = torch.stack([c.zeros for c in pool.items], 0).double()  # (k, m_live)
    dist = Z.sum(1, keepdim=True) + Z.sum(1) - 2 * Z @ Z.T  # Hamming distances
    dist.fill_diagonal_(math.inf)
    near = {id(c) for c, d in zip(pool.items, dist.min(1).values.tolist()) if d <= share * c.count}
    return sorted((c for c in chosen if id(c) in near), key=lambda c: c.count)


def spear_invert_linear(grad_weight: torch.Tensor, grad_bias: torch.Tensor, *,
                        weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                        checker: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                        params: SpearParams | None = None, device: torch.device | str = "cpu",
                        seed: int = 0, deadline: float | None = None, guide: Guide | None = None,
                        progress: Callable[[int, int, int], None] | None = None,
                        next_weight: torch.Tensor | None = None) -> SpearResult:
    """Recover the inputs of a linear layer (followed by ReLU) from its gradients.

    ``grad_weight`` (m×n) and ``grad_bias`` (m,) are ∂L/∂W and ∂L/∂b of the batch loss.
    ``weight`` (m×n) and ``bias`` (m,) are the layer's parameters at the time the gradient
    was computed; with them candidates are checked for realisability, the endgame can run
    and the result is verified against the ReLU pattern. Without them, ``checker(X, δ)``
    (per-example inconsistency counts (b,) int64 of a candidate batch) takes the ReLU
    check's place in the selection, and a batch it passes is "consistent"; multi-step
    updates use :func:`adversary.attacks.spear.replay.replay_checker`. ``guide``: an
    approximate batch whose predicted inactive neurons steer part of the draws
    (:mod:`adversary.attacks.spear.guide`); the uniform search runs alongside, unchanged.
    ``next_weight`` (o×m): the weight of the linear layer that takes ReLU(Z) as its only input,
    at the gradient's θ; with it a candidate must be ``W_nextᵀ g`` on its nonzero rows
    (:func:`adversary.attacks.spear.candidates.next_layer_residual`).
    ``deadline`` is a ``time.monotonic()`` value; ``progress(directions_found, b, samples)``.
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
    pool: CandidatePool | None = None
    sampler: GuidedSampler | None = None
    samples = 0

    def result(status, X=None, delta=None, exact=None, endgame=False, bad=None) -> SpearResult:
        items = len(pool.items) if pool else 0
        return SpearResult(X, delta, b, samples, time.monotonic() - t0, exact, status, svals, items,
                           pool.seen if pool else 0, endgame, None if bad is None else int(bad.sum()),
                           pool.rejected_mixture if pool else 0, pool.rejected_lp if pool else 0,
                           pool.rejected_next_layer if pool else 0,
                           None if bad is None else bad.nonzero().flatten().tolist(),
                           sampler.drawn if sampler else 0, int(sampler.covered.sum()) if sampler else None)

    if b == 0:
        return result("failed: zero gradient")
    if b > min(G.shape):
        return result("failed: batch size exceeds the layer dimensions")
    prob = Problem(G, grad_bias, b, weight, bias, U, S, Vh, params, checker, next_weight)
    relu = prob.weight is not None  # ReLU-pattern check, realisability LP and endgame
    check = relu or checker is not None
    use_filter = params.sparsity_threshold > 0

    def finish(chosen, out, bad, endgame) -> SpearResult:
        X, delta = out
        if check:
            ok = int(bad.sum()) == 0
            if not relu:
                return result("consistent" if ok else "inconsistent", X, delta, None, endgame, bad)
            return result("exact" if ok else "inconsistent", X, delta, ok, endgame, bad)
        return result("unverified", X, delta, None, endgame, None)

    # with a guide (made for large b), a sampled null vector must also vanish on τ of the other live
    # rows: at b = 50 of 256 neurons τ·m_live alone is about b, which any null vector of b − 1 rows
    # meets, and each such vector cost a refit and an LP (3,000 of them per minute, all junk)
    extra_zeros = max(3, math.ceil(params.sparsity_threshold * (prob.m_live - b + 1))) if guide is not None else 0
    pool = CandidatePool(prob, params, use_filter, check_lp=relu, extra_zeros=extra_zeros)
    if guide is not None and b >= 2:
        sampler = GuidedSampler(prob, guide, params.guide_draws, seed)
    if b == 1:
        zeros = prob.Lh[:, 0].abs() < params.zero_tol
        c = Candidate(torch.ones(1, dtype=torch.float64), zeros, int(zeros.sum()))
        pool.items.append(c)
        out = assemble(prob, [c], params.zero_tol)
        return finish([c], out, mismatches(prob, out, [c]) if check else None, False)

    # the float32 search uses the rows whose noise is well below its tolerance
    search_idx = (prob.row_noise < prob.search_tol).nonzero().squeeze(1)
    shape = tree_shape(b, len(search_idx), params.free_dims)
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
    guided_s = uniform_s = 0.0  # wall time of the guided draws and of the uniform tree so far

    def complete(base: list[Candidate]) -> SpearResult | None:
        """The endgame from ``base`` (again from what it added, while it adds some but not all);
        the finished result if the completed batch checks."""
        trial = list(base)
        while len(trial) < b:
            extra = endgame_directions(prob, pool, trial)
            if not extra or len(trial) + len(extra) > b:
                return None
            trial += extra
        o = assemble(prob, trial, params.zero_tol)
        if o is None:
            return None
        tb = mismatches(prob, o, trial)
        return finish(trial, o, tb, True) if int(tb.sum()) == 0 else None

    def pool_state():
        if check:
            return len(pool.items)
        return len(pool.items), sum(c.hits >= 2 for c in pool.items)

    while True:
        if pool_state() != examined and len(pool.items) >= b - (params.endgame if relu else 0):
            examined = pool_state()
            chosen, out, bad = select(prob, pool, check, stop_at)
            if out is not None:
                last_out = (chosen, out, bad)
                if not check or int(bad.sum()) == 0:
                    return finish(chosen, out, bad, False)
            k = b - len(chosen)
            # k = 3 sweeps ~m² cells (~0.5 s at m = 256): only once sampling has become slow, and
            # not where its Cholesky sweep (~m_live·m·b³) grows past ~4·b=25 (b = 100 of 1024: 1000x)
            k_max = params.endgame if time.monotonic() - t0 > 2.0 else min(params.endgame, 2)
            if prob.m_live * prob.m * b ** 3 > 4e9:
                k_max = min(k_max, 2)
            if relu and 1 <= k <= k_max and {id(c) for c in chosen} != endgame_for:
                endgame_for = {id(c) for c in chosen}
                done = complete(chosen)
                if done is not None:
                    return done
                examined = pool_state()
            if sampler is not None and relu:
                # large b: near-duplicate photos leave realisable mixtures next to their true direction,
                # and the greedy choice may take one; retry the endgame without each such member
                # likewise without the directions of the examples the check flagged
                flagged = [] if bad is None else [[c for c, v in zip(chosen, bad.tolist()) if v == 0]]
                for rest in flagged + [[x for x in chosen if x is not c] for c in with_twins(pool, chosen)]:
                    done = complete(rest) if 1 <= b - len(rest) <= k_max else None
                    if done is not None:
                        return done
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
        guiding = sampler is not None and bool(sampler.active().numel())
        if guiding:
            # guided draws first (a separate random stream: the uniform sequence stays as without a guide)
            started = time.monotonic()
            drawn = sampler.draw(max(256, 2 ** 23 // b ** 2))
            samples += len(drawn)
            before = len(pool.items)
            pool.offer_rows(drawn, stop_at)
            if len(pool.items) != before:
                sampler.update_covered(pool)
                sampler.refine([c.q for c in greedy_independent(sorted(pool.items, key=lambda c: -c.count), b - 1)])
            guided_s += time.monotonic() - started
        # while guided draws remain, the uniform tree gets no more wall time than they took: at b = 50 it
        # finds nothing (hit rate ~1e-13 per leaf) and its junk leaves took 3/4 of the time
        if not guiding or uniform_s <= guided_s:
            started = time.monotonic()
            leaves, rows = search_round(Lh_search, shape, n_roots, prob.search_tol, min_leaf, gen)
            samples += leaves
            pool.offer_rows(search_idx[rows.cpu()], stop_at)
            n_roots = min(2 * n_roots, max_roots)
            uniform_s += time.monotonic() - started
        if progress is not None:
            progress(min(len(pool.items), b), b, samples)
