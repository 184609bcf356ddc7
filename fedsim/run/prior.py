"""``fedsim train-prior``: train the attacker's generative prior (GIAS/GIML) on auxiliary data
disjoint from every client's data (:func:`fedsim.data.load_auxiliary`), with a progress bar of
the losses; writes the checkpoint and a PNG grid of samples beside it (``OUT.png``)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from adversary.priors.checkpoint import PriorHeader, save_prior
from adversary.priors.training import PriorTraining, train_prior
from adversary.scoring.images import save_comparison_grid
from fedsim.data import load_auxiliary
from fedsim.run.preparation import validate_scenario
from fedsim.seeding import derive_seed


@dataclass
class PriorOutcome:
    """What :func:`train_prior_for` wrote, and the mean losses of the last 100 steps."""

    checkpoint: Path
    samples: Path
    header: PriorHeader
    d_loss: float
    g_loss: float


def train_prior_for(scenario_path: str | Path, out: str | Path, settings: PriorTraining, examples: int,
                    show_progress: bool = True) -> PriorOutcome:
    """Train a prior for ``scenario_path``'s data on ``examples`` auxiliary images."""
    scenario = validate_scenario(scenario_path)
    out = Path(out)
    images, _ = load_auxiliary(scenario.data, scenario.seed, examples)
    seed = derive_seed(scenario.seed, "prior")
    bar = tqdm(total=settings.steps, desc="train-prior", unit="step", disable=not show_progress)

    def on_step(step: int, d_loss: float, g_loss: float) -> None:
        bar.update(1)
        if step % 20 == 0:
            bar.set_postfix(d_loss=f"{d_loss:.3f}", g_loss=f"{g_loss:.3f}", refresh=False)

    try:
        trained = train_prior(images, settings, seed, on_step)
    finally:
        bar.close()
    data = {"dataset": scenario.data.dataset, "split": "auxiliary", "examples": examples,
            "image_size": scenario.data.image_size, "seed": scenario.seed, "scenario": str(scenario.source),
            "steps": settings.steps}
    header = save_prior(out, trained.generator, {"latent_dim": settings.latent_dim, "width": settings.width}, data)
    with torch.no_grad():
        samples = trained.generator(torch.randn((16, settings.latent_dim), generator=torch.Generator().manual_seed(0)))
    grid = save_comparison_grid(out.with_suffix(".png"), images[:16], samples, nrow=8)
    tail = trained.losses[-100:]
    return PriorOutcome(out, grid, header, sum(d for d, _ in tail) / len(tail), sum(g for _, g in tail) / len(tail))
