"""GIAS — "Gradient Inversion with Generative Image Prior" (Jeon et al., NeurIPS'21): update
matching through a generator of images like the client's.

Stages (``stage``, the paper's ablation; GI-x, the search over pixels, is ``geiping``):

- ``z``: latent search only — one latent per image, x = G(z);
- ``w``: parameter search only — per-image copies of G's weights from random latents;
- ``z/w`` (GIAS): the latent search, then the parameter search from the latents found.

The objective is the one Geiping's attack minimises (:class:`adversary.maths.matching.Matcher`:
cosine + BN statistics, the local training unrolled for multi-step updates, + TV), so GI-x and
GIAS differ only in what they search over. ``restarts`` latent searches from random latents,
the lowest objective goes on to the parameter search. Labels come from
:mod:`adversary.maths.labels` unless the scenario grants them.

The generator (``generator``): ``"untrained"`` (a DCGAN with its random initialisation), or a
prior checkpoint (:mod:`adversary.priors.checkpoint`) — one trained on auxiliary data by
``fedsim train-prior``, or one GIML learned from observed updates.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from adversary.attacks.base import Attack, AttackContext
from adversary.maths.matching import BN_WEIGHT, TV_WEIGHT, Matcher, attack_labels, image_objective, resolve_mode
from adversary.maths.objectives import LAYER_WEIGHTINGS, MATCHING_LOSSES
from adversary.observation import Observation, Reconstruction
from adversary.priors.checkpoint import PriorError, load_prior
from adversary.priors.search import generate, latent_search, parameter_search
from adversary.priors.training import untrained_generator
from fedsim.domain import DataDomain

STAGES = ("z", "w", "z/w")
UNTRAINED = "untrained"


@dataclass(frozen=True)
class GiasParams:
    """Defaults measured on FedSGD updates of the untrained ConvNet (32x32 embedded photos, CPU;
    benchmarks/gias.py): a third of the evaluations for the latent search, two thirds for the
    parameter search, which steps on the sign of the gradient (b = 8, 300 evaluations, one
    update: plain Adam at the published 1e-3 18.6 dB, at 3e-3 14.1 dB; signed 1e-4 21.3 dB).
    Geiping's TV weight (``TV_WEIGHT``, 0.01) and signed lr 3e-4, so that GI-x and GIAS minimise
    the same objective: on the b = 8 updates of clients 4 and 5 (not the benchmark's), 100 + 200
    evaluations, TV 1e-4 / lr 1e-4 gave 19.60 / 18.63 dB, TV 0.01 / lr 3e-4 20.36 / 19.32 dB
    (the published TV 1e-6 is for 64x64 StyleGAN images; lr 1e-3 was no better)."""

    stage: str = field(default="z/w", metadata={"choices": STAGES, "doc": "z: latent search; w: generator "
                                                "parameters; z/w: both (GIAS)"})
    generator: str = field(default=UNTRAINED, metadata={"doc": "'untrained' or a prior checkpoint file "
                                                        "(fedsim train-prior, or GIML's)"})
    generator_class: str = field(default="", metadata={"doc": "'module:Class' of a user generator the "
                                                       "checkpoint names (same interface as the DCGAN)"})
    latent_iterations: int = field(default=300, metadata={"min": 1, "doc": "latent-search steps per restart"})
    parameter_iterations: int = field(default=600, metadata={"min": 1, "doc": "parameter-search steps"})
    restarts: int = field(default=1, metadata={"min": 1, "doc": "latent searches from random latents"})
    latent_lr: float = field(default=0.05, metadata={"gt": 0.0})
    parameter_lr: float = field(default=3e-4, metadata={"gt": 0.0})
    parameter_signed: bool = field(default=True, metadata={"doc": "parameter search on the sign of the gradient"})
    prior_weight: float = field(default=0.0, metadata={"min": 0.0, "doc": "weight of the distance of the "
                                                       "per-image generator weights from the prior's"})
    tv_weight: float = field(default=TV_WEIGHT, metadata={"min": 0.0})
    bn_weight: float = field(default=BN_WEIGHT, metadata={"min": 0.0})
    loss: str = field(default="cosine", metadata={"choices": MATCHING_LOSSES})
    layer_weighting: str = field(default="equal", metadata={"choices": LAYER_WEIGHTINGS})
    latent_dim: int = field(default=64, metadata={"min": 1, "doc": "untrained generator only"})
    width: int = field(default=32, metadata={"min": 1, "doc": "untrained generator only"})
    multistep: str = field(default="auto", metadata={"choices": ("auto", "unroll", "naive")})
    report_every: int = field(default=50, metadata={"min": 1})

    def check(self) -> tuple[str, str] | None:
        """A checkpoint that cannot be read is a scenario error (its shape is checked against
        the data once the data is loaded: :meth:`check_data`)."""
        return self.check_data(None)

    def check_data(self, domain: DataDomain | None) -> tuple[str, str] | None:
        """Once the data is known: the checkpoint must make images of the data's shape (and, a
        conditional one, know its classes)."""
        if self.generator != UNTRAINED:
            try:
                load_prior(self.generator, None if domain is None else domain.shape, self.generator_class,
                           None if domain is None else domain.num_classes)
            except PriorError as exc:
                return "generator", str(exc)
        return None

    @property
    def evaluations(self) -> int:
        """Objective evaluations this configuration spends (the searches it runs)."""
        latent = self.restarts * self.latent_iterations if "z" in self.stage else 0
        return latent + (self.parameter_iterations if "w" in self.stage else 0)


def load_generator(params: GiasParams, domain: DataDomain, seed: int) -> tuple[nn.Module, dict]:
    """The generator ``params`` name, for images of ``domain``, and the constructor config to save
    it with (a checkpoint's own: its width and classes, not ``params``'); raises PriorError."""
    if params.generator == UNTRAINED:
        return (untrained_generator(domain.shape, params.latent_dim, params.width, seed),
                {"latent_dim": params.latent_dim, "width": params.width})
    generator, header = load_prior(params.generator, domain.shape, params.generator_class, domain.num_classes)
    return generator, header.config


def run(obs: Observation, params: GiasParams, ctx: AttackContext) -> Reconstruction:
    device = ctx.device
    mode = resolve_mode(params.multistep, obs)
    matcher = Matcher(obs, device, mode, loss=params.loss, layer_weighting=params.layer_weighting,
                      bn_weight=params.bn_weight)
    n = matcher.n
    labels, label_source = attack_labels(obs, n)
    labels = labels.to(device)
    objective = image_objective(matcher, labels, params.tv_weight)
    generator = load_generator(params, obs.domain, ctx.seed)[0].to(device)
    for p in generator.parameters():
        p.requires_grad_(False)
    normalise = obs.domain.normalise
    rng = torch.Generator().manual_seed(ctx.seed)
    total, done = params.evaluations, 0

    def on_step(value: float) -> None:
        nonlocal done
        done += 1
        if done % params.report_every == 0:
            ctx.report(done, total, value)

    def random_latents() -> torch.Tensor:
        return torch.randn((n, generator.latent_dim), generator=rng).to(device)

    z, objectives, stopped = random_latents(), [], False
    images, best = None, math.inf
    if "z" in params.stage:
        found = None
        for restart in range(params.restarts):
            descent = latent_search(objective, generator, normalise, z if restart == 0 else random_latents(),
                                    labels, iterations=params.latent_iterations, lr=params.latent_lr,
                                    deadline=ctx.deadline, on_step=on_step)
            objectives.append(descent.objective)
            if found is None or descent.objective < found.objective:
                found = descent
            if descent.stopped:
                stopped = True
                break
        z, best = found.inputs, found.objective
        with torch.no_grad():
            images = normalise(generate(generator, z, labels))
    if "w" in params.stage and not stopped:
        searched, descent = parameter_search(objective, generator, normalise, z, labels,
                                             iterations=params.parameter_iterations,
                                             lr=params.parameter_lr, prior_weight=params.prior_weight,
                                             signed=params.parameter_signed,
                                             deadline=ctx.deadline, on_step=on_step)
        stopped = descent.stopped
        matched = objective(searched).item()  # without the regulariser, comparable with the latent stage
        if images is None or matched < best:
            images, best = searched, matched
    ctx.report(done, total, best)
    return Reconstruction(inputs=images.detach().cpu(), labels=labels.cpu(), iterations=done, objective=best,
                          extras={"stopped_early": stopped, "mode": mode, "stage": params.stage,
                                  "generator": params.generator, "label_source": label_source,
                                  "restart_objectives": objectives})


ATTACK = Attack("gias", GiasParams, run)
