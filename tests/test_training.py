"""Local training is real: the uploaded Δ is what SGD with momentum / weight decay produces."""
import copy

import pytest
import torch
import torch.nn.functional as F

from clients.training import train_locally
from defenses.base import Defense, NoParams
from fedsim.models import build_model, captured_inputs, captured_outputs
from fedsim.scenario import ModelSpec, TrainingSpec
from fedsim.schedule import local_batches, num_local_steps


def _setup(name: str, n: int = 10):
    torch.manual_seed(0)
    model = build_model(ModelSpec(name=name, width=4, hidden=(32,)), (3, 8, 8), 5).double()
    x = torch.randn(n, 3, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 5, (n,))
    return model, x, y


def _identity() -> Defense:
    return Defense(NoParams(), torch.Generator())


@pytest.mark.parametrize("name", ["convnet", "mlp"])
def test_fedsgd_update_is_minus_lr_times_gradient(name):
    model, x, y = _setup(name, n=4)
    reference = copy.deepcopy(model).train()
    loss = F.cross_entropy(reference(x), y)
    grads = torch.autograd.grad(loss, list(reference.parameters()))
    training = TrainingSpec(epochs=1, batch_size=4, lr=0.1, momentum=0.0, weight_decay=0.0, shuffle=False)
    result = train_locally(model, x, y, training, 0.1, torch.Generator(), _identity())
    names = [k for k, _ in reference.named_parameters()]
    for key, g in zip(names, grads):
        assert torch.allclose(result.update[key], -0.1 * g, atol=1e-6, rtol=0), key
    assert result.batches == [(0, 1, 2, 3)]


@pytest.mark.parametrize("name", ["convnet", "mlp"])
@pytest.mark.parametrize("nesterov", [False, True])
def test_multistep_update_matches_plain_torch_loop(name, nesterov):
    model, x, y = _setup(name, n=10)
    training = TrainingSpec(epochs=3, batch_size=4, lr=0.05, momentum=0.9, weight_decay=5e-4,
                            nesterov=nesterov, shuffle=True)
    reference = copy.deepcopy(model)
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    result = train_locally(model, x, y, training, 0.05, torch.Generator().manual_seed(7), _identity())

    # the reference: the same schedule, written out with plain torch
    order = local_batches(10, 4, 3, 0, torch.Generator().manual_seed(7))
    assert result.batches == order and len(order) == num_local_steps(10, 4, 3) == 9
    opt = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=nesterov)
    reference.train()
    for idx in order:
        opt.zero_grad()
        F.cross_entropy(reference(x[list(idx)]), y[list(idx)]).backward()
        opt.step()
    for key, value in reference.state_dict().items():
        assert torch.allclose(result.update[key].double(), (value - before[key]).double(), atol=1e-6), key
    # a multi-step update is not a scaled one-step gradient
    weight = [k for k in result.update if k.endswith("weight")][0]
    assert result.update[weight].abs().sum() > 0


def test_max_steps_caps_the_schedule():
    assert len(local_batches(100, 10, 5, max_steps=7)) == 7
    assert local_batches(5, 2, 2) == [(0, 1), (2, 3), (4,), (0, 1), (2, 3), (4,)]


def test_defense_hooks_are_called_at_step_and_update():
    calls = {"step": 0, "update": 0}

    class Probe(Defense):
        def on_step(self, model, step, total_steps):
            calls["step"] += 1
            for p in model.parameters():
                p.grad.zero_()  # a defense that removes every gradient

        def on_update(self, update):
            calls["update"] += 1
            return {k: v * 0 for k, v in update.items()}

    model, x, y = _setup("mlp", n=8)
    training = TrainingSpec(epochs=2, batch_size=4, lr=0.1, shuffle=False)
    result = train_locally(model, x, y, training, 0.1, torch.Generator(), Probe(NoParams(), torch.Generator()))
    assert calls == {"step": 4, "update": 1}
    assert all(v.abs().sum() == 0 for v in result.update.values())


def test_captured_inputs_keeps_each_forward_input_and_removes_its_hook():
    layer = torch.nn.Linear(3, 2)
    x = torch.randn(4, 3, requires_grad=True)
    with pytest.raises(ValueError):
        with captured_inputs(layer, detach=True) as kept:
            layer(x)
            layer(2 * x)
            raise ValueError("the hook goes even so")
    assert len(kept) == 2 and torch.equal(kept[1], 2 * x.detach()) and not kept[0].requires_grad
    layer(x)
    assert len(kept) == 2 and not layer._forward_pre_hooks
    with captured_inputs(layer) as attached:
        layer(x)
    assert attached[0] is x
    with captured_inputs(layer) as inputs, captured_outputs(layer) as outputs:
        out = layer(x)
    assert inputs[0] is x and outputs[0] is out and out.requires_grad
    with captured_outputs(layer, detach=True) as detached:
        out = layer(x)
    assert torch.equal(detached[0], out.detach()) and not detached[0].requires_grad
    assert not layer._forward_hooks and not layer._forward_pre_hooks
