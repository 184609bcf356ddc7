"""Assembly of a batch from ``b`` directions (scales from the bias gradient), its check
(ReLU pattern or the problem's checker), and the two-stage greedy selection."""
from __future__ import annotations

import math
import time

import torch

from adversary.attacks.spear.candidates import CandidatePool
from adversary.attacks.spear.problem import Candidate, Problem, borderline


def assemble(prob: Problem, chosen: list[Candidate], zero_tol: float):
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


def mismatches(prob: Problem, out: tuple[torch.Tensor, torch.Tensor], chosen: list[Candidate]) -> torch.Tensor:
    """Per recovered example (b,) int: the problem's checker on ``out`` = (X, δ) when it has
    one, else the neurons where the forward pattern disagrees with δ's zero pattern (inactive
    with δ ≠ 0; active with δ = 0 beyond the first ``active_zeros`` of them)."""
    X, delta = out
    if prob.checker is not None:
        return prob.checker(X, delta)
    z = X @ prob.weight.T + prob.beta  # (b, m)
    zscale = (X.abs() @ prob.weight.abs().T + prob.beta.abs()).clamp_min(1e-300)
    ambiguous = z.abs() <= 1e-5 * zscale  # within rounding of the recovered input: no verdict
    zero_obs = torch.ones(X.shape[0], prob.m, dtype=torch.bool)
    for i, c in enumerate(chosen):
        zero_obs[i, prob.live_idx] = c.zeros
        ambiguous[i, prob.live_idx] |= borderline(prob, c.q, prob.zero_tol)
    judged = ~ambiguous & ~prob.uncertain
    inactive_but_gradient = ((z <= 0) & ~zero_obs & judged).sum(1)  # impossible under ReLU
    active_but_zero = ((z > 0) & zero_obs & judged).sum(1)  # a gradient entry below the noise floor, or wrong
    return inactive_but_gradient + (active_but_zero - prob.active_zeros).clamp(min=0)


def greedy_independent(items: list[Candidate], b: int) -> list[Candidate]:
    """Up to ``b`` of ``items``, in their order, each linearly independent of those before it."""
    chosen: list[Candidate] = []
    for c in items:
        trial = chosen + [c]
        sv = torch.linalg.svdvals(torch.stack([t.q for t in trial], 1))
        if float(sv[-1]) > 1e-6:
            chosen = trial
        if len(chosen) == b:
            break
    return chosen


def select(prob: Problem, pool: CandidatePool, check: bool, stop_at: float = math.inf):
    """Two-stage greedy: most zeros first while independent; then swaps that fix the check
    (the ReLU pattern, or the problem's checker), until ``stop_at``.

    Without any check only directions sampled at least twice are
    eligible: a true direction is reached from many row sets, a spurious one (a mixture
    pinned by one or two rows outside an intersection of zero sets) from very few."""
    items = sorted(pool.items, key=lambda c: -c.count)
    if not check and pool.min_zeros > 0:
        items = [c for c in items if c.hits >= 2]
    chosen = greedy_independent(items, prob.b)
    if len(chosen) < prob.b:
        return chosen, None, None
    out = assemble(prob, chosen, pool.params.zero_tol)
    if out is None or not check:
        return chosen, out, None
    bad = mismatches(prob, out, chosen)
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
            o = assemble(prob, trial, pool.params.zero_tol)
            if o is None:
                continue
            tb = mismatches(prob, o, trial)
            if int(tb.sum()) < int(bad.sum()):
                chosen, out, bad, improved = trial, o, tb, True
                break
        if not improved:
            break
    return chosen, out, bad
