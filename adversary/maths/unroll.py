"""Differentiable re-implementation of the client's local training (the attacker's model of it).

The client (``clients.training``) trains a copy of the global model in ``train()`` mode with
``torch.optim.SGD(lr, momentum, weight_decay, nesterov)`` on ``F.cross_entropy`` (batch mean),
one optimizer step per batch of the schedule, and uploads Δ = state_after − state_before.

:func:`unroll_local_training` replays that loop functionally (``torch.func.functional_call``,
gradients taken with ``create_graph=True``), so the predicted Δ is differentiable with respect
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


def unroll_local_training(model: nn.Module, global_state: dict[str, torch.Tensor], inputs: torch.Tensor,
                          labels: torch.Tensor, training: TrainingSpec, batches: Sequence[Sequence[int]],
                          *, lr: float | None = None, buffers: bool = False,
                          create_graph: bool = True) -> dict[str, torch.Tensor]:
    """Predicted update Δ of the client's local SGD loop, differentiable w.r.t. ``inputs``/``labels``.

    ``model``: the architecture (its own weights and buffers are neither used nor modified);
    ``global_state``: θ_t (parameters and buffers); ``inputs`` (n, C, H, W) normalised;
    ``labels``: (n,) int64 class indices, or (n, num_classes) float label logits;
    ``training``: the public round config (``lr`` unless overridden by ``lr``, momentum,
    weight_decay, nesterov); ``batches``: index tuples into ``inputs``, one per step (e.g.
    ``fedsim.schedule.local_batches(n, B, epochs, max_steps)``).

    Returns ``{name: Δ}`` for every trainable parameter, plus the BatchNorm running statistics
    when ``buffers`` is true. Computation happens in ``inputs.dtype`` on ``inputs.device``.
    """
    lr = training.lr if lr is None else lr
    momentum, wd, nesterov = training.momentum, training.weight_decay, training.nesterov
    device, dtype = inputs.device, inputs.dtype
    names = parameter_names(model)

    def cast(t: torch.Tensor) -> torch.Tensor:
        t = t.to(device)
        return t.to(dtype) if t.is_floating_point() else t

    start = {k: cast(global_state[k]).detach().requires_grad_(True) for k in names}
    params = dict(start)
    buffer_state = {k: cast(v).detach() for k, v in model.named_buffers()}
    for k in buffer_state:
        if k in global_state:
            buffer_state[k] = cast(global_state[k]).detach()

    # differentiable running statistics: capture each BN layer's input with a pre-hook
    bn_layers = {prefix: mod for prefix, mod in model.named_modules()
                 if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.track_running_stats}
    running = {}
    if buffers:
        for prefix in bn_layers:
            running[f"{prefix}.running_mean"] = buffer_state[f"{prefix}.running_mean"]
            running[f"{prefix}.running_var"] = buffer_state[f"{prefix}.running_var"]
    captured: dict[str, torch.Tensor] = {}
    handles = []
    if buffers:
        for prefix, mod in bn_layers.items():
            def hook(_mod, args, prefix=prefix):
                captured[prefix] = args[0]
            handles.append(mod.register_forward_pre_hook(hook))
    tracked = {prefix: 0 for prefix in bn_layers}
    for prefix in bn_layers:
        key = f"{prefix}.num_batches_tracked"
        if key in global_state:
            tracked[prefix] = int(global_state[key])

    was_training = model.training
    model.train()
    momentum_buffers: dict[str, torch.Tensor] = {}
    try:
        for batch in batches:
            index = torch.as_tensor(list(batch), dtype=torch.long, device=device)
            captured.clear()
            # fresh buffer copies every step: F.batch_norm updates them in place
            state = {**{k: v.clone() for k, v in buffer_state.items()}, **params}
            logits = functional_call(model, state, (inputs[index],))
            loss = _loss(logits, labels[index])
            grads = torch.autograd.grad(loss, [params[k] for k in names], create_graph=create_graph,
                                        allow_unused=True)
            new_params = {}
            for name, g in zip(names, grads):
                p = params[name]
                if g is None:  # unused parameter: torch.optim.SGD skips it
                    new_params[name] = p
                    continue
                d = g + wd * p if wd != 0 else g
                if momentum != 0:
                    buf = d if name not in momentum_buffers else momentum * momentum_buffers[name] + d
                    momentum_buffers[name] = buf
                    d = d + momentum * buf if nesterov else buf
                new_params[name] = p - lr * d
            params = new_params
            if buffers:
                for prefix, mod in bn_layers.items():
                    if prefix not in captured:
                        continue
                    x = captured[prefix]
                    dims = [0] + list(range(2, x.dim()))
                    count = x.numel() // x.shape[1]
                    mean = x.mean(dim=dims)
                    var = x.var(dim=dims, unbiased=count > 1)
                    tracked[prefix] += 1
                    m = mod.momentum if mod.momentum is not None else 1.0 / tracked[prefix]
                    rm, rv = f"{prefix}.running_mean", f"{prefix}.running_var"
                    running[rm] = (1 - m) * running[rm] + m * mean
                    running[rv] = (1 - m) * running[rv] + m * var
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    delta = {name: params[name] - start[name] for name in names}
    if buffers:
        for key, value in running.items():
            delta[key] = value - buffer_state[key]
    return delta


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
