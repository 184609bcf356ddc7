"""Image files for humans: ground truth over reconstruction, side by side."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image


def _grid(images: torch.Tensor, nrow: int, padding: int) -> torch.Tensor:
    """(N, C, H, W) in [0, 1] -> (3, H', W') grid with white padding (grayscale -> RGB)."""
    from torchvision.utils import make_grid  # here, not at import: torchvision takes seconds to import

    return make_grid(images.detach().float().cpu().clamp(0.0, 1.0), nrow=nrow, padding=padding, pad_value=1.0)


def save_comparison_grid(
    path: str | os.PathLike[str],
    truth_unit: torch.Tensor,
    recon_unit_matched: torch.Tensor,
    nrow: int | None = None,
    scale: int = 4,
    padding: int = 2,
) -> Path:
    """Write a PNG: the ground-truth images in the top block, the reconstructions below.

    ``truth_unit`` (N, C, H, W) and ``recon_unit_matched`` (M, C, H, W), both in [0, 1],
    C = 1 or 3; reconstruction k is drawn under truth k, so pass them in matched order
    (e.g. ``recon[rows]`` from ``adversary.scoring.metrics.match_reconstructions``). ``nrow``:
    images per row (default: all of them, at most 8). Each block is a
    ``torchvision.utils.make_grid`` with ``padding`` white pixels between and around the
    images; the narrower block is padded white on the right. The whole picture is then
    enlarged ``scale`` times with nearest-neighbour sampling: with c = min(nrow, max(N, M))
    columns, r_t = ceil(N / c) and r_r = ceil(M / c) rows and p = ``padding``, it is
    ``scale·(c·(W+p) + p)`` pixels wide and ``scale·((r_t + r_r)·(H+p) + 2p)`` high
    (``scale·(r_t·(H+p) + p)`` when M = 0). Parent folders are created. Returns the path.
    """
    if truth_unit.dim() != 4 or recon_unit_matched.dim() != 4 or truth_unit.shape[1:] != recon_unit_matched.shape[1:]:
        raise ValueError(
            f"expected (N, C, H, W) and (M, C, H, W) image batches, got {tuple(truth_unit.shape)} "
            f"and {tuple(recon_unit_matched.shape)}"
        )
    if len(truth_unit) == 0:
        raise ValueError("no ground-truth images to draw")
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    per_row = nrow if nrow is not None else min(8, len(truth_unit))
    blocks = [_grid(images, per_row, padding) for images in (truth_unit, recon_unit_matched) if len(images)]
    width = max(block.shape[-1] for block in blocks)
    blocks = [torch.nn.functional.pad(b, (0, width - b.shape[-1]), value=1.0) for b in blocks]
    picture = torch.cat(blocks, dim=1)
    picture = picture.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    pixels = picture.mul(255).add(0.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(out, format="PNG")
    return out
