"""The search tree: roots of ``b − K`` random rows, one row added per level by Householder
reflections, leaves of ``b − 1`` rows tested for zeros (one vectorised step per call)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class TreeShape:
    K: int  # free dimensions at the root
    W: int  # rows per level block
    ntest: int  # test rows per leaf
    branches: tuple[int, ...]  # children per level (K - 1 levels)

    @property
    def leaves_per_root(self) -> int:
        return int(np.prod(self.branches)) if self.branches else 1


def tree_shape(b: int, m_live: int, free_dims: int) -> TreeShape | None:
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
        return TreeShape(K, W, ntest, branches)
    return None


def search_round(Lh: torch.Tensor, shape: TreeShape, n_roots: int, tol: float, min_leaf_zeros: int,
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
