"""The replay check: SPEAR's consistency test for a multi-step full-batch update.

:func:`replay_checker`: under FedAvg, δ_i is ``Σ_j a_j ∂ℓ_i/∂Z`` summed over the local steps
(momentum weights a_j), not one gradient, and the ReLU check at θ_t does not apply. With full
batches every step uses every example, so the attacker can replay the whole local training on a
candidate batch (known θ_t, lr, momentum, weight decay; :func:`replay_layer_gradients`) and
compare each example's replayed column with its δ_i: relative error 1e-6 .. 2e-4 for the true
batch (weight-decay drift, float32), 1.6e-3 .. 1 for a batch with a spurious direction
(measured on 8 photos, 5-10 epochs, lr 0.01 and 0.1). Mini-batches are shuffled by the client:
no replay.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from adversary.attacks.spear.labels import slot_labels
from adversary.observation import Observation, global_model
from adversary.maths.unroll import step_coefficients
from fedsim.models import captured_outputs


REPLAY_TOL = 1e-3  # relative error of a replayed column that still counts as consistent


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
    total = torch.zeros(len(inputs), layer.out_features, dtype=torch.float64)
    model.train()
    with captured_outputs(layer) as outputs:
        for j in range(len(a)):
            outputs.clear()
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(inputs.double()), labels)
            outputs[0].retain_grad()
            loss.backward()
            total += a[j] * outputs[0].grad
            opt.step()
    return total


def replay_checker(obs: Observation, model: nn.Module, layer_name: str,
                   tol: float = REPLAY_TOL) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A SPEAR checker for a multi-step full-batch update of the image-fed layer ``layer_name``:
    ``check(X, δ)`` → (n,) int64, per example ``floor(relative error / tol)`` (capped at
    1000) between its replayed column (:func:`replay_layer_gradients`, labels from
    :func:`adversary.attacks.spear.labels.slot_labels`) and δ_i; 0 = consistent. ``model`` holds θ_t."""
    layer = model.get_submodule(layer_name)
    shape = tuple(obs.domain.shape)

    def check(X: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        labels = slot_labels(model, layer, X, delta, shape)
        replayed = replay_layer_gradients(obs, layer_name, X.reshape(-1, *shape), labels)
        rel = (replayed - delta).norm(dim=1) / delta.norm(dim=1).clamp_min(1e-300)
        return (rel / tol).clamp(max=1000).floor().long()

    return check
