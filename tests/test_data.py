"""Data loading and partitioning: embedded sets, real on-disk formats, partitions."""
from __future__ import annotations

import os
import pickle
import struct
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedsim.data import DataError, DatasetSplits, load_data, partition_indices
from fedsim.scenario import DataSpec


@pytest.fixture(scope="module")
def photos() -> DatasetSplits:
    return load_data(DataSpec(), seed=0)


def test_embedded_photos_default(photos: DatasetSplits) -> None:
    d = photos.domain
    assert d.num_classes >= 10 and len(d.class_names) == d.num_classes
    assert d.shape == (3, 32, 32)
    assert photos.train_x.shape == (2000, 3, 32, 32) and photos.train_x.dtype == torch.float32
    assert photos.test_x.shape == (500, 3, 32, 32)
    assert photos.train_y.dtype == torch.int64 and photos.test_y.dtype == torch.int64
    assert torch.bincount(photos.train_y).tolist() == [200] * 10
    assert torch.bincount(photos.test_y).tolist() == [50] * 10
    mean, std = photos.train_x.mean(dim=(0, 2, 3)), photos.train_x.std(dim=(0, 2, 3))
    assert torch.allclose(mean, torch.zeros(3), atol=1e-3)
    assert torch.allclose(std, torch.ones(3), atol=1e-3)
    unit = d.to_unit(photos.train_x)
    assert unit.min() >= 0.0 and unit.max() <= 1.0
    # test images come from another RNG stream: no test image repeats a train image
    assert torch.cdist(photos.test_x[:50].flatten(1), photos.train_x.flatten(1)).min() > 1e-3


def test_embedded_photos_deterministic_by_seed(photos: DatasetSplits) -> None:
    again = load_data(DataSpec(), seed=0)
    assert torch.equal(again.train_x, photos.train_x) and torch.equal(again.train_y, photos.train_y)
    assert torch.equal(again.test_x, photos.test_x)
    other = load_data(replace(DataSpec(), train_examples=100, test_examples=20), seed=1)
    assert not torch.equal(other.train_x, photos.train_x[:100])


def test_embedded_photos_size_and_counts() -> None:
    s = load_data(DataSpec(image_size=16, train_examples=25, test_examples=13), seed=3)
    assert s.train_x.shape == (25, 3, 16, 16) and s.test_x.shape == (13, 3, 16, 16)
    counts = torch.bincount(s.train_y, minlength=10)
    assert counts.max() - counts.min() <= 1


def test_lfw_faces() -> None:
    s = load_data(DataSpec(dataset="lfw_faces"), seed=0)
    assert s.domain.shape == (1, 32, 32) and s.domain.num_classes == 2
    assert s.domain.class_names == ("face", "non-face")
    # 200 images exist: test = min(500, 50), train = min(2000, 150)
    assert s.train_x.shape == (150, 1, 32, 32) and s.test_x.shape == (50, 1, 32, 32)
    assert torch.bincount(s.train_y).tolist() == [75, 75]
    assert torch.bincount(s.test_y).tolist() == [25, 25]
    assert abs(s.train_x.mean().item()) < 1e-4 and abs(s.train_x.std().item() - 1.0) < 1e-3
    # train and test are disjoint
    assert torch.cdist(s.test_x.flatten(1), s.train_x.flatten(1)).min() > 1e-4
    again = load_data(DataSpec(dataset="lfw_faces"), seed=0)
    assert torch.equal(again.train_x, s.train_x)
    other = load_data(DataSpec(dataset="lfw_faces"), seed=1)
    assert not torch.equal(other.train_y, s.train_y)


# ---------------------------------------------------------------- real on-disk formats

def _pickle(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:
        pickle.dump(obj, fh)


@pytest.fixture
def skip_md5(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision checks the CIFAR files against the md5 of the official archives
    (``CIFAR10._check_integrity`` and ``_load_meta`` call ``cifar.check_integrity``); tiny
    hand-written files cannot match, so the test keeps the existence check and drops the md5."""
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


def _cifar_rows(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8)  # CIFAR row: R plane, G, B


def _check_unnormalise(s: DatasetSplits, raw_unit: torch.Tensor, labels: list[int]) -> None:
    """Each loaded example equals one raw example (with its label) after undoing normalisation."""
    unit = s.train_x * torch.tensor(s.domain.std).view(-1, 1, 1) + torch.tensor(s.domain.mean).view(-1, 1, 1)
    dist = torch.cdist(unit.flatten(1), raw_unit.flatten(1))
    match = dist.argmin(dim=1)
    assert dist.min(dim=1).values.max() < 1e-4
    assert len(set(match.tolist())) == len(match)  # a subset without repeats
    assert s.train_y.tolist() == [labels[i] for i in match.tolist()]


def test_cifar10_pickle_layout(tmp_path: Path, skip_md5: None) -> None:
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    rows, labels = [], []
    for b in range(1, 6):
        r, y = _cifar_rows(4, rng), rng.integers(0, 10, 4).tolist()
        _pickle(folder / f"data_batch_{b}", {"data": r, "labels": y})
        rows.append(r)
        labels += y
    _pickle(folder / "test_batch", {"data": _cifar_rows(6, rng), "labels": rng.integers(0, 10, 6).tolist()})
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _pickle(folder / "batches.meta", {"label_names": names})

    spec = DataSpec(dataset="cifar10", root=str(tmp_path), train_examples=15, test_examples=100)
    s = load_data(spec, seed=0)
    assert s.train_x.shape == (15, 3, 32, 32) and s.test_x.shape == (6, 3, 32, 32)  # test capped at 6
    assert s.domain.mean == (0.4914, 0.4822, 0.4465) and s.domain.std == (0.2470, 0.2435, 0.2616)
    assert s.domain.class_names == tuple(names) and s.domain.num_classes == 10
    raw = torch.from_numpy(np.concatenate(rows)).view(-1, 3, 32, 32).float() / 255.0
    _check_unnormalise(s, raw, labels)
    assert torch.equal(load_data(spec, seed=0).train_x, s.train_x)
    assert not torch.equal(load_data(spec, seed=1).train_y, s.train_y)

    resized = load_data(replace(spec, image_size=16), seed=0)
    assert resized.train_x.shape == (15, 3, 16, 16)


def test_cifar100_pickle_layout(tmp_path: Path, skip_md5: None) -> None:
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-100-python"
    rows, fine = _cifar_rows(8, rng), rng.integers(0, 100, 8).tolist()
    _pickle(folder / "train", {"data": rows, "fine_labels": fine, "coarse_labels": [0] * 8})
    _pickle(folder / "test", {"data": _cifar_rows(3, rng), "fine_labels": [1, 2, 3], "coarse_labels": [0] * 3})
    _pickle(folder / "meta", {"fine_label_names": [f"c{i}" for i in range(100)], "coarse_label_names": []})

    s = load_data(DataSpec(dataset="cifar100", root=str(tmp_path), train_examples=100, test_examples=10), seed=0)
    assert s.train_x.shape == (8, 3, 32, 32) and s.test_x.shape == (3, 3, 32, 32)
    assert s.domain.num_classes == 100 and s.domain.mean == (0.5071, 0.4865, 0.4409)
    assert sorted(s.test_y.tolist()) == [1, 2, 3]
    _check_unnormalise(s, torch.from_numpy(rows).view(-1, 3, 32, 32).float() / 255.0, fine)


def _idx_images(path: Path, images: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    n, h, w = images.shape
    path.write_bytes(struct.pack(">IIII", 0x0803, n, h, w) + images.astype(np.uint8).tobytes())


def _idx_labels(path: Path, labels: np.ndarray) -> None:
    path.write_bytes(struct.pack(">II", 0x0801, len(labels)) + labels.astype(np.uint8).tobytes())


@pytest.mark.parametrize("dataset,folder,mean", [("mnist", "MNIST", 0.1307), ("fashion_mnist", "FashionMNIST", 0.2860)])
def test_mnist_idx_layout(tmp_path: Path, dataset: str, folder: str, mean: float) -> None:
    # torchvision 0.29 only checks that the four uncompressed raw files exist (no md5)
    rng = np.random.default_rng(2)
    raw = tmp_path / folder / "raw"
    train_img, train_lab = rng.integers(0, 256, (12, 28, 28)), rng.integers(0, 10, 12)
    _idx_images(raw / "train-images-idx3-ubyte", train_img)
    _idx_labels(raw / "train-labels-idx1-ubyte", train_lab)
    _idx_images(raw / "t10k-images-idx3-ubyte", rng.integers(0, 256, (5, 28, 28)))
    _idx_labels(raw / "t10k-labels-idx1-ubyte", rng.integers(0, 10, 5))

    s = load_data(DataSpec(dataset=dataset, root=str(tmp_path), image_size=28, train_examples=10, test_examples=10), 0)
    assert s.train_x.shape == (10, 1, 28, 28) and s.test_x.shape == (5, 1, 28, 28)
    assert s.domain.shape == (1, 28, 28) and s.domain.num_classes == 10 and s.domain.mean == (mean,)
    _check_unnormalise(s, torch.from_numpy(train_img).float().unsqueeze(1) / 255.0, train_lab.tolist())

    up = load_data(DataSpec(dataset=dataset, root=str(tmp_path), train_examples=10, test_examples=10), 0)
    assert up.train_x.shape == (10, 1, 32, 32)


def test_imagefolder_layout(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    colours = {"blue": (0, 0, 255), "red": (255, 0, 0)}
    for split, count in (("train", 4), ("test", 2)):
        for name, rgb in colours.items():
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(count):
                size = (int(rng.integers(20, 60)), int(rng.integers(20, 60)))  # non-square, odd sizes
                Image.new("RGB", size, rgb).save(tmp_path / split / name / f"{i}.png")
    Image.new("L", (30, 30), 255).save(tmp_path / "train" / "red" / "grey.png")  # loaded as RGB

    s = load_data(DataSpec(dataset="imagefolder", root=str(tmp_path), image_size=16), seed=0)
    assert s.train_x.shape == (9, 3, 16, 16) and s.test_x.shape == (4, 3, 16, 16)
    assert s.domain.class_names == ("blue", "red") and s.domain.num_classes == 2
    assert torch.bincount(s.train_y).tolist() == [4, 5] and torch.bincount(s.test_y).tolist() == [2, 2]
    assert torch.allclose(s.train_x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)
    unit = s.domain.to_unit(s.test_x)
    blue = unit[s.test_y == 0].mean(dim=(0, 2, 3))
    assert torch.allclose(blue, torch.tensor([0.0, 0.0, 1.0]), atol=1e-3)


@pytest.mark.parametrize("dataset,named", [
    ("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python"),
    ("mnist", "MNIST/raw"), ("fashion_mnist", "FashionMNIST/raw"), ("imagefolder", "train"),
])
def test_missing_data_names_folder(tmp_path: Path, dataset: str, named: str) -> None:
    root = tmp_path / "nowhere"
    with pytest.raises(DataError) as info:
        load_data(DataSpec(dataset=dataset, root=str(root)), seed=0)
    message = str(info.value)
    assert "\n" not in message
    assert dataset in message and str(root) in message and named in message
    assert ("put the images there" if dataset == "imagefolder" else "data.download = true") in message


# ---------------------------------------------------------------- partitions

def test_iid_partition() -> None:
    labels = torch.arange(1000) % 10
    parts = partition_indices(labels, num_clients=10, examples_per_client=64, scheme="iid", alpha=0.5, seed=0)
    assert [len(p) for p in parts] == [64] * 10
    assert all(p.dtype == torch.int64 for p in parts)
    allidx = torch.cat(parts)
    assert len(set(allidx.tolist())) == 640 and allidx.min() >= 0 and allidx.max() < 1000
    again = partition_indices(labels, 10, 64, "iid", 0.5, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(parts, again))
    other = partition_indices(labels, 10, 64, "iid", 0.5, seed=1)
    assert not all(torch.equal(a, b) for a, b in zip(parts, other))


def _max_class_share(labels: torch.Tensor, parts: list[torch.Tensor]) -> float:
    return float(np.mean([torch.bincount(labels[p], minlength=10).max().item() / len(p) for p in parts]))


def test_dirichlet_partition_skew_and_determinism() -> None:
    labels = torch.arange(2000) % 10
    skewed = partition_indices(labels, 20, 50, "dirichlet", alpha=0.1, seed=0)
    flat = partition_indices(labels, 20, 50, "dirichlet", alpha=100.0, seed=0)
    for parts in (skewed, flat):
        assert [len(p) for p in parts] == [50] * 20
        assert len(set(torch.cat(parts).tolist())) == 1000
    share_skewed, share_flat = _max_class_share(labels, skewed), _max_class_share(labels, flat)
    assert share_skewed > 0.6 and share_flat < 0.3, (share_skewed, share_flat)
    again = partition_indices(labels, 20, 50, "dirichlet", alpha=0.1, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(skewed, again))
    other = partition_indices(labels, 20, 50, "dirichlet", alpha=0.1, seed=1)
    assert not all(torch.equal(a, b) for a, b in zip(skewed, other))


def test_dirichlet_uses_whole_pool_when_exhausted() -> None:
    # the pool is exactly full: later clients must take whatever classes remain
    labels = torch.tensor([0] * 30 + [1] * 5 + [2] * 5)
    parts = partition_indices(labels, 4, 10, "dirichlet", alpha=0.05, seed=4)
    assert sorted(torch.cat(parts).tolist()) == list(range(40))


def test_partition_errors() -> None:
    labels = torch.arange(100) % 10
    with pytest.raises(ValueError, match="only 100"):
        partition_indices(labels, 10, 11, "iid", 0.5, seed=0)
    with pytest.raises(ValueError, match="unknown partition scheme"):
        partition_indices(labels, 2, 10, "shards", 0.5, seed=0)


def test_generated_sets_come_back_from_the_disk_cache(tmp_path, monkeypatch) -> None:
    spec = DataSpec(train_examples=30, test_examples=10, image_size=8)
    monkeypatch.setenv("FEDSIM_CACHE", str(tmp_path / "cache"))
    first = load_data(spec, seed=4)
    entries = list((tmp_path / "cache").glob("*.pt"))
    assert len(entries) == 1
    again = load_data(spec, seed=4)  # read back: the same tensors and domain
    assert torch.equal(again.train_x, first.train_x) and torch.equal(again.test_y, first.test_y)
    assert again.domain == first.domain
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1  # one entry per (spec, seed)
    load_data(replace(spec, image_size=16), seed=4)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2
    entries[0].write_bytes(b"truncated")  # a damaged entry is built again, never used
    rebuilt = load_data(spec, seed=4)
    assert torch.equal(rebuilt.train_x, first.train_x)
    monkeypatch.setenv("FEDSIM_CACHE", "off")
    off = load_data(replace(spec, train_examples=20), seed=4)
    assert off.train_x.shape[0] == 20 and len(list((tmp_path / "cache").glob("*.pt"))) == 2
