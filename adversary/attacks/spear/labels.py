"""Labels of SPEAR's recovered examples, each read from its own pre-activation gradient.

SPEAR recovers, for one linear layer followed by ReLU, the inputs X (n×d) of every example and
their pre-activation gradients δ (n×m). :func:`slot_labels`: the label of each recovered
example, from its own δ — δ_i is proportional (positive factor) to ``∂ℓ(x_i, y_i)/∂Z_i``, which
the layers after the attacked one compute for every candidate class; the class whose gradient
points along δ_i wins. Exact for FedSGD; each reconstruction slot gets its own label, which the
update-matching objective needs (a label multiset would leave the slots' classes ambiguous).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
