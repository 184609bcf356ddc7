"""Differentiable re-implementation of the client's local training (the attacker's model of it).

The client (``clients.training``) trains a copy of the global model in ``train()`` mode with
``torch.optim.SGD(lr, momentum, weight_decay, nesterov)`` on ``F.cross_entropy`` (batch mean),
one optimizer step per batch of the schedule, and uploads Δ = state_after − state_before.

:class:`LocalTrainingReplay` (and :func:`unroll_local_training`, its one-call form) replays that
loop functionally (``torch.func.functional_call``, gradients taken with ``create_graph=True`` or
``torch.func.grad``), so the predicted Δ is differentiable with respect
to the (dummy) inputs and — when given as float logits — the labels. It reproduces
``torch.optim.SGD`` exactly (dampening 0):

    d = g + wd·p;  buf = d (first step) | momentum·buf + d;  d = d + momentum·buf (nesterov) | buf;
    p ← p − lr·d

BatchNorm layers use batch statistics (train mode); their running statistics, which the client
also uploads, are predicted differentiably as well when ``buffers=True``: per step
``r ← (1 − m)·r + m·stat`` with the biased batch mean and the *unbiased* batch variance of the
layer's input, exactly as ``F.batch_norm`` updates them.

The closed-form side of the same model (:func:`step_coefficients`, :func:`observed_gradient`)
turns an observed Δ back into a weighted sum of per-step gradients without replaying anything.
"""
from __future__ import annotations

import copy
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from adversary.observation import Observation
from fedsim.scenario import TrainingSpec


def parameter_names(model: nn.Module) -> list[str]:
    """Names of the trainable parameters, in ``named_parameters`` order."""
    return [name for name, _ in model.named_parameters()]


def batchnorm_buffer_names(model: nn.Module) -> list[str]:
    """State keys of the BatchNorm running statistics (``*.running_mean``/``*.running_var``)."""
    names = []
    for prefix, mod in model.named_modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.track_running_stats:
            names += [f"{prefix}.running_mean", f"{prefix}.running_var"]
    return names


def _loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if labels.is_floating_point():
        # soft labels given as logits (DLG-style): targets = softmax(labels)
        return F.cross_entropy(logits, torch.softmax(labels, dim=-1))
    return F.cross_entropy(logits, labels)


def _mean_and_variance(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of (N, C, ...) as (1, C, 1, ...) tensors, in two passes
    (mean, then mean of squared deviations): on a CPU ``torch.var``/``torch.var_mean`` over these
    dims cost ~400 µs at (1, 64, 32, 32) against ~35 µs for the two passes (torch 2.14, one thread)."""
    dims = [0, *range(2, x.dim())]
    mean = x.mean(dim=dims, keepdim=True)
    return mean, (x - mean).pow(2).mean(dim=dims, keepdim=True)


def _values_per_channel(x: torch.Tensor) -> int:
    """How many values of (N, C, ...) one channel's statistics are taken over (N·H·W...)."""
    return math.prod(x.shape) // x.shape[1]


class BatchStatNorm(nn.Module):
    """A BatchNorm layer in train mode that keeps no running statistics (the attacker's copy).

    ``composite`` normalises with plain tensor ops instead of ``F.batch_norm``: the same function,
    but its second derivative is right under ``torch.func.vmap`` (torch 2.14's batching rule for
    the native batch-norm double backward gives input gradients off by ~1 %, also in float64).

    ``keep_statistics``: each forward keeps what :meth:`take_statistics` needs — its input, or in
    ``composite`` mode the mean and variance it normalised with (not computed twice).
    """

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, *, keep_statistics: bool = False):
        super().__init__()
        self.weight, self.bias, self.eps = bn.weight, bn.bias, bn.eps
        self.composite = False
        self.keep_statistics = keep_statistics
        self._kept: torch.Tensor | tuple[torch.Tensor, torch.Tensor, int] | None = None

    def take_statistics(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(mean, var) (C,) of the last forward's input as ``F.batch_norm`` folds them into its
        running statistics: biased mean, unbiased variance (biased for a single value per
        channel); None if nothing is kept. Forgotten once taken: a kept tensor would keep that
        call's whole graph alive."""
        kept, self._kept = self._kept, None
        if kept is None:
            return None
        if isinstance(kept, torch.Tensor):  # the input (native mode): its statistics are computed now
            kept = (*_mean_and_variance(kept), _values_per_channel(kept))
        mean, var, count = kept
        return mean.flatten(), var.flatten() * (count / (count - 1) if count > 1 else 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.composite:
            if self.keep_statistics:
                self._kept = x
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        # x·scale + shift with per-channel scale = w/sqrt(var + eps), shift = b − mean·scale:
        # two passes over the activations, forward and backward, instead of four
        mean, var = _mean_and_variance(x)
        if self.keep_statistics:
            self._kept = (mean, var, _values_per_channel(x))
        shape = [1, -1, *[1] * (x.dim() - 2)]
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight.view(shape)
        shift = -mean * scale if self.bias is None else self.bias.view(shape) - mean * scale
        return torch.addcmul(shift, x, scale)


class LocalTrainingReplay:
    """The client's local SGD loop as a pure function of (inputs, labels) → predicted Δ.

    Everything that does not depend on the inputs is done once here: a private copy of the
    architecture whose BatchNorm layers (:class:`BatchStatNorm`) always normalise with batch
    statistics and keep no running statistics (so a step updates nothing in place and the replay
    can be ``torch.func.vmap``-ed over restarts and jobs), θ_t cast to the compute dtype/device, the index of every step's
    batch, the BN momentum of every step.

    An unused parameter gets a zero gradient (``torch.optim.SGD`` would skip it; the two differ
    only under weight decay or momentum). Calling it differentiates each step with ``torch.autograd.grad(create_graph=True)``, or with
    ``torch.func.grad`` when ``functional`` (needed under ``torch.func.vmap``; ~8 % slower per
    step on one CPU thread); see :func:`unroll_local_training` for the arguments and the result.
    """

    def __init__(self, model: nn.Module, global_state: dict[str, torch.Tensor], training: TrainingSpec,
                 batches: Sequence[Sequence[int]], *, device: torch.device,
                 dtype: torch.dtype = torch.float32, lr: float | None = None, buffers: bool = False):
        def cast(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype).detach()

        self.lr = training.lr if lr is None else lr
        self.momentum, self.wd, self.nesterov = training.momentum, training.weight_decay, training.nesterov
        self.names = parameter_names(model)
        self.start = {k: cast(global_state[k]) for k in self.names}
        bn_layers = {prefix: mod for prefix, mod in model.named_modules()
                     if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.track_running_stats}
        self.model = copy.deepcopy(model).to(device=device, dtype=dtype).train()
        self.norms = {prefix: BatchStatNorm(mod, keep_statistics=buffers) for prefix, mod in bn_layers.items()}
        for prefix, norm in self.norms.items():
            parent, _, leaf = prefix.rpartition(".")
            setattr(self.model.get_submodule(parent) if parent else self.model, leaf, norm)
        # buffers that are not BN running statistics are inputs of the forward pass, from θ_t
        self.constants = {k: cast(global_state.get(k, v)) for k, v in self.model.named_buffers()}
        self.indices = [torch.as_tensor(list(batch), dtype=torch.long, device=device) for batch in batches]
        self.buffers = buffers
        self.running0: dict[str, torch.Tensor] = {}
        self.bn_momenta: list[dict[str, float]] = [{} for _ in batches]  # per step: layer -> momentum
        if buffers:
            for prefix, mod in bn_layers.items():
                for key in (f"{prefix}.running_mean", f"{prefix}.running_var"):
                    self.running0[key] = cast(global_state.get(key, getattr(mod, key.rsplit(".", 1)[1])))
                tracked = int(global_state.get(f"{prefix}.num_batches_tracked", 0))
                for step, momenta in enumerate(self.bn_momenta):
                    momenta[prefix] = mod.momentum if mod.momentum is not None else 1.0 / (tracked + step + 1)
        self._functional_step = torch.func.grad(self._functional_loss, has_aux=True)

    def _forward_loss(self, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Batch-mean cross-entropy at ``params``; the BN layers keep their statistics."""
        return _loss(functional_call(self.model, {**params, **self.constants}, (x,)), y)

    def _statistics(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        taken = {prefix: norm.take_statistics() for prefix, norm in self.norms.items()}
        return {prefix: stats for prefix, stats in taken.items() if stats is not None}

    def _functional_loss(self, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor):
        return self._forward_loss(params, x, y), self._statistics()

    def _autograd_step(self, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor):
        leaves = {k: v if v.requires_grad else v.detach().requires_grad_(True) for k, v in params.items()}
        loss = self._forward_loss(leaves, x, y)
        grads = torch.autograd.grad(loss, list(leaves.values()), create_graph=True, allow_unused=True,
                                    materialize_grads=True)
        # statistics after the gradient: the graph's order, hence the rounding of the input
        # gradient, stays that of the replay this class replaced (demo numbers unchanged)
        return dict(zip(leaves, grads)), self._statistics()

    def __call__(self, inputs: torch.Tensor, labels: torch.Tensor, *,
                 functional: bool = False) -> dict[str, torch.Tensor]:
        lr, momentum, wd, nesterov = self.lr, self.momentum, self.wd, self.nesterov
        for norm in self.norms.values():
            norm.composite = functional
        params = dict(self.start)
        momentum_buffers: dict[str, torch.Tensor] = {}
        running = dict(self.running0)
        for step, index in enumerate(self.indices):
            # indexed even for the whole batch: the input gradient then sums the replay's
            # contributions before the caller's (e.g. the TV prior's), in the same order as before
            x, y = inputs[index], labels[index]
            grads, stats = (self._functional_step if functional else self._autograd_step)(params, x, y)
            for name in self.names:
                p = params[name]
                d = grads[name] + wd * p if wd != 0 else grads[name]
                if momentum != 0:
                    buf = d if step == 0 else momentum * momentum_buffers[name] + d
                    momentum_buffers[name] = buf
                    d = d + momentum * buf if nesterov else buf
                params[name] = p - lr * d
            for prefix, (mean, var) in stats.items():
                m = self.bn_momenta[step][prefix]
                rm, rv = f"{prefix}.running_mean", f"{prefix}.running_var"
                running[rm] = (1 - m) * running[rm] + m * mean
                running[rv] = (1 - m) * running[rv] + m * var
        # θ_K − θ_t as the client computes it (not Σ −lr·d: the same up to rounding, but the signed
        # descent amplifies rounding differences into visibly different reconstructions)
        delta = {name: params[name] - self.start[name] for name in self.names}
        for key, value in running.items():
            delta[key] = value - self.running0[key]
        return delta


def unroll_local_training(model: nn.Module, global_state: dict[str, torch.Tensor], inputs: torch.Tensor,
                          labels: torch.Tensor, training: TrainingSpec, batches: Sequence[Sequence[int]],
                          *, lr: float | None = None, buffers: bool = False) -> dict[str, torch.Tensor]:
    """Predicted update Δ of the client's local SGD loop, differentiable w.r.t. ``inputs``/``labels``.

    ``model``: the architecture (its own weights and buffers are neither used nor modified);
    ``global_state``: θ_t (parameters and buffers); ``inputs`` (n, C, H, W) normalised;
    ``labels``: (n,) int64 class indices, or (n, num_classes) float label logits;
    ``training``: the public round config (``lr`` unless overridden by ``lr``, momentum,
    weight_decay, nesterov); ``batches``: index tuples into ``inputs``, one per step (e.g.
    ``fedsim.schedule.local_batches(n, B, epochs, max_steps)``).

    Returns ``{name: Δ}`` for every trainable parameter, plus the BatchNorm running statistics
    when ``buffers`` is true. Computation happens in ``inputs.dtype`` on ``inputs.device``. Set-up
    and replay in one call: an attack that replays many times builds a :class:`LocalTrainingReplay`.
    """
    replay = LocalTrainingReplay(model, global_state, training, batches, device=inputs.device,
                                 dtype=inputs.dtype, lr=lr, buffers=buffers)
    return replay(inputs, labels)


def step_coefficients(num_steps: int, momentum: float, nesterov: bool) -> torch.Tensor:
    """a_j (K,) float64 such that −Δ/lr = Σ_j a_j·(g_j + wd·θ_j) for K steps of torch SGD with
    momentum (dampening 0); all 1 without momentum."""
    j = torch.arange(1, num_steps + 1, dtype=torch.float64)
    if momentum == 0:
        return torch.ones(num_steps, dtype=torch.float64)
    geo = (1 - momentum ** (num_steps - j + 1)) / (1 - momentum)
    return 1 + momentum * geo if nesterov else geo


def observed_gradient(obs: Observation, names: list[str]) -> dict[str, torch.Tensor]:
    """Σ_j a_j g_j (float64) of the tensors ``names``, estimated from the observed Δ.

    ``−Δ/lr − wd·Σ_j a_j θ_j`` with the parameters of step j approximated by a linear drift,
    ``θ_j ≈ θ_t + ((j − 1)/K)·Δ``: exact for FedSGD (K = 1, where it is ``−Δ/lr − wd·a_1·θ_t``)
    and for wd = 0; otherwise the residual is of order ``wd·lr·K·|Δ|``.
    """
    tr = obs.training
    a = step_coefficients(max(obs.num_steps, 1), tr.momentum, tr.nesterov)
    drift = float((a * torch.arange(len(a), dtype=torch.float64)).sum()) / len(a)
    out = {}
    for name in names:
        delta = obs.update[name].double()
        g = -delta / tr.lr
        if tr.weight_decay:
            g = g - tr.weight_decay * (float(a.sum()) * obs.global_state[name].double() + drift * delta)
        out[name] = g
    return out
