"""GIML (Jeon et al., NeurIPS'21): a curious server meta-learns its generator from the updates
it observes, with no data of its own.

Each observed update is one task. Per task: a latent search through the current generator G
(:func:`adversary.priors.search.latent_search`, the GIAS objective), then ``inner_steps`` Adam
steps on one copy θ' of G's weights, shared by the batch's images, at the latents found; then
the Reptile step θ ← θ + ``meta_lr`` · (θ' − θ). The learned G is then GIAS's generator.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from adversary.maths.matching import BN_WEIGHT, Matcher, attack_labels, descend_inputs, image_objective, resolve_mode
from adversary.observation import Observation
from adversary.priors.search import FlatWeights, latent_search
from fedsim.seeding import derive_seed


@dataclass(frozen=True)
class GimlSettings:
    """One task's work: latent search, inner steps, Reptile step (``meta_lr``: the published
    1e-2 assumes thousands of tasks; a simulated federation shows tens)."""

    latent_iterations: int = 100
    latent_lr: float = 0.05
    inner_steps: int = 30
    inner_lr: float = 1e-3
    meta_lr: float = 0.5
    tv_weight: float = 1e-4
    bn_weight: float = BN_WEIGHT
    multistep: str = "auto"


@dataclass
class Task:
    """What one observed update did to the generator: the matching objective after the latent
    search, and after the inner steps."""

    server_round: int
    client_id: int
    latent_objective: float
    inner_objective: float


class MetaLearner:
    """Holds the generator being learned; :meth:`learn` takes one observed update. A task's random
    latent start derives from (``seed``, its round, its client), so a resumed run learns what an
    uninterrupted one does."""

    def __init__(self, generator: nn.Module, settings: GimlSettings, seed: int, device: torch.device):
        self.generator = generator.to(device).eval()
        for p in self.generator.parameters():
            p.requires_grad_(False)
        self.settings = settings
        self.device = device
        self.seed = seed

    def learn(self, obs: Observation) -> Task:
        """One task: latent search, inner steps on shared weights, Reptile step on G."""
        s = self.settings
        matcher = Matcher(obs, self.device, resolve_mode(s.multistep, obs), bn_weight=s.bn_weight)
        labels, _ = attack_labels(obs, matcher.n)
        objective = image_objective(matcher, labels.to(self.device), s.tv_weight)
        normalise = obs.domain.normalise
        rng = torch.Generator().manual_seed(derive_seed(self.seed, obs.server_round, obs.client_id))
        start = torch.randn((matcher.n, self.generator.latent_dim), generator=rng).to(self.device)
        labels = labels.to(self.device)
        found = latent_search(objective, self.generator, normalise, start, labels, iterations=s.latent_iterations,
                              lr=s.latent_lr)
        weights = FlatWeights(self.generator)
        z = found.inputs.detach()
        inner = descend_inputs(lambda row: objective(normalise(weights.shared_images(row, z, labels))), weights.base,
                               iterations=s.inner_steps, lr=s.inner_lr, signed=False, lr_decay=False)
        weights.load(weights.base + s.meta_lr * (inner.inputs - weights.base))
        return Task(obs.server_round, obs.client_id, found.objective, inner.objective)
