"""``fedsim train-prior``: train the attacker's generative prior (GIAS/GIML) on auxiliary data
disjoint from every client's data (:func:`auxiliary_images`), with a progress bar of the losses;
writes the checkpoint and a PNG grid of samples beside it (``OUT.png``)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from adversary.priors.checkpoint import PriorHeader, save_prior
from adversary.priors.search import generate
from adversary.priors.training import PriorTraining, train_prior
from adversary.scoring.images import save_comparison_grid
from fedsim.data import (AUXILIARY, load_auxiliary, load_data, load_image_folder, unassigned_training_images)
from fedsim.run.preparation import validate_scenario
from fedsim.scenario import Scenario
from fedsim.seeding import derive_seed


@dataclass
class PriorOutcome:
    """What :func:`train_prior_for` wrote, and the mean losses of the last ``loss_steps`` steps
    (100, or all when fewer)."""

    checkpoint: Path
    samples: Path
    header: PriorHeader
    d_loss: float
    g_loss: float
    loss_steps: int


@dataclass
class AuxiliaryImages:
    """The attacker's auxiliary images (N, C, H, W) in [0, 1], their labels (N,) (None for a
    folder of files), the data set's number of classes, and where they came from."""

    images: torch.Tensor
    labels: torch.Tensor | None
    num_classes: int
    source: dict


def auxiliary_images(scenario: Scenario, examples: int, folder: str | Path | None = None) -> AuxiliaryImages:
    """The attacker's auxiliary images for ``scenario``'s image shape: the image files under
    ``folder`` when given (unlabelled); else the data set's own auxiliary stream (embedded photos:
    new crops, :func:`fedsim.data.load_auxiliary`); else the training images no client holds
    (:func:`fedsim.data.unassigned_training_images`)."""
    spec = scenario.data
    splits = load_data(spec, scenario.seed)
    classes = splits.domain.num_classes
    if folder is not None:
        images = load_image_folder(folder, splits.domain.shape, examples, scenario.seed)
        return AuxiliaryImages(images, None, classes, {"dataset": "folder", "split": str(Path(folder).resolve())})
    if spec.dataset in AUXILIARY:
        images, labels = load_auxiliary(spec, scenario.seed, examples)
        return AuxiliaryImages(images, labels, classes, {"dataset": spec.dataset, "split": "auxiliary"})
    images, labels = unassigned_training_images(scenario, splits, examples)
    return AuxiliaryImages(images, labels, classes,
                           {"dataset": spec.dataset, "split": "training images held by no client"})


def train_prior_for(scenario_path: str | Path, out: str | Path, settings: PriorTraining, examples: int,
                    show_progress: bool = True, folder: str | Path | None = None) -> PriorOutcome:
    """Train a prior for ``scenario_path``'s data on ``examples`` auxiliary images (from
    ``folder`` when given: :func:`auxiliary_images`)."""
    scenario = validate_scenario(scenario_path)
    out = Path(out)
    aux = auxiliary_images(scenario, examples, folder)
    images = aux.images
    seed = derive_seed(scenario.seed, "prior")
    bar = tqdm(total=settings.steps, desc="train-prior", unit="step", disable=not show_progress)

    def on_step(step: int, d_loss: float, g_loss: float) -> None:
        bar.update(1)
        if step % 20 == 0:
            bar.set_postfix(d_loss=f"{d_loss:.3f}", g_loss=f"{g_loss:.3f}", refresh=False)

    try:
        trained = train_prior(images, settings, seed, on_step, labels=aux.labels, num_classes=aux.num_classes)
    finally:
        bar.close()
    data = {**aux.source, "examples": len(images),
            "image_size": scenario.data.image_size, "seed": scenario.seed, "scenario": str(scenario.source),
            "steps": settings.steps}
    config = {"latent_dim": settings.latent_dim, "width": settings.width}
    if settings.conditional:
        config["num_classes"] = aux.num_classes
    header = save_prior(out, trained.generator, config, data)
    sample_labels = torch.arange(16) % aux.num_classes  # a conditional prior's samples: classes in turn
    with torch.no_grad():
        samples = generate(trained.generator, torch.randn((16, settings.latent_dim),
                                                          generator=torch.Generator().manual_seed(0)), sample_labels)
    grid = save_comparison_grid(out.with_suffix(".png"), images[:16], samples, nrow=8)
    tail = trained.losses[-100:]
    return PriorOutcome(out, grid, header, sum(d for d, _ in tail) / len(tail), sum(g for _, g in tail) / len(tail),
                        len(tail))
