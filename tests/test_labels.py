"""Label recovery from the last layer of an observed update (adversary.maths.labels)."""
from __future__ import annotations

import pytest
import torch

from adversary.maths.labels import counts_from_head, recover_labels
from adversary.maths.unroll import step_coefficients
from fedsim.data import load_data
from fedsim.scenario import DataSpec, ModelSpec, TrainingSpec
from helpers import client_update

CONVNET = ModelSpec(name="convnet", width=32)
MLP = ModelSpec(name="mlp", hidden=(256,))


@pytest.fixture(scope="module")
def photos():
    torch.set_num_threads(1)
    return load_data(DataSpec(train_examples=200, test_examples=10), seed=0)




def multiset_accuracy(pred: torch.Tensor, true: torch.Tensor, num_classes: int) -> float:
    a, b = torch.bincount(pred, minlength=num_classes), torch.bincount(true, minlength=num_classes)
    return torch.minimum(a, b).sum().item() / len(true)


@pytest.mark.parametrize("spec", [CONVNET, MLP], ids=["convnet", "mlp"])
def test_single_example_label_is_exact(photos, spec):
    fedsgd = TrainingSpec(batch_size=1, lr=0.1)
    for seed in range(25):
        i = seed * 7 % len(photos.train_y)
        obs = client_update(spec, photos.domain, photos.train_x[i:i + 1], photos.train_y[i:i + 1], fedsgd, seed)
        assert recover_labels(obs, 1).tolist() == [photos.train_y[i].item()], f"seed {seed}"


def test_single_example_without_bias_uses_weight_signs(photos):
    """A head without bias: the true class's weight-gradient row is the one pointing the other way."""
    fedsgd = TrainingSpec(batch_size=1, lr=0.1)
    for seed in range(10):
        i = seed * 11 % len(photos.train_y)
        obs = client_update(CONVNET, photos.domain, photos.train_x[i:i + 1], photos.train_y[i:i + 1], fedsgd, seed)
        weight_grad = -obs.update["classifier.weight"] / fedsgd.lr
        counts = counts_from_head(weight_grad, None, 1, 1.0)
        assert counts.argmax().item() == photos.train_y[i].item() and counts.sum() == 1


def test_batch_of_distinct_labels(photos):
    """Batch 8, distinct labels, untrained ConvNet, FedSGD: >= 90 % label accuracy."""
    y_all = photos.train_y
    accs = []
    for seed in range(10):
        g = torch.Generator().manual_seed(seed)
        classes = torch.randperm(10, generator=g)[:8]
        idx = torch.stack([torch.nonzero(y_all == c).flatten()[seed % 5] for c in classes])
        obs = client_update(CONVNET, photos.domain, photos.train_x[idx], y_all[idx], TrainingSpec(batch_size=8, lr=0.1),
                            seed)
        accs.append(multiset_accuracy(recover_labels(obs, 8), y_all[idx], 10))
    assert sum(accs) / len(accs) >= 0.9, accs


def test_batch_with_repeated_labels_gives_counts(photos):
    """Batches of 8 and 16 drawn at random (repeats): the counts, not just the set, are recovered."""
    y_all = photos.train_y
    accs = []
    for seed in range(6):
        g = torch.Generator().manual_seed(100 + seed)
        size = 8 if seed % 2 else 16
        idx = torch.randperm(len(y_all), generator=g)[:size]
        obs = client_update(CONVNET, photos.domain, photos.train_x[idx], y_all[idx],
                            TrainingSpec(batch_size=size, lr=0.1), seed)
        pred = recover_labels(obs, size)
        assert len(pred) == size
        accs.append(multiset_accuracy(pred, y_all[idx], 10))
    assert sum(accs) / len(accs) >= 0.9, accs


@pytest.mark.parametrize("n,training,threshold", [
    (8, TrainingSpec(batch_size=2, lr=0.05, momentum=0.9, weight_decay=5e-4), 0.6),
    (2, TrainingSpec(batch_size=2, epochs=5, lr=0.05, momentum=0.9, weight_decay=5e-4), 0.9),
], ids=["8ex-4steps", "2ex-5epochs"])
def test_multistep_update_is_approximately_right(photos, n, training, threshold):
    """Multi-step local training with momentum and weight decay: approximate, well above chance."""
    y_all = photos.train_y
    accs = []
    for seed in range(8):
        idx = torch.randperm(len(y_all), generator=torch.Generator().manual_seed(200 + seed))[:n]
        obs = client_update(CONVNET, photos.domain, photos.train_x[idx], y_all[idx], training, seed)
        accs.append(multiset_accuracy(recover_labels(obs, n), y_all[idx], 10))
    assert sum(accs) / len(accs) >= threshold, accs


def test_step_coefficients_match_sgd_momentum():
    """−Δ/lr = Σ a_j g_j for constant fake gradients g_j = e_j, plain and nesterov momentum."""
    for nesterov in (False, True):
        p = torch.zeros(4, requires_grad=True)
        opt = torch.optim.SGD([p], lr=1.0, momentum=0.9, nesterov=nesterov)
        for j in range(4):
            p.grad = torch.eye(4)[j]
            opt.step()
        assert torch.allclose(-p.detach().double(), step_coefficients(4, 0.9, nesterov), atol=1e-6)
