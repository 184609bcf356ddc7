"""DP-SGD inside local training (Abadi et al., CCS'16): every optimizer step computes one
gradient per example, clips each to L2 norm C (over all parameters together), sums them, adds
Gaussian noise of std σ·C to the sum and divides by the step's batch size. The result is written
to ``p.grad`` and goes through the client's real optimizer (momentum, weight decay, nesterov:
post-processing of the noised gradients). Accounting: ``defenses.accounting``.

Per-example gradients come from ``torch.func`` (``vmap(grad(...))`` over ``functional_call``),
not from Opacus' ``GradSampleModule``/``DPOptimizer``: those wrap the model (hooks on the client's
model, state keys prefixed ``_module.``, which Δ is computed over) and take over the optimizer
step with their own batch-size bookkeeping, while fedsim keeps one local loop and one real SGD
optimizer. Opacus' own functorch path is the same ``vmap(grad)``; Opacus is used for accounting.

BatchNorm mixes the examples of a batch, so per-example gradients (and the DP guarantee) are
undefined with it: ``dp_sgd`` is refused for a model with BatchNorm layers, at validation
(``defenses.registry.validate_defense``) and again here.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from defenses.base import Defense
from defenses.tensors import gaussian_like


@dataclass(frozen=True)
class DpSgdParams:
    clip_norm: float = field(default=1.0, metadata={"gt": 0.0, "doc": "C: per-example gradient L2 norm bound"})
    noise_multiplier: float = field(default=1.0, metadata={"min": 0.0, "doc": "σ: noise std on the summed gradient is σ·C"})
    delta: float = field(default=1e-5, metadata={"gt": 0.0, "lt": 1.0, "doc": "δ at which the accountant reports ε"})


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def per_example_gradients(model: nn.Module, inputs: torch.Tensor,
                          labels: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-example gradients of the cross-entropy, ``{name: (B, *param.shape)}``, and the
    per-example losses (B,)."""
    params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())

    def loss_one(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor):
        loss = F.cross_entropy(functional_call(model, (p, buffers), (x.unsqueeze(0),)), y.unsqueeze(0))
        return loss, loss.detach()

    grads, losses = vmap(grad(loss_one, has_aux=True), in_dims=(None, 0, 0))(params, inputs, labels)
    return grads, losses


def clip_per_example(grads: dict[str, torch.Tensor], clip_norm: float) -> dict[str, torch.Tensor]:
    """Scale example b's gradient by min(1, C / ‖g_b‖), ‖·‖ over all parameters together
    (Opacus' flat clipping, same 1e-6 guard)."""
    norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads.values()]).sum(0).sqrt()
    factor = (clip_norm / (norms + 1e-6)).clamp(max=1.0)
    return {k: g * factor.view(-1, *([1] * (g.dim() - 1))) for k, g in grads.items()}


class DpSgd(Defense):
    name = "dp_sgd"
    params: DpSgdParams

    def compute_gradients(self, model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if has_batchnorm(model):
            raise ValueError("defense 'dp_sgd' needs per-example gradients, which BatchNorm makes undefined; "
                             "use a model without BatchNorm (model.name = 'mlp')")
        grads, losses = per_example_gradients(model, inputs, labels)
        clipped = clip_per_example(grads, self.params.clip_norm)
        std = self.params.noise_multiplier * self.params.clip_norm
        batch = len(inputs)
        for name, p in model.named_parameters():
            if name in clipped:
                summed = clipped[name].sum(0)
                p.grad = (summed + gaussian_like(summed, std, self.generator)) / batch
        return losses.mean()
