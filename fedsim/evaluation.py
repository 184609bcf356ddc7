"""Global-model accuracy on the held-out test split."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def evaluate_model(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
                   device: torch.device, batch_size: int = 256) -> tuple[float, float]:
    """(accuracy in [0, 1], mean cross-entropy) of ``model`` in eval mode on (N, C, H, W) inputs."""
    model.eval().to(device)
    correct, loss, n = 0, 0.0, len(inputs)
    for start in range(0, n, batch_size):
        x = inputs[start:start + batch_size].to(device)
        y = labels[start:start + batch_size].to(device)
        logits = model(x)
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
    return correct / n, loss / n
