"""The endgame: the last ``k ≤ 3`` directions from the ReLU pattern of the layer (needs its
weights), on a point, a line or a plane of candidate rows of ``Q⁻¹``."""
from __future__ import annotations

import math

import numpy as np
import torch

from adversary.attacks.spear.candidates import CandidatePool
from adversary.attacks.spear.problem import Candidate, Problem, null_direction


def _plane_patterns(prob: Problem, a: torch.Tensor, Gm: torch.Tensor, zero_tol: float) -> list[torch.Tensor]:
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


def endgame_directions(prob: Problem, pool: CandidatePool, chosen: list[Candidate]) -> list[Candidate]:
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
    new: list[Candidate] = []
    for pat in patterns:
        zl = pat[prob.live]
        if int(zl.sum()) < b - 1:
            continue
        q0, _ = null_direction(prob.Lh[zl])
        cand = pool.offer_direction(q0)
        if cand is not None and all(cand is not x for x in chosen + new):
            new.append(cand)
    return new
