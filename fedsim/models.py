"""Model zoo: a small ConvNet, a CIFAR-style ResNet-18 and a ReLU MLP.

All models take normalised images of shape (B, C, H, W) and return logits (B, classes).
``build_model(spec, in_shape, num_classes)`` is the one constructor both the clients
and the attacker use (the architecture is public in the threat model).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, ContextManager, Iterator

import torch
from torch import nn

from fedsim.scenario import ModelSpec, Scenario
from fedsim.seeding import derive_seed


def linear_relu_stack(in_features: int, hidden: tuple[int, ...], num_classes: int) -> list[nn.Module]:
    """Linear-ReLU per hidden width, then a linear output layer (no activation)."""
    mods: list[nn.Module] = []
    cin = in_features
    for h in hidden:
        mods += [nn.Linear(cin, h), nn.ReLU()]
        cin = h
    mods.append(nn.Linear(cin, num_classes))
    return mods


def classifier_head(in_features: int, hidden: tuple[int, ...], num_classes: int) -> nn.Module:
    """The head of a conv model: one ``nn.Linear`` without hidden layers (state keys
    ``classifier.weight``), else ``nn.Sequential`` of :func:`linear_relu_stack` (``classifier.0``
    is the first hidden layer: the fully-connected layer SPEAR inverts into features)."""
    mods = linear_relu_stack(in_features, hidden, num_classes)
    return mods[0] if len(mods) == 1 else nn.Sequential(*mods)


class ConvNet(nn.Module):
    """Three conv blocks (conv-BN-ReLU, widths w, 2w, 4w; a 2x max-pool, then adaptive pooling to
    4x4) then :func:`classifier_head` (a linear layer, or hidden Linear-ReLU layers ``head`` first)."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 32, head: tuple[int, ...] = ()):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
        )
        self.classifier = classifier_head(4 * w * 16, head, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18 (3x3 stem, no max-pool), base width ``width`` (64 in the paper), then
    :func:`classifier_head`."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 64, head: tuple[int, ...] = ()):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        layers, cin = [], width
        for i, stride in enumerate((1, 2, 2, 2)):
            cout = width * 2**i
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = classifier_head(cin, head, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


class MLP(nn.Module):
    """Flatten, then Linear-ReLU per hidden width, then a linear head. ``layers[0]`` is the
    first linear layer (the one SPEAR inverts: its input is the flattened image)."""

    def __init__(self, in_features: int, num_classes: int, hidden: tuple[int, ...] = (256,)):
        super().__init__()
        self.layers = nn.Sequential(*linear_relu_stack(in_features, hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(torch.flatten(x, 1))


def build_model(spec: ModelSpec, in_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """Instantiate the architecture ``spec`` for inputs of shape ``in_shape`` = (C, H, W)."""
    c, h, w = in_shape
    if spec.name == "convnet":
        return ConvNet(c, num_classes, spec.width, spec.head)
    if spec.name == "resnet18":
        return ResNet18(c, num_classes, spec.width, spec.head)
    if spec.name == "mlp":
        return MLP(c * h * w, num_classes, spec.hidden)
    raise ValueError(f"unknown model {spec.name!r}")


def initial_model(scenario: Scenario, in_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """The global model of round 1 (θ_0), seeded from the scenario: the server and single-shot
    mode build the same one."""
    torch.manual_seed(derive_seed(scenario.seed, "init"))
    return build_model(scenario.model, in_shape, num_classes)


@contextmanager
def _captured(register: Callable, pick: Callable[[tuple], torch.Tensor], detach: bool) -> Iterator[list[torch.Tensor]]:
    """Hook ``register`` (a module's hook registration); every call appends ``pick(hook arguments)``."""
    captured: list[torch.Tensor] = []

    def keep(*call) -> None:  # returns None: the module's input and output stay as they are
        value = pick(call)
        captured.append(value.detach() if detach else value)

    handle = register(keep)
    try:
        yield captured
    finally:
        handle.remove()


def captured_inputs(layer: nn.Module, *, detach: bool = False) -> ContextManager[list[torch.Tensor]]:
    """Within the block, every forward of ``layer`` appends its (first) input to the yielded list
    (detached when ``detach``); the hook is removed on leaving, exception or not."""
    return _captured(layer.register_forward_pre_hook, lambda call: call[1][0], detach)


def captured_outputs(layer: nn.Module, *, detach: bool = False) -> ContextManager[list[torch.Tensor]]:
    """:func:`captured_inputs` for ``layer``'s output."""
    return _captured(layer.register_forward_hook, lambda call: call[2], detach)


def state_to_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached CPU copy of the full state (parameters and buffers), in state_dict order."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
