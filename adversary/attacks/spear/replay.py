"""What SPEAR's layer-level answer is turned into: labels, a check for multi-step updates,
images, and a refined reconstruction (SPEAR as an initializer for an image attack).

SPEAR (``adversary.attacks.spear``) recovers, for one linear layer followed by ReLU, the
inputs X (n×d) of every example and their pre-activation gradients δ (n×m):

- :func:`slot_labels`: the label of each recovered example, from its own δ — δ_i is
  proportional (positive factor) to ``∂ℓ(x_i, y_i)/∂Z_i``, which the layers after the attacked
  one compute for every candidate class; the class whose gradient points along δ_i wins. Exact
  for FedSGD; each reconstruction slot gets its own label, which the update-matching objective
  needs (a label multiset would leave the slots' classes ambiguous).
- :func:`replay_checker`: under FedAvg, δ_i is ``Σ_j a_j ∂ℓ_i/∂Z`` summed over the local
  steps (momentum weights a_j), not one gradient, and the ReLU check at θ_t does not apply.
  With full batches every step uses every example, so the attacker can replay the whole
  local training on a candidate batch (known θ_t, lr, momentum, weight decay) and compare
  each example's replayed column with its δ_i: relative error 1e-6 .. 2e-4 for the true batch
  (weight-decay drift, float32), 1.6e-3 .. 1 for a batch with a spurious direction (measured
  on 8 photos, 5-10 epochs, lr 0.01 and 0.1). Mini-batches are shuffled by the client: no
  replay.
- :func:`fit_images_to_features`: for a layer deeper than the image (e.g. the first hidden
  layer of a conv model's head), images whose input to that layer matches the recovered
  features (relative L2 + TV), the model run in train mode on the whole batch as the client did.
- :func:`refine_images`: Geiping's update-matching objective with the client's local training
  unrolled (:class:`adversary.maths.matching.Matcher`), descended from the images above. The best
  iterate by objective is kept, the start included, so an exact start stays exact.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from adversary.maths.matching import Descent, Matcher, descend_inputs
from adversary.maths.objectives import total_variation
from adversary.observation import Observation, global_model
from adversary.maths.unroll import step_coefficients

REPLAY_TOL = 1e-3  # relative error of a replayed column that still counts as consistent


def _tail_logits(model: nn.Module, layer: nn.Module, Z: torch.Tensor, input_shape: tuple[int, ...]) -> torch.Tensor:
    """Logits (n, C) of the model with ``layer``'s output replaced by ``Z`` (n, m)."""
    handle = layer.register_forward_hook(lambda _mod, _inp, _out: Z)
    try:
        return model(torch.zeros((Z.shape[0], *input_shape), dtype=Z.dtype))
    finally:
        handle.remove()


def slot_labels(model: nn.Module, layer: nn.Linear, X: torch.Tensor, delta: torch.Tensor,
                input_shape: tuple[int, ...]) -> torch.Tensor:
    """Labels (n,) int64 of the examples whose layer inputs are ``X`` (n, d) and whose
    pre-activation gradients are ``delta`` (n, m): for each example the class c maximising the
    cosine between δ_i and ∂ℓ(x_i, c)/∂Z_i (computed through every layer after ``layer``, which
    must treat examples independently, e.g. no BatchNorm after it). ``model`` holds θ_t."""
    was_training = model.training
    model.train()
    dtype = next(model.parameters()).dtype
    Z = (X.to(dtype) @ layer.weight.detach().T + layer.bias.detach()).requires_grad_(True)
    try:
        logits = _tail_logits(model, layer, Z, input_shape)
        n, classes = logits.shape
        scores = torch.empty(n, classes, dtype=torch.float64)
        d = F.normalize(delta.double(), dim=1)
        for c in range(classes):
            target = torch.full((n,), c, dtype=torch.long)
            (g,) = torch.autograd.grad(F.cross_entropy(logits, target, reduction="sum"), Z, retain_graph=True)
            scores[:, c] = (F.normalize(g.double(), dim=1) * d).sum(1)
    finally:
        model.train(was_training)
    return scores.argmax(1)


def replay_layer_gradients(obs: Observation, layer_name: str, inputs: torch.Tensor,
                           labels: torch.Tensor) -> torch.Tensor:
    """``Σ_j a_j ∂L_j/∂Z`` (n, m) float64 at the output Z of layer ``layer_name``: the client's
    full-batch local training (``obs.training``, ``obs.num_steps`` steps of torch SGD from θ_t)
    replayed in float64 on ``inputs`` (n, C, H, W) with ``labels`` (n,). Row i is example i's
    column of the layer's weight-gradient sum, in the units of
    :func:`adversary.maths.unroll.observed_gradient`."""
    tr = obs.training
    model = global_model(obs).double()
    layer = model.get_submodule(layer_name)
    a = step_coefficients(max(obs.num_steps, 1), tr.momentum, tr.nesterov)
    opt = torch.optim.SGD(model.parameters(), lr=tr.lr, momentum=tr.momentum, weight_decay=tr.weight_decay,
                          nesterov=tr.nesterov)
    outputs: list[torch.Tensor] = []

    def keep(_mod, _inp, out: torch.Tensor) -> None:
        out.retain_grad()
        outputs.append(out)

    handle = layer.register_forward_hook(keep)
    total = torch.zeros(len(inputs), layer.out_features, dtype=torch.float64)
    model.train()
    try:
        for j in range(len(a)):
            outputs.clear()
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(inputs.double()), labels).backward()
            total += a[j] * outputs[0].grad
            opt.step()
    finally:
        handle.remove()
    return total


def replay_checker(obs: Observation, model: nn.Module, layer_name: str,
                   tol: float = REPLAY_TOL) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A SPEAR checker for a multi-step full-batch update of the image-fed layer ``layer_name``:
    ``check(X, δ)`` → (n,) int64, per example ``floor(relative error / tol)`` (capped at
    1000) between its replayed column (:func:`replay_layer_gradients`, labels from
    :func:`slot_labels`) and δ_i; 0 = consistent. ``model`` holds θ_t."""
    layer = model.get_submodule(layer_name)
    shape = tuple(obs.domain.shape)

    def check(X: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        labels = slot_labels(model, layer, X, delta, shape)
        replayed = replay_layer_gradients(obs, layer_name, X.reshape(-1, *shape), labels)
        rel = (replayed - delta).norm(dim=1) / delta.norm(dim=1).clamp_min(1e-300)
        return (rel / tol).clamp(max=1000).floor().long()

    return check


def fit_images_to_features(obs: Observation, model: nn.Module, layer: nn.Module, features: torch.Tensor,
                           start: torch.Tensor, *, iterations: int, lr: float, tv_weight: float,
                           deadline: float | None = None) -> Descent:
    """Images (n, C, H, W) whose input to ``layer`` matches ``features`` (n, d): minimise
    ``‖F(x) − features‖² / ‖features‖² + tv_weight·TV(x)`` from ``start`` with signed Adam,
    ``model`` (holding θ_t) in train mode on the whole batch, images kept in the data box."""
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_pre_hook(lambda _mod, args: captured.append(args[0]))
    target = features.to(start.dtype)
    scale = target.pow(2).sum().clamp_min(1e-30)
    was_training = model.training
    model.train()

    def objective(x: torch.Tensor) -> torch.Tensor:
        captured.clear()
        model(x)
        fit = (captured[0].flatten(1) - target).pow(2).sum() / scale
        return fit + tv_weight * total_variation(x) if tv_weight else fit

    try:
        return descend_inputs(objective, start, iterations=iterations, lr=lr,
                              bounds=obs.domain.bounds(start), deadline=deadline)
    finally:
        handle.remove()
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
