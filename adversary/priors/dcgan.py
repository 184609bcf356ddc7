"""DCGAN-style generator and discriminator (Radford et al., ICLR'16) for a square image shape.

The generator maps latents ``z`` (n, latent_dim) to images (n, C, H, W) in [0, 1] (sigmoid
output; the attack normalises them like the client's data). It upsamples a 4x4 map by
transposed convolutions (stride 2) up to the first power-of-two side ≥ H and resizes to H when
H is not one. Channels halve at every upsampling, ending at ``width``.

A user's generator is interchangeable when it has the same interface: constructed as
``Cls(image_shape=(C, H, W), latent_dim=..., width=...)``, an attribute ``latent_dim`` and
``forward(z) -> (n, C, H, W)`` in [0, 1].
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

    def __init__(self, image_shape: tuple[int, int, int], latent_dim: int = 64, width: int = 32):
        super().__init__()
        channels, height, wide = image_shape
        if height != wide:
            raise ValueError(f"square images only, got {height}x{wide}")
        self.image_shape = tuple(image_shape)
        self.latent_dim = latent_dim
        ups = _upsamplings(height)
        widths = [width * 2 ** (ups - 1 - i) for i in range(ups)]  # e.g. 4w, 2w, w
        layers: list[nn.Module] = [nn.ConvTranspose2d(latent_dim, widths[0], 4, 1, 0, bias=False),
                                   nn.BatchNorm2d(widths[0]), nn.ReLU(True)]
        for c_in, c_out in zip(widths, widths[1:]):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(widths[-1], channels, 4, 2, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.net(z.view(len(z), self.latent_dim, 1, 1))
        side = self.image_shape[1]
        if out.shape[-1] != side:
            out = F.interpolate(out, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
        return torch.sigmoid(out)


class Discriminator(nn.Module):
    """Images (n, C, H, W) in [0, 1] -> real/fake logits (n,)."""

    def __init__(self, image_shape: tuple[int, int, int], width: int = 32):
        super().__init__()
        channels, height, _ = image_shape
        ups = _upsamplings(height)
        self.side = 4 * 2 ** ups
        widths = [width * 2 ** i for i in range(ups)]  # w, 2w, 4w
        layers: list[nn.Module] = [nn.Conv2d(channels, widths[0], 4, 2, 1), nn.LeakyReLU(0.2, True)]
        for c_in, c_out in zip(widths, widths[1:]):
            layers += [nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2, True)]
        layers += [nn.Conv2d(widths[-1], 1, 4, 1, 0)]
        self.net = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images * 2 - 1
        if x.shape[-1] != self.side:
            x = F.interpolate(x, size=(self.side, self.side), mode="bilinear", align_corners=False)
        return self.net(x).flatten()
