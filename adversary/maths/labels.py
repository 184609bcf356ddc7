"""Label recovery from the last layer of an observed update.

For cross-entropy with a linear head ``z = W h + b`` and one step on a batch of size B,
``∂L/∂b_c = (1/B) Σ_i (p_ic − y_ic)`` and ``∂L/∂W_c = (1/B) Σ_i (p_ic − y_ic) h_iᵀ``.

- **b = 1** (iDLG, Zhao et al. 2020): ``p_c − y_c`` is negative only for the true class, so the
  label is the only negative entry of the bias gradient; without a bias, the true class's
  weight row points opposite to all the others (it is minus their sum).
- **Batches** (count-based, in the spirit of Wainakh et al.'s LLG and Yin et al.'s
  GradInversion): ``n_c = Σ_i p_ic − B·∂L/∂b_c``. ``Σ_i p_ic`` is estimated by running the
  global model (train mode, as the client does) on dummy inputs; the real-valued estimates are
  turned into ``n`` integer counts greedily (one label at a time to the class with the largest
  remaining deficit), so repeated labels are recovered as counts, not just as a set. Without a
  bias the row sums of ``∂L/∂W`` are used with the mean ``‖h‖₁`` of the dummy features
  (non-negative ReLU features assumed).

Multi-step updates: ``−Δ/lr`` is a weighted sum of the per-step gradients; the weights follow
from the public momentum/nesterov setting, and weight decay's contribution is removed
(:func:`adversary.maths.unroll.observed_gradient`); every example is assumed to carry the average weight. This is exact for FedSGD and
approximate otherwise (the predictions drift during local training).
"""
from __future__ import annotations

import torch
from torch import nn

from adversary.observation import Observation, global_model
from adversary.maths.unroll import observed_gradient, step_coefficients
from fedsim.models import captured_inputs


def last_layer_names(model: nn.Module, num_classes: int) -> tuple[str, str | None]:
    """State keys of the classifier's weight (num_classes, d) and bias (num_classes,) or None."""
    weight = None
    params = dict(model.named_parameters())
    for name, p in params.items():
        if p.dim() == 2 and p.shape[0] == num_classes:
            weight = name
    if weight is None:
        raise ValueError("no linear output layer with one row per class found")
    bias = weight[: -len("weight")] + "bias" if weight.endswith("weight") else None
    if bias not in params or params[bias].shape != (num_classes,):
        bias = None
    return weight, bias


def _example_weight(obs: Observation, n: int) -> float:
    """Average weight w̄ of one example in −Δ/lr: Σ_i w_i = Σ_j a_j·|B_j|/B_j = Σ_j a_j, so
    w̄ = Σ_j a_j / n (1/B for FedSGD)."""
    tr = obs.training
    return float(step_coefficients(max(obs.num_steps, 1), tr.momentum, tr.nesterov).sum()) / n


@torch.no_grad()
def _dummy_statistics(obs: Observation, n: int, draws: int = 4, seed: int = 0) -> tuple[torch.Tensor, float]:
    """Mean softmax (C,) and mean ‖h‖₁ of the head's input over dummy inputs at θ_t (train mode)."""
    domain = obs.domain
    model = global_model(obs)
    model.train()
    weight, _ = last_layer_names(model, domain.num_classes)
    head = model.get_submodule(weight.rsplit(".", 1)[0])
    gen = torch.Generator().manual_seed(seed)
    probs = []
    with captured_inputs(head, detach=True) as feats:
        batch = max(2, min(n, obs.training.batch_size))
        for _ in range(draws):
            x = torch.randn((batch, *domain.shape), generator=gen)
            lo, hi = domain.bounds(x)
            x = torch.maximum(torch.minimum(x, hi), lo)
            probs.append(torch.softmax(model(x).double(), dim=-1))
    p = torch.cat(probs).mean(0)
    h = torch.cat(feats).double().flatten(1).abs().sum(1).mean()
    return p, float(h)


def _greedy_counts(deficit: torch.Tensor, n: int) -> torch.Tensor:
    """n integer counts from real-valued estimates: repeatedly give one label to the class with
    the largest remaining estimate, then lower that class's estimate by 1."""
    deficit = deficit.clone()
    counts = torch.zeros_like(deficit, dtype=torch.long)
    for _ in range(n):
        c = int(torch.argmax(deficit))
        counts[c] += 1
        deficit[c] -= 1
    return counts


def counts_from_head(weight_grad: torch.Tensor, bias_grad: torch.Tensor | None, n: int, example_weight: float,
                     mean_probs: torch.Tensor | None = None, mean_feature_l1: float = 1.0,
                     calibrate: bool = True) -> torch.Tensor:
    """Label counts (C,) from the (summed, weighted) gradient of the head.

    ``weight_grad`` (C, d), ``bias_grad`` (C,) or None; ``example_weight`` w̄ (1/B for FedSGD);
    ``mean_probs`` the expected softmax output (C,) (uniform if None) and ``mean_feature_l1`` the
    expected ‖h‖₁ (only used without a bias). ``n == 1`` uses the iDLG sign rules.
    ``calibrate``: rescale the estimates by the shrinkage of the gradient seen on absent classes
    (matters for multi-step updates; ≈ 1 for FedSGD).
    """
    num_classes = weight_grad.shape[0]
    counts = torch.zeros(num_classes, dtype=torch.long)
    if n == 1:
        if bias_grad is not None:
            counts[int(torch.argmin(bias_grad))] = 1
            return counts
        # rows are (p_c − y_c)·h: the true class's row is the only one pointing the other way
        rows = weight_grad.double()
        signs = torch.sign(rows @ rows[int(torch.argmax(rows.norm(dim=1)))])
        majority = 1.0 if (signs > 0).sum() >= (signs < 0).sum() else -1.0
        minority = torch.nonzero(signs == -majority).flatten()
        c = int(minority[0]) if len(minority) == 1 else int(torch.argmin(rows.sum(1) * majority))
        counts[c] = 1
        return counts
    p = torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float64) if mean_probs is None else mean_probs
    if bias_grad is not None:
        r = bias_grad.double() / example_weight
    else:
        r = weight_grad.double().sum(1) / (example_weight * max(mean_feature_l1, 1e-12))
    # r_c = s·(Σ_i p_ic − n_c) where s = 1 for FedSGD; over several local steps the model fits its
    # batch and the loss gradient shrinks (s < 1). Classes with r_c > 0 are absent (n_c = 0), so
    # their entries calibrate s against the expected Σ_i p_ic = n·p_c.
    scale = 1.0
    if calibrate:
        absent = r > 0
        if absent.any() and (n * p[absent]).sum() > 0:
            scale = float((r[absent].sum() / (n * p[absent]).sum()).clamp(1e-3, 10.0))
    return _greedy_counts(n * p - r / scale, n)


def label_counts(obs: Observation, n: int) -> torch.Tensor:
    """Estimated number of examples of each class (C,) int64, summing to ``n``."""
    weight, bias = last_layer_names(global_model(obs), obs.domain.num_classes)
    g = observed_gradient(obs, [weight] + ([bias] if bias else []))
    w = _example_weight(obs, n)
    p, h1 = _dummy_statistics(obs, n) if n > 1 else (None, 1.0)
    return counts_from_head(g[weight], g[bias] if bias else None, n, w, p, h1, calibrate=obs.num_steps > 1)


def recover_labels(obs: Observation, n: int) -> torch.Tensor:
    """Labels (n,) int64 of the ``n`` examples behind ``obs.update``, sorted by class.

    Exact for one example and a FedSGD gradient (iDLG); counts-based for batches; the order
    is meaningless (attacks reconstruct a set).
    """
    if n < 1:
        raise ValueError("n must be >= 1")
    counts = label_counts(obs, n)
    return torch.repeat_interleave(torch.arange(len(counts)), counts)
