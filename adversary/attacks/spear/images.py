"""Images from SPEAR's answer (SPEAR as an initializer for an image attack).

- :func:`fit_images_to_features`: for a layer deeper than the image (e.g. the first hidden
  layer of a conv model's head), images whose input to that layer matches the recovered
  features (relative L2 + TV), the model run in train mode on the whole batch as the client did.
- :func:`refine_images`: Geiping's update-matching objective with the client's local training
  unrolled (:class:`adversary.maths.matching.Matcher`), descended from the images above. The best
  iterate by objective is kept, the start included, so an exact start stays exact.
"""
from __future__ import annotations

import torch
from torch import nn

from adversary.maths.matching import Descent, Matcher, descend_inputs
from adversary.maths.objectives import total_variation
from adversary.observation import Observation
from fedsim.models import captured_inputs


def fit_images_to_features(obs: Observation, model: nn.Module, layer: nn.Module, features: torch.Tensor,
                           start: torch.Tensor, *, iterations: int, lr: float, tv_weight: float,
                           deadline: float | None = None) -> Descent:
    """Images (n, C, H, W) whose input to ``layer`` matches ``features`` (n, d): minimise
    ``‖F(x) − features‖² / ‖features‖² + tv_weight·TV(x)`` from ``start`` with signed Adam,
    ``model`` (holding θ_t) in train mode on the whole batch, images kept in the data box."""
    target = features.to(start.dtype)
    scale = target.pow(2).sum().clamp_min(1e-30)
    was_training = model.training
    model.train()

    try:
        with captured_inputs(layer) as captured:
            def objective(x: torch.Tensor) -> torch.Tensor:
                captured.clear()
                model(x)
                fit = (captured[0].flatten(1) - target).pow(2).sum() / scale
                return fit + tv_weight * total_variation(x) if tv_weight else fit

            return descend_inputs(objective, start, iterations=iterations, lr=lr,
                                  bounds=obs.domain.bounds(start), deadline=deadline)
    finally:
        model.train(was_training)


def refine_images(obs: Observation, start: torch.Tensor, labels: torch.Tensor, *, iterations: int, lr: float,
                  tv_weight: float, bn_weight: float, device: torch.device, movable: torch.Tensor | None = None,
                  deadline: float | None = None) -> Descent:
    """Descend Geiping's update-matching objective (cosine, unrolled local training, BN
    statistics, TV) from ``start`` (n, C, H, W) with per-slot ``labels`` (n,), moving only the
    ``movable`` slots (n,) bool (all when None). Slot i is example i of the attacker's
    unshuffled batch schedule (``fedsim.schedule.local_batches``)."""
    matcher = Matcher(obs, device, "unroll", bn_weight=bn_weight)
    if matcher.n != len(start):
        raise ValueError(f"the update comes from {matcher.n} examples, the start has {len(start)}")
    labels = labels.to(device)

    def objective(x: torch.Tensor) -> torch.Tensor:
        match = matcher(x, labels)
        return match + tv_weight * total_variation(x) if tv_weight else match

    start = start.to(device=device, dtype=torch.float32)
    return descend_inputs(objective, start, iterations=iterations, lr=lr, bounds=obs.domain.bounds(start),
                          deadline=deadline, movable=None if movable is None else movable.to(device))
