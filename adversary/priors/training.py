"""Training a prior: a DCGAN on the attacker's auxiliary images.

Standard DCGAN recipe: Adam (lr 2e-4, betas 0.5/0.999) on both nets, non-saturating
binary-cross-entropy losses, z ~ N(0, I), weights initialised N(0, 0.02) (BN scales N(1, 0.02)).
Class-conditional (``conditional``): real images with their labels, fakes with labels drawn
uniformly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from adversary.priors.dcgan import Discriminator, Generator


@dataclass(frozen=True)
class PriorTraining:
    """Settings of :func:`train_prior` (``steps``: discriminator+generator updates)."""

    steps: int = 3000
    batch_size: int = 64
    lr: float = 2e-4
    latent_dim: int = 64
    width: int = 32
    conditional: bool = False


@dataclass
class TrainedPrior:
    """The trained pair and the losses (discriminator, generator) of every step."""

    generator: Generator
    discriminator: Discriminator
    losses: list[tuple[float, float]] = field(default_factory=list)


def _dcgan_init(module: nn.Module) -> None:
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def untrained_generator(image_shape: tuple[int, int, int], latent_dim: int, width: int, seed: int,
                        num_classes: int = 0) -> Generator:
    """A DCGAN generator with the DCGAN initialisation drawn from ``seed`` (eval mode)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        generator = Generator(image_shape, latent_dim, width, num_classes)
        generator.apply(_dcgan_init)
    return generator.eval()


def train_prior(images: torch.Tensor, settings: PriorTraining, seed: int,
                on_step: Callable[[int, float, float], None] | None = None,
                labels: torch.Tensor | None = None, num_classes: int = 0) -> TrainedPrior:
    """Train a DCGAN on ``images`` (N, C, H, W) in [0, 1]; conditional (``settings.conditional``)
    on their ``labels`` (N,) of ``num_classes`` classes. ``on_step(step, d_loss, g_loss)``
    after every step. Deterministic in ``seed`` on one thread. The generator is returned in
    eval mode (its BN running statistics are those of training)."""
    shape = tuple(images.shape[1:])
    classes = num_classes if settings.conditional else 0
    if classes and (labels is None or len(labels) != len(images)):
        raise ValueError("a conditional prior trains on labelled images: one label per image")
    gen = torch.Generator().manual_seed(seed)
    generator = untrained_generator(shape, settings.latent_dim, settings.width, seed, classes).train()
    with torch.random.fork_rng():
        torch.manual_seed(seed + 1)
        discriminator = Discriminator(shape, settings.width, classes)
        discriminator.apply(_dcgan_init)
    opt_g = torch.optim.Adam(generator.parameters(), lr=settings.lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=settings.lr, betas=(0.5, 0.999))
    trained = TrainedPrior(generator, discriminator)
    batch = min(settings.batch_size, len(images))
    for step in range(1, settings.steps + 1):
        picked = torch.randint(len(images), (batch,), generator=gen)
        real = images[picked]
        z = torch.randn((batch, settings.latent_dim), generator=gen)
        real_labels = labels[picked] if classes else None
        fake_labels = torch.randint(classes, (batch,), generator=gen) if classes else None
        fake = generator(z, fake_labels)
        real_logits, fake_logits = discriminator(real, real_labels), discriminator(fake.detach(), fake_labels)
        d_loss = (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
                  + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))
        opt_d.zero_grad()
        d_loss.backward()
        opt_d.step()
        logits = discriminator(fake, fake_labels)
        g_loss = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
        opt_g.zero_grad()
        g_loss.backward()
        opt_g.step()
        trained.losses.append((d_loss.item(), g_loss.item()))
        if on_step is not None:
            on_step(step, d_loss.item(), g_loss.item())
    generator.eval()
    return trained
