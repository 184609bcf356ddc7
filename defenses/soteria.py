"""Soteria (Sun et al., "Soteria: Provable Defense against Privacy Leakage in Federated
Learning from Representation Perspective", CVPR'21), per local step.

The representation r is the input of the model's last ``nn.Linear`` (the layer fed by the
representation). For every feature f the step computes, per example b,
‖∂r_f/∂x_b‖ / (r_{b,f} + 0.1) — the input gradient of the feature summed over the batch
(one backward per feature with grad-output 1 in column f, as the public code does) — and sums
it over the batch. Features whose sum is below the ``percent``-th percentile are pruned: their
column of that linear layer's weight gradient is zeroed. The bias gradient and every other
layer are left as they are. The masked gradient then goes through the client's real optimizer.

Follows the public code (github.com/jeremy313/Soteria, ``GS_attack/reconstruct_image.py``):
the score ‖∂r_f/∂x‖ / (r_f + 0.1), its sum over the batch, numpy percentile and the rule
"mask 0 where score < threshold", the mask on the weight gradient of the representation layer.
The code's score is the inverse of the paper's ratio ‖r_f‖/‖∂r_f/∂x‖: pruning the smallest
scores prunes the features with the *largest* ‖r_f‖/‖∂r_f/∂x‖.
Default ``percent`` = 60: the README's command that reproduces the paper's GS-attack figure
(``--pruning_rate=60``; the argparse default there is 0, no pruning).

Departs from it: applied at every local step of multi-step training (as Plato's port does),
not to a single gradient; the features are those fed into our models' last linear layer
(ConvNet/ResNet: the pooled features or the last hidden head layer; MLP: the last hidden
layer). Cost: one extra backward per feature per step, so prefer a model whose last linear
layer is narrow (a ``head``, or the MLP).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from defenses.base import Defense
from fedsim.models import captured_inputs
from defenses.tensors import percentile

SCORE_OFFSET = 0.1  # the public code's r_f + 0.1 guard against a zero feature


@dataclass(frozen=True)
class SoteriaParams:
    percent: float = field(default=60.0, metadata={"min": 0.0, "max": 100.0, "doc": "percent of representation features pruned per step"})


def representation_layer(model: nn.Module) -> nn.Linear:
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not layers:
        raise ValueError("defense 'soteria' needs a model with a linear layer fed by the representation")
    return layers[-1]


def feature_scores(representation: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """Σ_b ‖∂r_f/∂x_b‖ / (r_{b,f} + 0.1) per feature f; ``representation`` (B, F) must be
    a function of ``inputs`` in the autograd graph (which is kept). One backward per feature:
    ``is_grads_batched`` (vmap) was measured ~6x slower here on the ConvNet (CPU)."""
    batch, features = representation.shape
    norms = torch.empty(batch, features, dtype=representation.dtype, device=representation.device)
    outputs = torch.zeros_like(representation)
    for f in range(features):
        outputs[:, f] = 1.0
        (dx,) = torch.autograd.grad(representation, inputs, grad_outputs=outputs, retain_graph=True)
        norms[:, f] = dx.flatten(1).norm(dim=1)
        outputs[:, f] = 0.0
    return (norms / (representation.detach() + SCORE_OFFSET)).sum(0)


def feature_mask(scores: torch.Tensor, percent: float) -> torch.Tensor:
    """1 for kept features, 0 for those scoring below the ``percent``-th percentile."""
    return (scores >= percentile(scores, percent)).to(scores.dtype)


class Soteria(Defense):
    name = "soteria"
    params: SoteriaParams

    def compute_gradients(self, model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        layer = representation_layer(model)
        x = inputs.detach().clone().requires_grad_(True)
        with captured_inputs(layer) as captured:
            loss = F.cross_entropy(model(x), labels)
        mask = feature_mask(feature_scores(captured[0], x), self.params.percent)
        loss.backward(inputs=[p for p in model.parameters() if p.requires_grad])
        layer.weight.grad = layer.weight.grad * mask.to(layer.weight.grad.dtype)
        return loss
