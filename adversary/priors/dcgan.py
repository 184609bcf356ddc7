"""DCGAN-style generator and discriminator (Radford et al., ICLR'16) for a square image shape.

The generator maps latents ``z`` (n, latent_dim) to images (n, C, H, W) in [0, 1] (sigmoid
output; the attack normalises them like the client's data). It upsamples a 4x4 map by
transposed convolutions (stride 2) up to the first power-of-two side ≥ H and resizes to H when
H is not one. Channels halve at every upsampling, ending at ``width``.

A class-conditional pair (``num_classes`` > 0) takes the class too: the generator's input is
the latent with the label's one-hot code appended, the discriminator sees the code as constant
extra image channels. GIAS conditions on the labels it recovered from the update, so the search
runs within one class's images.

A user's generator is interchangeable when it has the same interface: constructed as
``Cls(image_shape=(C, H, W), latent_dim=..., width=...)``, an attribute ``latent_dim`` and
``forward(z) -> (n, C, H, W)`` in [0, 1] (conditional: ``num_classes`` attribute and argument,
``forward(z, labels)``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ARCHITECTURE = "dcgan"


def _upsamplings(side: int) -> int:
    """Doublings from 4x4 to the first power-of-two side ≥ ``side`` (at least one)."""
    return max(1, math.ceil(math.log2(max(side, 4) / 4)))


class Generator(nn.Module):
    """z (n, latent_dim) -> images (n, C, H, W) in [0, 1]."""

    def __init__(self, image_shape: tuple[int, int, int], latent_dim: int = 64, width: int = 32,
                 num_classes: int = 0):
        super().__init__()
        channels, height, wide = image_shape
        if height != wide:
            raise ValueError(f"square images only, got {height}x{wide}")
        self.image_shape = tuple(image_shape)
        self.latent_dim = latent_dim
        self.num_classes = num_classes
        ups = _upsamplings(height)
        widths = [width * 2 ** (ups - 1 - i) for i in range(ups)]  # e.g. 4w, 2w, w
        layers: list[nn.Module] = [nn.ConvTranspose2d(latent_dim + num_classes, widths[0], 4, 1, 0, bias=False),
                                   nn.BatchNorm2d(widths[0]), nn.ReLU(True)]
        for c_in, c_out in zip(widths, widths[1:]):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(widths[-1], channels, 4, 2, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """``labels`` (n,) int: the classes of a conditional generator (ignored otherwise)."""
        if self.num_classes:
            z = torch.cat([z, one_hot(labels, self.num_classes, z)], dim=1)
        out = self.net(z.view(len(z), -1, 1, 1))
        side = self.image_shape[1]
        if out.shape[-1] != side:
            out = F.interpolate(out, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
        return torch.sigmoid(out)


def conditional_classes(generator: nn.Module) -> int:
    """How many classes ``generator`` is conditional on (0: unconditional; a user's generator
    without a ``num_classes`` attribute is unconditional)."""
    return getattr(generator, "num_classes", 0) or 0


def one_hot(labels: torch.Tensor | None, num_classes: int, like: torch.Tensor) -> torch.Tensor:
    """(n,) class indices -> (n, num_classes) codes of ``like``'s dtype and device (by indexing,
    which ``torch.func.vmap`` batches)."""
    if labels is None:
        raise ValueError("a conditional generator needs the labels of the images it makes")
    return torch.eye(num_classes, dtype=like.dtype, device=like.device)[labels]


class Discriminator(nn.Module):
    """Images (n, C, H, W) in [0, 1] (and labels (n,) when conditional) -> real/fake logits (n,)."""

    def __init__(self, image_shape: tuple[int, int, int], width: int = 32, num_classes: int = 0):
        super().__init__()
        channels, height, _ = image_shape
        ups = _upsamplings(height)
        self.side = 4 * 2 ** ups
        self.num_classes = num_classes
        widths = [width * 2 ** i for i in range(ups)]  # w, 2w, 4w
        layers: list[nn.Module] = [nn.Conv2d(channels + num_classes, widths[0], 4, 2, 1), nn.LeakyReLU(0.2, True)]
        for c_in, c_out in zip(widths, widths[1:]):
            layers += [nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2, True)]
        layers += [nn.Conv2d(widths[-1], 1, 4, 1, 0)]
        self.net = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        x = images * 2 - 1
        if x.shape[-1] != self.side:
            x = F.interpolate(x, size=(self.side, self.side), mode="bilinear", align_corners=False)
        if self.num_classes:
            codes = one_hot(labels, self.num_classes, x)[:, :, None, None]
            x = torch.cat([x, codes.expand(-1, -1, self.side, self.side)], dim=1)
        return self.net(x).flatten()
