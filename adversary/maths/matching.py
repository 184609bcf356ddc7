"""Update matching: what the optimisation attacks (Geiping, DLG, SPEAR's refinement) share.

:class:`Matcher` predicts the update dummy inputs would produce (the client's local training
unrolled, or one naive step) and scores it against the observed one; :func:`descend_inputs`
is the descent on the inputs (Adam on signed gradients, step decay, box projection, deadline,
best iterate kept); the rest picks how many examples to reconstruct, their labels and the
random start.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Callable

import torch

from adversary.maths.defense_model import BAYES_LOSS, UpdateLikelihood, defense_model
from adversary.maths.labels import recover_labels
from adversary.maths.objectives import l2_distance, layer_weights, matching_loss, squared_norms, total_variation
from adversary.observation import Observation, global_model
from adversary.maths.unroll import LocalTrainingReplay, batchnorm_buffer_names, parameter_names
from fedsim.schedule import local_batches

#: total-variation weight of the update-matching objective from random images (Geiping's attack;
#: breaching uses 0.2, see adversary.attacks.geiping.GeipingParams for the measurements)
TV_WEIGHT = 0.01
#: weight of the BN running-statistics match in the update-matching objective
BN_WEIGHT = 1.0

#: what a job is scored against: the compared parameter tensors, their squared norms (L,), the
#: compared BN statistics (each with a leading job dimension when stacked)
JobTargets = tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor]]


class Matcher:
    """Objective of an update-matching attack: the dummies' predicted update vs the observed one.

    Shared by the optimisation attacks. ``mode`` ``unroll`` replays the public local loop;
    ``naive`` predicts one step on the whole batch (−lr·∇L at θ_t).

    ``loss`` names a distance of :mod:`adversary.maths.objectives` (compared in gradient units,
    Δ/lr, plus ``bn_weight`` × the relative L2 of the BN running statistics), or ``"bayes"``: the
    known defense's negative log-likelihood of the observed Δ (:mod:`adversary.maths.defense_model`;
    needs ``obs.defense``), in Δ units, over the parameters and — when ``bn_weight > 0``, whatever
    its value — the BN running statistics, in one likelihood with no separate BN term.

    ``matcher(x, y)`` scores one set of dummies; :meth:`values` scores J jobs × R restarts in one
    vectorised call (``torch.func.vmap``), each with its own BN batch statistics and labels.
    """

    def __init__(self, obs: Observation, device: torch.device, mode: str, *, loss: str = "cosine",
                 layer_weighting: str = "equal", bn_weight: float = 0.0):
        self.obs = obs
        self.device = device
        self.model = global_model(obs).to(device)
        self.state = {k: (v.to(device=device, dtype=torch.float32) if v.is_floating_point() else v.to(device))
                      for k, v in obs.global_state.items()}
        self.n = num_examples(obs)
        self.mode = mode
        tr = obs.training
        if mode == "unroll":
            self.training = tr
            self.batches = local_batches(self.n, tr.batch_size, tr.epochs, tr.max_steps)
        elif mode == "naive":
            self.training = replace(tr, momentum=0.0, weight_decay=0.0, nesterov=False)
            self.batches = [tuple(range(self.n))]
        else:
            raise ValueError(f"unknown mode {mode!r}")
        self.param_names = [k for k in parameter_names(self.model) if obs.update[k].abs().sum() > 0]
        self.buffer_names = batchnorm_buffer_names(self.model) if bn_weight > 0 else []
        self.defense = defense_model(obs.defense) if loss == BAYES_LOSS else None
        # the BN statistics are predicted when compared, and for a clipping defense (its norm spans them)
        self.predict_buffers = bool(self.buffer_names) or (self.defense is not None
                                                           and self.defense.clip_norm is not None)
        # compared in gradient units (Δ/lr), which keeps L2 losses at a sensible scale; the
        # likelihood in Δ units, where the defense's noise lives
        self.scale = 1.0 if self.defense is not None else 1.0 / tr.lr
        self.targets = [obs.update[k].to(device=device, dtype=torch.float32) * self.scale for k in self.param_names]
        self.target_sq = squared_norms(self.targets)  # fixed: not recomputed at every step
        self.buffer_targets = [obs.update[k].to(device=device, dtype=torch.float32) for k in self.buffer_names]
        self.likelihood: UpdateLikelihood | None = None
        if self.defense is not None:
            self.likelihood = self.defense.likelihood(self.targets + self.buffer_targets,
                                                      self.param_names + self.buffer_names)
        self.loss = loss
        self.bn_weight = bn_weight
        self.weights = layer_weights(len(self.param_names), layer_weighting, device=device)
        self.replay = LocalTrainingReplay(self.model, self.state, self.training, self.batches, device=device,
                                          buffers=self.predict_buffers)

    def predict(self, inputs: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.replay(inputs, labels)

    def __call__(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self._score(self.predict(inputs, labels), self.targets, self.target_sq, self.buffer_targets)

    def functional(self, inputs: torch.Tensor, labels: torch.Tensor, job: JobTargets | None = None) -> torch.Tensor:
        """The same value as ``self(inputs, labels)``, the replay differentiated with
        ``torch.func.grad`` (BatchNorm in tensor ops): the form ``torch.func.vmap`` and
        ``torch.compile`` take whole. ``job``: another observation's compared tensors
        (:meth:`targets_of`; None: this matcher's)."""
        targets, target_sq, buffer_targets = (self.targets, self.target_sq, self.buffer_targets) if job is None else job
        return self._score(self.replay(inputs, labels, functional=True), targets, target_sq, buffer_targets)

    def _score(self, pred: dict[str, torch.Tensor], targets: list[torch.Tensor], target_sq: torch.Tensor,
               buffer_targets: list[torch.Tensor]) -> torch.Tensor:
        if self.likelihood is not None:
            return self.likelihood(pred)
        scaled = [pred[k] * self.scale for k in self.param_names] if self.scale != 1.0 else \
            [pred[k] for k in self.param_names]
        value = matching_loss(self.loss, scaled, targets, self.weights, target_sq)
        if self.buffer_names:
            value = value + self.bn_weight * l2_distance([pred[k] for k in self.buffer_names], buffer_targets,
                                                         relative=True) / len(self.buffer_names)
        return value

    def stack_targets(self, observations: list[Observation]) -> JobTargets:
        """The compared tensors of each observation, stacked (J, ...) for :meth:`values`."""
        targets, target_sq, buffer_targets = zip(*[self.targets_of(obs) for obs in observations])
        return ([torch.stack(ts) for ts in zip(*targets)], torch.stack(target_sq),
                [torch.stack(ts) for ts in zip(*buffer_targets)])

    def targets_of(self, obs: Observation) -> JobTargets:
        """The compared tensors of another observation this matcher can score (same θ_t,
        architecture, round config, example count and compared tensors) — parameters, their
        squared norms, BN statistics; ValueError otherwise."""
        other = (obs.model, obs.domain, obs.training, num_examples(obs))
        mine = (self.obs.model, self.obs.domain, self.obs.training, self.n)
        names = [k for k in self.param_names if obs.update[k].abs().sum() > 0]
        if (other != mine or self.likelihood is not None or names != self.param_names
                or obs.global_state.keys() != self.obs.global_state.keys()
                or not all(torch.equal(obs.global_state[k], self.obs.global_state[k]) for k in obs.global_state)):
            raise ValueError(f"observation of round {obs.server_round}, client {obs.client_id} is not "
                             f"compatible with this matcher's")
        cast = [obs.update[k].to(device=self.device, dtype=torch.float32) for k in self.param_names + self.buffer_names]
        targets = [t * self.scale for t in cast[:len(self.param_names)]]
        return targets, squared_norms(targets), cast[len(self.param_names):]

    def values(self, inputs: torch.Tensor, labels: torch.Tensor,
               jobs: JobTargets | None = None) -> torch.Tensor:
        """Objectives (J, R) of J jobs × R restarts: ``inputs`` (J, R, n, C, H, W), ``labels`` (J, n);
        ``jobs``: the compared tensors of every job stacked (J, ...), :meth:`stack_targets`
        (None: this matcher's observation for every job). One ``vmap``-ed call; the Bayes
        likelihood (boolean masks, not vectorisable) is evaluated problem by problem instead."""
        if self.likelihood is not None:
            return torch.stack([torch.stack([self(x, y) for x in xs]) for xs, y in zip(inputs, labels)])

        per_job = torch.func.vmap(self.functional, in_dims=(0, None, None))
        if jobs is None:
            return torch.func.vmap(per_job, in_dims=(0, 0, None))(
                inputs, labels, (self.targets, self.target_sq, self.buffer_targets))
        return torch.func.vmap(per_job, in_dims=(0, 0, 0))(inputs, labels, jobs)


def image_objective(matcher: Matcher, labels: torch.Tensor, tv_weight: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """The objective of an image search (GIAS, GIML): ``x`` (n, C, H, W) normalised -> matching
    loss of ``matcher`` with ``labels`` + ``tv_weight`` × total variation of ``x`` (a scalar tensor)."""

    def objective(x: torch.Tensor) -> torch.Tensor:
        match = matcher(x, labels)
        return match + tv_weight * total_variation(x) if tv_weight else match

    return objective


def num_examples(obs: Observation) -> int:
    """How many distinct examples to reconstruct: what the client reported, else inferred from the
    number of local steps (steps = epochs·ceil(n/B) ⇒ n ≤ B·steps/epochs; the upper end is taken)."""
    tr = obs.training
    if obs.num_examples is None and (tr.max_steps == 0 or obs.num_steps < tr.max_steps):
        return max(1, math.ceil(obs.num_steps / tr.epochs) * tr.batch_size)
    return max(1, obs.num_distinct_examples)


def resolve_mode(multistep: str, obs: Observation) -> str:
    if multistep == "auto":
        return "unroll"
    return multistep


def initial_inputs(init: str, shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    if init == "randn":
        x = torch.randn(shape, generator=generator)
    elif init == "rand":
        x = torch.rand(shape, generator=generator) * 2 - 1
    elif init == "zeros":
        x = torch.zeros(shape)
    else:
        raise ValueError(f"unknown init {init!r}")
    return x.to(device)


def attack_labels(obs: Observation, n: int) -> tuple[torch.Tensor, str]:
    """Labels the attack uses: granted ones if the scenario grants them, else recovered."""
    if obs.labels is not None:
        return obs.labels.clone().long(), "granted"
    return recover_labels(obs, n), "recovered"


@dataclass
class Descent:
    """:func:`descend_inputs`' answer: the best iterate (by objective, the start included), its
    objective, the steps taken, and whether the deadline stopped the descent."""

    inputs: torch.Tensor
    objective: float
    steps: int
    stopped: bool


@dataclass
class BatchDescent:
    """:func:`descend_batch`' answer: per problem the best iterate (*P, ...) and its objective (*P,)."""

    inputs: torch.Tensor
    objectives: torch.Tensor
    steps: int
    stopped: bool


def descend_inputs(objective: Callable[[torch.Tensor], torch.Tensor], start: torch.Tensor, *, iterations: int,
                   lr: float, signed: bool = True, lr_decay: bool = True,
                   bounds: tuple[torch.Tensor, torch.Tensor] | None = None, deadline: float | None = None,
                   on_step: Callable[[float], None] | None = None, movable: torch.Tensor | None = None) -> Descent:
    """Minimise ``objective(x)`` (a scalar tensor) over inputs ``x`` shaped like ``start``.

    Adam on the sign of the input gradient (``signed``) or on the gradient itself; lr x0.1 at
    3/8, 5/8 and 7/8 of ``iterations`` (``lr_decay``); projection onto ``bounds`` = (lo, hi)
    after every step; stops early at the ``time.monotonic()`` ``deadline``. ``on_step(value)``
    is called after each step with the objective of the iterate the step started from.
    ``movable`` (n,) bool: only these inputs (rows of ``start``) move; the rest stay fixed.
    :func:`descend_batch` with one problem.
    """
    report = None if on_step is None else (lambda values: on_step(values.item()))
    done = descend_batch(lambda x: objective(x[0]).reshape(1), start.unsqueeze(0), iterations=iterations, lr=lr,
                         signed=signed, lr_decay=lr_decay, bounds=bounds, deadline=deadline, on_step=report,
                         movable=movable)
    return Descent(done.inputs[0], done.objectives.item(), done.steps, done.stopped)


def descend_batch(objective: Callable[[torch.Tensor], torch.Tensor], start: torch.Tensor, *, iterations: int,
                  lr: float, signed: bool = True, lr_decay: bool = True,
                  bounds: tuple[torch.Tensor, torch.Tensor] | None = None, deadline: float | None = None,
                  on_step: Callable[[torch.Tensor], None] | None = None,
                  movable: torch.Tensor | None = None, problem_dims: int = 1) -> BatchDescent:
    """:func:`descend_inputs` for independent problems side by side: ``objective(x)`` returns one
    value per problem, shape P = the first ``problem_dims`` dims of ``start`` (e.g. (J, R) for J jobs
    × R restarts of (n, C, H, W) inputs each); each problem keeps its own best iterate. Adam is elementwise, so this
    is the same descent as one per problem. ``on_step(values)`` gets the (P) objectives (a tensor:
    reading it synchronises a GPU); ``movable`` (n,) applies to every problem.
    """
    lo, hi = bounds if bounds is not None else (None, None)

    def project(t: torch.Tensor) -> torch.Tensor:
        return t if lo is None else torch.maximum(torch.minimum(t, hi), lo)

    x = project(start.detach().clone()).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    milestones = [math.floor(iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)] if lr_decay else []
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
    best_x = x.detach().clone()
    best = torch.full(start.shape[:problem_dims], math.inf, device=start.device)
    steps, stopped = 0, False
    item_dims = [1] * (start.dim() - problem_dims)

    def keep_best(values: torch.Tensor, at: torch.Tensor) -> None:
        nonlocal best, best_x
        better = values < best
        best = torch.where(better, values, best)
        best_x = torch.where(better.view(*better.shape, *item_dims), at, best_x)

    for _ in range(iterations):
        if deadline is not None and time.monotonic() > deadline:
            stopped = True
            break
        values = objective(x)
        (grad,) = torch.autograd.grad(values.sum(), x)
        values = values.detach()
        keep_best(values, x.detach())
        if movable is not None:
            grad = grad * movable.view(-1, *item_dims[1:]).to(grad)
        x.grad = grad.sign() if signed else grad
        opt.step()
        sched.step()
        with torch.no_grad():
            x.copy_(project(x))
        steps += 1
        if on_step is not None:
            on_step(values)
    if not stopped:  # score the final iterate too (the loop scored each iterate before its step;
        # no torch.no_grad: the unrolled objective differentiates inside)
        keep_best(objective(x.detach()).detach(), x.detach())
    return BatchDescent(best_x, best, steps, stopped)
