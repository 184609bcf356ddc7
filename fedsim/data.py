"""Data sets and their partition across clients.

``load_data(spec, seed)`` returns a :class:`DatasetSplits`: a training pool and a
held-out test split, both as *normalised* float32 tensors ``(N, C, H, W)`` with
int64 labels ``(N,)``, plus the public :class:`DataDomain`. Images are resized to
``spec.image_size`` (square). Everything is a pure function of ``(spec, seed)``.

Data sets
---------
- ``embedded_photos`` (default, no download): 10 classes, one bundled colour photo
  each (see ``PHOTOS``). Every example is a random square crop (area 25-100 % of
  the largest square, random position), randomly flipped, with mild brightness and
  contrast jitter. Train and test come from different RNG streams, class-balanced.
- ``lfw_faces``: ``skimage.data.lfw_subset()``, 200 grayscale 25x25 images, the
  first 100 faces, the last 100 non-faces. The test split takes
  ``min(test_examples, 50)`` images, the training pool
  ``min(train_examples, 200 - test size)``; both class-balanced (to within one).
- ``cifar10``, ``cifar100``, ``mnist``, ``fashion_mnist``: torchvision layout under
  ``spec.root``; a seeded subset of ``train_examples`` of the official training set
  and ``test_examples`` of the official test set (all of it if it is smaller).
- ``imagefolder``: ``spec.root/train/<class>/*`` and ``spec.root/test/<class>/*``
  (same class folders), read as RGB, centre-cropped to a square, seeded subsets as above.

Normalisation: the standard per-channel statistics for the four torchvision sets;
mean/std of the training pool for the others.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from fedsim.cache import cached
from fedsim.domain import DataDomain
from fedsim.scenario import DataSpec, Scenario

# class name -> loader of a bundled RGB photo (uint8, H x W x 3); all ship with the packages
PHOTOS: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": lambda: _skimage("astronaut"),
    "cat": lambda: _skimage("chelsea"),
    "coffee": lambda: _skimage("coffee"),
    "rocket": lambda: _skimage("rocket"),
    "galaxies": lambda: _skimage("hubble_deep_field"),
    "tissue": lambda: _skimage("immunohistochemistry"),
    "retina": lambda: _skimage("retina"),
    "motorcycle": lambda: _skimage("stereo_motorcycle")[0],
    "temple": lambda: _sklearn("china.jpg"),
    "flower": lambda: _sklearn("flower.jpg"),
}

STANDARD_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
}

LFW_MAX_TEST = 50
#: data sets made from packaged photos: a pure function of (spec, seed, package versions), cached
GENERATED = ("embedded_photos", "lfw_faces")
#: bump when the generation changes, so that old cache entries are not used
GENERATED_FORMAT = 1
_STREAM_TRAIN, _STREAM_TEST, _STREAM_PARTITION, _STREAM_AUXILIARY = 0, 1, 2, 3
#: data sets with an auxiliary split (:func:`load_auxiliary`)
AUXILIARY = ("embedded_photos",)


class DataError(RuntimeError):
    """A data set is missing or unreadable; the message names the set, the folder and the fix."""


@dataclass(frozen=True)
class DatasetSplits:
    train_x: torch.Tensor  # (N, C, H, W) float32, normalised with domain.mean/std
    train_y: torch.Tensor  # (N,) int64
    test_x: torch.Tensor  # (M, C, H, W) held-out test split, same format
    test_y: torch.Tensor  # (M,) int64
    domain: DataDomain


def load_data(spec: DataSpec, seed: int) -> DatasetSplits:
    """Load (or generate) the data set ``spec.dataset``; deterministic in ``seed``.

    Returns at most ``spec.train_examples`` training and ``spec.test_examples`` test
    examples at ``spec.image_size`` x ``spec.image_size``. Raises :class:`DataError`
    when a data set on disk is missing or unreadable. The generated sets (embedded photos, LFW
    faces) are kept in the disk cache (:mod:`fedsim.cache`), keyed by everything they depend on.
    """
    if spec.dataset in GENERATED:
        key = repr((GENERATED_FORMAT, spec.dataset, spec.image_size, spec.train_examples, spec.test_examples, seed,
                    *(_version(p) for p in ("torch", "torchvision", "numpy", "scikit-image", "scikit-learn"))))
        return _from_entry(cached(key, lambda: _to_entry(_build(spec, seed))))
    return _build(spec, seed)


def _build(spec: DataSpec, seed: int) -> DatasetSplits:
    loaders = {
        "embedded_photos": _load_embedded_photos,
        "lfw_faces": _load_lfw_faces,
        "cifar10": _load_torchvision,
        "cifar100": _load_torchvision,
        "mnist": _load_torchvision,
        "fashion_mnist": _load_torchvision,
        "imagefolder": _load_imagefolder,
    }
    if spec.dataset not in loaders:
        raise ValueError(f"unknown data set {spec.dataset!r}; choose one of {sorted(loaders)}")
    train_u, train_y, test_u, test_y, class_names = loaders[spec.dataset](spec, seed)
    if spec.dataset in STANDARD_STATS:
        mean, std = STANDARD_STATS[spec.dataset]
    else:
        mean = tuple(train_u.mean(dim=(0, 2, 3)).tolist())
        std = tuple(train_u.std(dim=(0, 2, 3)).clamp_min(1e-6).tolist())
    domain = DataDomain(shape=tuple(train_u.shape[1:]), num_classes=len(class_names),
                        mean=mean, std=std, class_names=tuple(class_names))
    return DatasetSplits(domain.normalise(train_u).contiguous(), train_y,
                         domain.normalise(test_u).contiguous(), test_y, domain)


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "-"


def _to_entry(splits: DatasetSplits) -> dict:
    d = splits.domain
    return {"train_x": splits.train_x, "train_y": splits.train_y, "test_x": splits.test_x, "test_y": splits.test_y,
            "shape": list(d.shape), "num_classes": d.num_classes, "mean": list(d.mean), "std": list(d.std),
            "class_names": list(d.class_names)}


def _from_entry(entry: dict) -> DatasetSplits:
    domain = DataDomain(tuple(entry["shape"]), entry["num_classes"], tuple(entry["mean"]), tuple(entry["std"]),
                        tuple(entry["class_names"]))
    return DatasetSplits(entry["train_x"], entry["train_y"], entry["test_x"], entry["test_y"], domain)


def partition_indices(labels: torch.Tensor, num_clients: int, examples_per_client: int,
                      scheme: str, alpha: float, seed: int) -> list[torch.Tensor]:
    """Split a pool with ``labels`` (N,) into ``num_clients`` disjoint index sets.

    Every client gets exactly ``examples_per_client`` indices (int64, into ``labels``),
    drawn without replacement.

    - ``iid``: a seeded permutation of the pool, cut into consecutive chunks.
    - ``dirichlet``: clients are filled one after another. Client k draws class
      proportions p ~ Dir(alpha * 1) over the C classes, then class counts
      ~ Multinomial(examples_per_client, p). Counts above what is left of a class are
      cut to what is left, and the shortfall is drawn again from p restricted to
      classes with examples left (proportional to what is left if p puts no mass
      there), until the client is full. The examples of each class are taken from a
      seeded shuffle of that class. Small alpha -> few classes per client.

    Raises ValueError if the pool has fewer than ``num_clients * examples_per_client``
    examples or the scheme is unknown.
    """
    labels_np = labels.detach().cpu().numpy().astype(np.int64)
    needed = num_clients * examples_per_client
    if needed > len(labels_np):
        raise ValueError(f"partition needs {num_clients} clients x {examples_per_client} examples = {needed}, "
                         f"but the training pool has only {len(labels_np)}; lower examples_per_client or "
                         f"num_clients, or raise data.train_examples")
    rng = _rng(seed, _STREAM_PARTITION)
    if scheme == "iid":
        order = rng.permutation(len(labels_np))
        return [torch.from_numpy(order[k * examples_per_client:(k + 1) * examples_per_client].copy())
                for k in range(num_clients)]
    if scheme == "dirichlet":
        return _dirichlet_partition(labels_np, num_clients, examples_per_client, alpha, rng)
    raise ValueError(f"unknown partition scheme {scheme!r}; choose 'iid' or 'dirichlet'")


def _dirichlet_partition(labels: np.ndarray, num_clients: int, n: int, alpha: float,
                         rng: np.random.Generator) -> list[torch.Tensor]:
    classes = np.unique(labels)
    queues = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    taken = np.zeros(len(classes), dtype=np.int64)
    sizes = np.array([len(q) for q in queues], dtype=np.int64)
    parts = []
    for _ in range(num_clients):
        p = rng.dirichlet(np.full(len(classes), alpha))
        counts = np.zeros(len(classes), dtype=np.int64)
        while (short := n - counts.sum()) > 0:
            room = sizes - taken - counts
            weights = np.where(room > 0, p, 0.0)
            if not weights.sum() > 0:
                weights = room.clip(min=0).astype(np.float64)
            counts += np.minimum(rng.multinomial(short, weights / weights.sum()), room)
        idx = np.concatenate([q[t:t + c] for q, t, c in zip(queues, taken, counts)])
        taken += counts
        parts.append(torch.from_numpy(rng.permutation(idx)))
    return parts


# --------------------------------------------------------------------------- helpers

# (train images in [0, 1] (N, C, H, W), train labels (N,), test images, test labels, class names)
Loaded = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[str]]


def _rng(seed: int, stream: int) -> np.random.Generator:
    """Independent generator per (seed, stream); any Python int seed."""
    return np.random.default_rng([stream, seed % 2**64])


def _resize(unit: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, H, W) in [0, 1] -> (N, C, size, size), antialiased bilinear; no-op if already that size."""
    if unit.shape[-2:] == (size, size):
        return unit
    return F.interpolate(unit, size=(size, size), mode="bilinear", antialias=True,
                         align_corners=False).clamp(0.0, 1.0)


def _balanced_labels(n: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` labels, class counts differing by at most one, in random order."""
    return rng.permutation(np.arange(n) % num_classes)


def _skimage(name: str) -> np.ndarray:
    import skimage.data

    return getattr(skimage.data, name)()


def _sklearn(name: str) -> np.ndarray:
    from sklearn.datasets import load_sample_image

    return load_sample_image(name)


@functools.lru_cache(maxsize=4)
def _working_photos(image_size: int) -> tuple[torch.Tensor, ...]:
    """The class photos as (3, H, W) float [0, 1], shorter side cut to 4 x image_size (never enlarged).

    Crops cover at least half the shorter side, so they are still sampled at >= 2x the
    output resolution; cached per process.
    """
    photos = []
    for load in PHOTOS.values():
        img = torch.from_numpy(np.array(load()[..., :3])).permute(2, 0, 1).float() / 255.0
        h, w = img.shape[1:]
        scale = min(1.0, 4 * image_size / min(h, w))
        if scale < 1.0:
            img = F.interpolate(img[None], size=(round(h * scale), round(w * scale)), mode="bilinear",
                                antialias=True, align_corners=False)[0].clamp(0.0, 1.0)
        photos.append(img.contiguous())
    return tuple(photos)


def _photo_crops(photo: torch.Tensor, count: int, size: int, rng: np.random.Generator) -> torch.Tensor:
    """``count`` random augmented square crops of ``photo`` (3, H, W) -> (count, 3, size, size) in [0, 1]."""
    from torchvision.ops import roi_align

    h, w = photo.shape[1:]
    side = np.sqrt(rng.uniform(0.25, 1.0, count)) * min(h, w)
    x0 = rng.uniform(0.0, 1.0, count) * (w - side)
    y0 = rng.uniform(0.0, 1.0, count) * (h - side)
    boxes = torch.from_numpy(np.stack([np.zeros(count), x0, y0, x0 + side, y0 + side], axis=1)).float()
    # roi_align with adaptive sampling averages ceil(side/size)^2 bilinear samples per output pixel
    crops = roi_align(photo[None], boxes, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    flip = torch.from_numpy(rng.random(count) < 0.5)
    crops[flip] = crops[flip].flip(-1)
    brightness = torch.from_numpy(rng.uniform(0.85, 1.15, count)).float().view(-1, 1, 1, 1)
    contrast = torch.from_numpy(rng.uniform(0.85, 1.15, count)).float().view(-1, 1, 1, 1)
    grey = crops.mean(dim=(1, 2, 3), keepdim=True)
    return ((crops - grey) * contrast + grey * brightness).clamp(0.0, 1.0)


def _photo_split(count: int, size: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    photos = _working_photos(size)
    labels = _balanced_labels(count, len(photos), rng)
    images = torch.empty(count, 3, size, size)
    for c, photo in enumerate(photos):
        where = np.flatnonzero(labels == c)
        images[torch.from_numpy(where)] = _photo_crops(photo, len(where), size, rng)
    return images, torch.from_numpy(labels)


def _load_embedded_photos(spec: DataSpec, seed: int) -> Loaded:
    train_x, train_y = _photo_split(spec.train_examples, spec.image_size, _rng(seed, _STREAM_TRAIN))
    test_x, test_y = _photo_split(spec.test_examples, spec.image_size, _rng(seed, _STREAM_TEST))
    return train_x, train_y, test_x, test_y, list(PHOTOS)


def _load_lfw_faces(spec: DataSpec, seed: int) -> Loaded:
    import skimage.data

    faces = torch.from_numpy(skimage.data.lfw_subset()).float().unsqueeze(1)  # (200, 1, 25, 25) in [0, 1]
    labels = (torch.arange(len(faces)) >= len(faces) // 2).long()  # 0 = face, 1 = non-face
    rng = _rng(seed, _STREAM_TRAIN)
    # interleave the two shuffled classes so that every prefix is balanced
    order = np.stack([rng.permutation(np.flatnonzero(labels.numpy() == c)) for c in (0, 1)], axis=1).reshape(-1)
    n_test = min(spec.test_examples, LFW_MAX_TEST)
    n_train = min(spec.train_examples, len(faces) - n_test)
    test_idx = torch.from_numpy(rng.permutation(order[:n_test]))
    train_idx = torch.from_numpy(rng.permutation(order[n_test:n_test + n_train]))
    images = _resize(faces, spec.image_size)
    return images[train_idx], labels[train_idx], images[test_idx], labels[test_idx], ["face", "non-face"]


def _missing(spec: DataSpec, folder: Path, expected: str, detail: str) -> DataError:
    """One-line error: which set, where it looked, why, and how to fix it."""
    if spec.dataset == "imagefolder":
        fix = "put the images there"
    elif spec.download:
        fix = "check the network connection, or place the files there"
    else:
        fix = "set data.download = true on a machine with internet, or place the files there"
    return DataError(f"data set '{spec.dataset}' not found or unreadable in '{folder}' ({detail}); "
                     f"{fix} ({expected})")


def _subset(n_total: int, n_max: int, rng: np.random.Generator) -> np.ndarray:
    """A seeded subset of ``min(n_total, n_max)`` indices, in random order."""
    return rng.permutation(n_total)[:min(n_total, n_max)]


def _load_torchvision(spec: DataSpec, seed: int) -> Loaded:
    import torchvision.datasets as tvd

    kind, expected = {
        "cifar10": (tvd.CIFAR10, "cifar-10-batches-py/data_batch_1..5, test_batch, batches.meta"),
        "cifar100": (tvd.CIFAR100, "cifar-100-python/train, test, meta"),
        "mnist": (tvd.MNIST, "MNIST/raw/train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-*"),
        "fashion_mnist": (tvd.FashionMNIST, "FashionMNIST/raw/train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-*"),
    }[spec.dataset]
    root = Path(spec.root)
    out: list = []
    for train, stream, cap in ((True, _STREAM_TRAIN, spec.train_examples), (False, _STREAM_TEST, spec.test_examples)):
        try:
            ds = kind(root=str(root), train=train, download=spec.download)
        except (RuntimeError, OSError) as exc:
            detail = str(exc).splitlines()[0] if spec.download else "missing, incomplete or corrupted"
            raise _missing(spec, root.resolve(), expected, detail) from None
        except Exception as exc:  # noqa: BLE001 - torchvision's parsers fail on corrupt files with any type
            detail = f"{type(exc).__name__}: {str(exc).splitlines()[0]}" if str(exc) else type(exc).__name__
            raise DataError(f"data set '{spec.dataset}' in '{root.resolve()}': a file is corrupt ({detail}); "
                            f"replace the files ({expected})") from None
        data = torch.as_tensor(np.asarray(ds.data))  # CIFAR: (N, 32, 32, 3); MNIST: (N, 28, 28); uint8
        data = data.unsqueeze(1) if data.ndim == 3 else data.permute(0, 3, 1, 2)
        targets = torch.as_tensor(ds.targets).long()
        folder = Path(getattr(ds, "raw_folder", root / getattr(ds, "base_folder", ""))).resolve()
        _check_labels(spec, f"{folder} ({'train' if train else 'test'} split)", targets, len(data), len(ds.classes))
        idx = torch.from_numpy(_subset(len(data), cap, _rng(seed, stream)))
        out += [_resize(data[idx].float() / 255.0, spec.image_size), targets[idx]]
    return out[0], out[1], out[2], out[3], list(ds.classes)


def _check_labels(spec: DataSpec, where: str, labels: torch.Tensor, num_images: int, num_classes: int) -> None:
    """One label per image, each a class index in [0, num_classes); else a DataError naming ``where``."""
    if len(labels) != num_images:
        raise DataError(f"data set '{spec.dataset}' in '{where}': {len(labels)} labels for {num_images} images "
                        "(the label file does not match the image file)")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise DataError(f"data set '{spec.dataset}' in '{where}': labels range over "
                        f"{int(labels.min())}..{int(labels.max())}, but there are {num_classes} classes "
                        f"(0..{num_classes - 1}); the label file is corrupt")


def _load_imagefolder(spec: DataSpec, seed: int) -> Loaded:
    from torchvision.datasets import ImageFolder

    expected = "train/<class>/<image> and test/<class>/<image>, same class folders"
    out: list = []
    classes: list[str] = []
    for split, stream, cap in (("train", _STREAM_TRAIN, spec.train_examples), ("test", _STREAM_TEST, spec.test_examples)):
        folder = (Path(spec.root) / split).resolve()
        try:
            ds = ImageFolder(str(folder))
        except OSError as exc:  # no folder, no class folders, no images
            raise _missing(spec, folder, expected, str(exc).splitlines()[0]) from None
        idx = _subset(len(ds), cap, _rng(seed, stream))
        images = [_square_image(ds.samples[i][0], "data set 'imagefolder'", 3, spec.image_size) for i in idx]
        if classes and ds.classes != classes:
            raise DataError(f"data set 'imagefolder': class folders in '{folder}' {ds.classes} differ from "
                            f"train/ {classes}; give test/ the same class folders")
        classes = ds.classes
        out += [torch.cat(images), torch.as_tensor(ds.targets)[torch.from_numpy(idx)].long()]
    return out[0], out[1], out[2], out[3], classes


def _square_image(path: str | Path, where: str, channels: int, size: int) -> torch.Tensor:
    """The image file ``path`` as (1, C, size, size) in [0, 1]: greyscale (C = 1) or RGB, the centre
    square cropped, then resized. A DataError naming ``where`` and the file when it is corrupt or
    truncated (PIL raises OSError, SyntaxError or ValueError depending on the damage)."""
    from PIL import Image
    from torchvision.transforms.functional import center_crop, pil_to_tensor

    try:
        with Image.open(path) as img:
            unit = pil_to_tensor(img.convert("L" if channels == 1 else "RGB")).float() / 255.0
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{where}: cannot read image '{path}' ({type(exc).__name__}: {exc}); "
                        "replace or remove that file") from None
    return _resize(center_crop(unit, [min(unit.shape[1:])])[None], size)


def load_auxiliary(spec: DataSpec, seed: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The attacker's auxiliary data: ``count`` images (N, C, H, W) in [0, 1] and labels (N,),
    drawn from their own RNG stream, so that they are disjoint from the training pool (every
    client's data) and the test split while following the same distribution.

    Only for ``embedded_photos`` (new random crops of the same photos); other data sets raise
    :class:`DataError`.
    """
    if spec.dataset not in AUXILIARY:
        raise DataError(f"data set '{spec.dataset}' has no auxiliary split for the attacker; "
                        f"available for: {', '.join(AUXILIARY)}")
    return _photo_split(count, spec.image_size, _rng(seed, _STREAM_AUXILIARY))


#: image files an auxiliary folder may hold (searched recursively)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def unassigned_training_images(scenario: Scenario, splits: DatasetSplits,
                               count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` images (N, C, H, W) in [0, 1] and their labels (N,) of the training pool that no
    client of ``scenario`` holds (its partitions), a seeded choice: auxiliary data from the
    clients' distribution for the data sets without a generated auxiliary stream. DataError when
    fewer than ``count`` are left, naming the keys that make room."""
    try:
        assigned = torch.cat(scenario_partitions(scenario, splits))
    except ValueError as exc:
        raise DataError(f"data set '{scenario.data.dataset}': {exc}") from None
    free = np.setdiff1d(np.arange(len(splits.train_y)), assigned.numpy())
    if len(free) < count:
        raise DataError(f"data set '{scenario.data.dataset}': {len(free)} of the {len(splits.train_y)} training "
                        f"images are held by no client, {count} auxiliary images asked for; ask for fewer "
                        f"(--examples), or raise data.train_examples or lower federation.num_clients × "
                        f"data.examples_per_client, or give a folder of your own images (--aux-folder)")
    chosen = torch.from_numpy(np.sort(_rng(scenario.seed, _STREAM_AUXILIARY).choice(free, size=count, replace=False)))
    return splits.domain.to_unit(splits.train_x[chosen]), splits.train_y[chosen]


def load_image_folder(folder: str | Path, shape: tuple[int, int, int], count: int, seed: int) -> torch.Tensor:
    """Up to ``count`` images (N, C, H, W) in [0, 1] from the image files under ``folder`` (any
    depth; a seeded choice when there are more), centre-cropped square and resized to ``shape``
    (C = 1: greyscale, 3: RGB). DataError naming the folder or the file when there is no image or
    one is unreadable."""
    root = Path(folder).resolve()
    if not root.is_dir():
        raise DataError(f"auxiliary folder '{root}': no such folder")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"auxiliary folder '{root}': no image files ({', '.join(IMAGE_SUFFIXES)})")
    if len(files) > count:
        files = [files[i] for i in np.sort(_rng(seed, _STREAM_AUXILIARY).choice(len(files), count, replace=False))]
    return torch.cat([_square_image(path, f"auxiliary folder '{root}'", shape[0], shape[1]) for path in files])


def scenario_partitions(scenario: Scenario, splits: DatasetSplits) -> list[torch.Tensor]:
    """The index tensor of every client of ``scenario`` into ``splits.train_x`` (its partition
    scheme, sizes and seed); raises ValueError when the pool is too small."""
    return partition_indices(splits.train_y, scenario.federation.num_clients, scenario.data.examples_per_client,
                             scenario.data.partition, scenario.data.dirichlet_alpha, scenario.seed)
