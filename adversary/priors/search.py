"""The two searches of GIAS (Jeon et al., NeurIPS'21) through a generator G (images in [0, 1]):

- **latent search** (GI-z): one latent per image, ``x = normalise(G(z))``, Adam on z;
- **parameter search** (GI-w): one copy of G's weights per image, started from G's, Adam on the
  copies (on the sign of their gradient by default, like Geiping's pixel search) with the latents fixed, plus ``prior_weight`` × the mean relative squared distance of
  the copies from G's weights (the regulariser that keeps them near the prior).

Both minimise an image objective (:func:`adversary.maths.matching.image_objective`) with
:func:`adversary.maths.matching.descend_inputs` (Adam, lr ×0.1 at 3/8, 5/8, 7/8). The
generator runs in eval mode (BatchNorm with its running statistics), so that one image's
output does not depend on the others'. A class-conditional generator makes image i of class
``labels[i]`` (the labels the attack recovered); an unconditional one ignores them.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.func import functional_call, vmap

from adversary.maths.matching import Descent, descend_inputs
from adversary.priors.dcgan import conditional_classes

Images = Callable[[torch.Tensor], torch.Tensor]  # (n, C, H, W) in [0, 1] -> normalised (n, C, H, W)


def generator_arguments(generator: nn.Module, z: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """What ``generator``'s forward takes: ``(z, labels)`` for a conditional one, else ``(z,)``."""
    return (z, labels) if conditional_classes(generator) else (z,)


def generate(generator: nn.Module, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """G(z) (n, C, H, W) in [0, 1]; a conditional generator (``num_classes`` > 0) at ``labels`` (n,)."""
    return generator(*generator_arguments(generator, z, labels))


class FlatWeights:
    """G's parameters as rows of length P: one row per image (:meth:`images`) or one row shared
    by all images (:meth:`shared_images`); buffers shared."""

    def __init__(self, generator: nn.Module):
        self.generator = generator.eval()
        params = dict(generator.named_parameters())
        self.names = list(params)
        self.shapes = [p.shape for p in params.values()]
        self.sizes = [p.numel() for p in params.values()]
        self.base = torch.cat([p.detach().flatten() for p in params.values()])
        self.buffers = {k: b.detach() for k, b in generator.named_buffers()}

    def rows(self, n: int) -> torch.Tensor:
        """n copies of G's weights (n, P)."""
        return self.base.repeat(n, 1)

    def _call(self, row: torch.Tensor, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        weights = {k: c.view(s) for k, c, s in zip(self.names, row.split(self.sizes), self.shapes)}
        return functional_call(self.generator, {**weights, **self.buffers},
                               generator_arguments(self.generator, z, labels))

    def images(self, rows: torch.Tensor, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Image i = G with weights ``rows[i]`` at ``z[i]`` (class ``labels[i]``): (n, C, H, W) in [0, 1]."""
        return vmap(lambda row, latent, label: self._call(row, latent[None], label[None])[0])(rows, z, labels)

    def shared_images(self, row: torch.Tensor, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """G with weights ``row`` (P,) at every latent of ``z`` (and label): (n, C, H, W) in [0, 1]."""
        return self._call(row, z, labels)

    def load(self, row: torch.Tensor) -> None:
        """Write ``row`` (P,) into G's parameters."""
        with torch.no_grad():
            for p, c in zip(self.generator.parameters(), row.split(self.sizes)):
                p.copy_(c.view_as(p))
        self.base = row.detach().clone()

    def distance(self, rows: torch.Tensor) -> torch.Tensor:
        """Mean over images of ‖row − θ_G‖² / ‖θ_G‖² (a scalar)."""
        return ((rows - self.base).pow(2).sum(1) / self.base.pow(2).sum()).mean()


def latent_search(objective: Callable[[torch.Tensor], torch.Tensor], generator: nn.Module, normalise: Images,
                  start: torch.Tensor, labels: torch.Tensor, *, iterations: int, lr: float,
                  deadline: float | None = None, on_step: Callable[[float], None] | None = None) -> Descent:
    """GI-z: minimise ``objective(normalise(G(z)))`` over latents ``z`` (n, latent_dim) from
    ``start`` (images of classes ``labels`` (n,) for a conditional G); the Descent's ``inputs``
    are the best latents."""
    generator.eval()
    return descend_inputs(lambda z: objective(normalise(generate(generator, z, labels))), start,
                          iterations=iterations, lr=lr,
                          signed=False, deadline=deadline, on_step=on_step)


def parameter_search(objective: Callable[[torch.Tensor], torch.Tensor], generator: nn.Module, normalise: Images,
                     z: torch.Tensor, labels: torch.Tensor, *, iterations: int, lr: float, prior_weight: float,
                     signed: bool = True,
                     deadline: float | None = None,
                     on_step: Callable[[float], None] | None = None) -> tuple[torch.Tensor, Descent]:
    """GI-w: per-image copies of G's weights at fixed latents ``z`` (n, latent_dim) and classes
    ``labels`` (n,) (used by a conditional G); ``signed``:
    Adam steps on the sign of the gradient. Returns the
    images (n, C, H, W, normalised) of the best copies and the Descent over the weight rows."""
    weights = FlatWeights(generator)
    z = z.detach()

    def regularised(rows: torch.Tensor) -> torch.Tensor:
        value = objective(normalise(weights.images(rows, z, labels)))
        return value + prior_weight * weights.distance(rows) if prior_weight else value

    descent = descend_inputs(regularised, weights.rows(len(z)).to(z.device), iterations=iterations, lr=lr,
                             signed=signed, deadline=deadline, on_step=on_step)
    with torch.no_grad():
        images = normalise(weights.images(descent.inputs, z, labels))
    return images, descent
