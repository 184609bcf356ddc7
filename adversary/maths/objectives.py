"""Gradient / update matching losses and image priors, shared by the optimisation attacks
(Geiping, DLG, GIAS).

Every matching loss takes two equally long sequences of tensors (the prediction made from the
dummy data and the observation, one entry per layer/state tensor) and optional non-negative
per-entry weights.
"""
from __future__ import annotations

from typing import Sequence

import torch

LAYER_WEIGHTINGS = ("equal", "linear", "exp")


def layer_weights(count: int, scheme: str = "equal", *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Per-entry weights for ``count`` tensors in network order.

    ``equal``: all 1; ``linear``: decreasing linearly from 1 (first layer) to 1/count (last);
    ``exp``: ``exp(-i / count * 5)`` style decay, emphasising the first layers (the ones that
    carry the most information about the input).
    """
    if scheme == "equal":
        w = torch.ones(count)
    elif scheme == "linear":
        w = torch.arange(count, 0, -1, dtype=torch.float64) / count
    elif scheme == "exp":
        w = torch.exp(-5.0 * torch.arange(count, dtype=torch.float64) / max(count, 1))
    else:
        raise ValueError(f"unknown layer weighting {scheme!r}; choose one of {LAYER_WEIGHTINGS}")
    return w.to(device=device, dtype=dtype)


def _weights(n: int, weights, like: torch.Tensor) -> torch.Tensor:
    if weights is None:
        return torch.ones(n, dtype=like.dtype, device=like.device)
    w = torch.as_tensor(weights, dtype=like.dtype, device=like.device)
    if w.shape != (n,):
        raise ValueError(f"expected {n} layer weights, got shape {tuple(w.shape)}")
    return w


def _check(pred: Sequence[torch.Tensor], target: Sequence[torch.Tensor]) -> None:
    if len(pred) != len(target) or not pred:
        raise ValueError(f"need equally many non-zero tensors, got {len(pred)} and {len(target)}")


def cosine_distance(pred: Sequence[torch.Tensor], target: Sequence[torch.Tensor], weights=None,
                    *, per_layer: bool = False, eps: float = 1e-12,
                    target_sq: torch.Tensor | None = None) -> torch.Tensor:
    """1 − cosine similarity between prediction and observation.

    ``per_layer=False`` (Geiping et al.'s formulation): one cosine over all tensors concatenated,
    each entry's inner products scaled by its weight:
    ``1 − Σ w_l⟨p_l, t_l⟩ / (sqrt(Σ w_l‖p_l‖²)·sqrt(Σ w_l‖t_l‖²))`` — in [0, 2].
    ``per_layer=True``: ``Σ w_l (1 − cos(p_l, t_l))`` — one cosine per tensor, summed.
    ``target_sq``: (L,) the ‖t_l‖² when the caller keeps them (:func:`squared_norms`; a fixed
    observation's need not be recomputed at every step).
    """
    _check(pred, target)
    w = _weights(len(pred), weights, pred[0])
    dots = torch.stack([(p * t).sum() for p, t in zip(pred, target)])
    pn = torch.stack([p.pow(2).sum() for p in pred])
    tn = (squared_norms(target) if target_sq is None else target_sq).to(dots.dtype)
    if per_layer:
        return (w * (1 - dots / (pn.sqrt() * tn.sqrt()).clamp_min(eps))).sum()
    return 1 - (w * dots).sum() / ((w * pn).sum().sqrt() * (w * tn).sum().sqrt()).clamp_min(eps)


def squared_norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """(L,) ‖t_l‖² of each tensor."""
    return torch.stack([t.pow(2).sum() for t in tensors])


def l2_distance(pred: Sequence[torch.Tensor], target: Sequence[torch.Tensor], weights=None,
                *, relative: bool = False) -> torch.Tensor:
    """Σ w_l ‖p_l − t_l‖² (DLG). ``relative=True`` divides each term by ‖t_l‖² (scale-free)."""
    _check(pred, target)
    w = _weights(len(pred), weights, pred[0])
    terms = []
    for p, t in zip(pred, target):
        term = (p - t).pow(2).sum()
        if relative:
            term = term / t.pow(2).sum().clamp_min(1e-30)
        terms.append(term)
    return (w * torch.stack(terms)).sum()


def matching_loss(kind: str, pred: Sequence[torch.Tensor], target: Sequence[torch.Tensor],
                  weights=None, target_sq: torch.Tensor | None = None) -> torch.Tensor:
    """Dispatch by name: ``cosine`` (global), ``layer_cosine``, ``l2``, ``relative_l2``
    (``target_sq``: see :func:`cosine_distance`; the L2 losses do not use it)."""
    if kind == "cosine":
        return cosine_distance(pred, target, weights, target_sq=target_sq)
    if kind == "layer_cosine":
        return cosine_distance(pred, target, weights, per_layer=True, target_sq=target_sq)
    if kind == "l2":
        return l2_distance(pred, target, weights)
    if kind == "relative_l2":
        return l2_distance(pred, target, weights, relative=True)
    raise ValueError(f"unknown matching loss {kind!r}; choose cosine, layer_cosine, l2, relative_l2")


MATCHING_LOSSES = ("cosine", "layer_cosine", "l2", "relative_l2")


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation of (N, C, H, W) images: mean |dx| + mean |dy| (normalised space)."""
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
    return dx + dy
