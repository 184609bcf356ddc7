"""The registered attack ``"spear"``: the layer to invert in an observed update, SPEAR on it,
then labels and (optionally) images from its result."""
from __future__ import annotations

import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from adversary.maths.matching import BN_WEIGHT, TV_WEIGHT, num_examples
from adversary.observation import Observation, Reconstruction, global_model
from adversary.attacks import geiping
from adversary.attacks.base import Attack, AttackContext
from adversary.maths.unroll import observed_gradient
from adversary.attacks.spear.guide import Guide
from adversary.attacks.spear.images import fit_images_to_features, refine_images
from adversary.attacks.spear.inversion import spear_invert_linear
from adversary.attacks.spear.labels import slot_labels
from adversary.attacks.spear.problem import SpearParams, SpearResult
from adversary.attacks.spear.replay import replay_checker
from fedsim.models import captured_inputs, captured_outputs


def find_linear(model: nn.Module, name: str = "") -> tuple[str, nn.Linear]:
    """The linear layer called ``name`` (module path), or the first ``nn.Linear`` of the model."""
    for mod_name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and (not name or mod_name == name):
            return mod_name, mod
    raise ValueError(f"no linear layer {name!r} in the model" if name else "the model has no linear layer")


@contextmanager
def _probing(model: nn.Module) -> Iterator[None]:
    """The block runs ``model`` in eval mode without gradients; its mode is restored on leaving."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def next_linear(model: nn.Module, layer: nn.Module, shape: tuple[int, int, int]) -> str | None:
    """Module name of the ``nn.Linear`` whose input is exactly ReLU(``layer``'s output) on a probe
    batch (the MLP's next layer), or None: SPEAR's next-layer test needs ReLU(Z) to feed it alone."""
    probe = torch.randn(2, *shape, generator=torch.Generator().manual_seed(1))
    with _probing(model), ExitStack() as hooks:
        seen = {key: hooks.enter_context(captured_inputs(mod, detach=True))
                for key, mod in model.named_modules() if isinstance(mod, nn.Linear) and mod is not layer}
        outs = hooks.enter_context(captured_outputs(layer, detach=True))
        model(probe)
    if not outs:
        return None
    relu = torch.relu(outs[0])
    return next((key for key, inputs in seen.items()
                 if inputs and inputs[-1].shape == relu.shape and torch.equal(inputs[-1], relu)), None)


def _layer_role(model: nn.Module, layer: nn.Module, shape: tuple[int, int, int]) -> tuple[bool, bool]:
    """(input is the flattened image itself, output is the model's output) for ``layer``."""
    probe = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    with _probing(model), captured_inputs(layer, detach=True) as inputs, \
            captured_outputs(layer, detach=True) as outputs:
        logits = model(probe)
    if not outputs:
        return False, False
    inp, out = inputs[0], outputs[0]
    image = inp.shape == (2, probe[0].numel()) and torch.equal(inp, probe.flatten(1))
    return image, out.shape == logits.shape and torch.equal(out, logits)


@dataclass
class LayerInversion:
    """:func:`invert_observation`'s answer: the attacked layer, SPEAR's result and whether the
    layer's input is the (flattened) image; otherwise ``result.X`` holds feature vectors."""

    layer: str
    result: SpearResult | None
    image_space: bool
    gradient: torch.Tensor | None  # the ∂L/∂W estimate that was inverted
    model: nn.Module  # the architecture holding θ_t
    status: str = ""
    guide: dict = field(default_factory=dict)  # where the guide came from, its cost


def guide_images(obs: Observation, params: SpearParams, ctx: AttackContext) -> tuple[torch.Tensor | None, dict]:
    """The approximate batch (b', C, H, W) that ``params.guide`` names, normalised, and a note
    on it (source, seconds, Geiping steps): a Geiping run on ``obs`` itself (its steps count
    against the deadline), or ``obs.prior``; (None, note) for "none" or a missing prior."""
    if params.guide == "none":
        return None, {}
    if params.guide == "previous":
        if obs.prior is None:
            return None, {"guide": "previous", "guide_status": "no earlier reconstruction of this client"}
        return obs.prior, {"guide": "previous", "guide_examples": len(obs.prior), "guide_round": obs.prior_round}
    started = time.monotonic()
    rec = geiping.run(obs, geiping.GeipingParams(iterations=params.guide_iterations), ctx)
    return rec.inputs, {"guide": "geiping", "guide_iterations": rec.iterations,
                        "guide_seconds": round(time.monotonic() - started, 3)}


def layer_inputs(model: nn.Module, layer: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The input (b', n) of ``layer`` when ``model`` (train mode, the whole batch, as the client
    ran it) sees ``images`` (b', C, H, W)."""
    was_training = model.training
    model.train()
    try:
        with captured_inputs(layer, detach=True) as captured, torch.no_grad():
            model(images.float())
    finally:
        model.train(was_training)
    return captured[0].flatten(1)


def invert_observation(obs: Observation, params: SpearParams, ctx: AttackContext) -> LayerInversion:
    """Run SPEAR on the layer ``params.layer`` (default: the first linear layer) of ``obs``,
    guided by ``params.guide`` (:func:`guide_images`) when it names one."""
    shape = tuple(obs.domain.shape)
    model = global_model(obs)
    name, layer = find_linear(model, params.layer)
    image_space, is_output = _layer_role(model, layer, shape)
    if is_output:
        return LayerInversion(name, None, image_space, None, model,
                              "failed: the layer is the output layer (no ReLU after it); choose a hidden layer")
    if layer.bias is None:
        return LayerInversion(name, None, image_space, None, model,
                              "failed: the layer has no bias (SPEAR fixes the scales from the bias gradient)")
    weight = obs.global_state[f"{name}.weight"]
    bias = obs.global_state[f"{name}.bias"]
    images, note = guide_images(obs, params, ctx)
    guide = None if images is None else Guide(layer_inputs(model, layer, images), weight, bias)

    def progress(found: int, b: int, samples: int) -> None:
        ctx.report(found, b, float(samples))  # the bar: directions found / b

    # Σ_j a_j g_j of the layer; for FedSGD the gradient itself up to a common factor, which X ignores
    grads = observed_gradient(obs, [f"{name}.weight", f"{name}.bias"])
    gw, gb = grads[f"{name}.weight"], grads[f"{name}.bias"]
    one_step = obs.num_steps <= 1  # the ReLU checks need the weights the gradient was taken at
    # several full-batch steps on the image-fed layer: replay the local training instead
    replay = not one_step and image_space and obs.training.batch_size >= obs.num_distinct_examples
    following = next_linear(model, layer, shape) if one_step else None  # its weights moved after step one
    res = spear_invert_linear(gw, gb, weight=weight if one_step else None, bias=bias if one_step else None,
                              checker=replay_checker(obs, model, name) if replay else None, params=params,
                              device=ctx.device, seed=ctx.seed, deadline=ctx.deadline, guide=guide,
                              progress=progress,
                              next_weight=None if following is None else obs.global_state[f"{following}.weight"])
    return LayerInversion(name, res, image_space, gw, model, res.status, note)


def run(obs: Observation, params: SpearParams, ctx: AttackContext) -> Reconstruction:
    """SPEAR on the observed update, then (optionally) images from its result.

    For a layer fed by the image (the MLP's first layer) the recovered inputs are the images
    (b, C, H, W), normalised. For a deeper layer SPEAR recovers that layer's input features
    (``extras``: count and dimension; :func:`invert_observation` returns them); with
    ``feature_fit_iterations`` images are fitted to them. ``refine_iterations`` then descends
    Geiping's unrolled update-matching objective from those images
    (``adversary.attacks.spear.images``). Labels: SPEAR needs none; each recovered example's label is
    read from its own ∂L/∂Z through the layers after the attacked one."""
    shape = tuple(obs.domain.shape)
    inv = invert_observation(obs, params, ctx)
    extras: dict = {"layer": inv.layer, "num_steps": obs.num_steps, "feature_space": not inv.image_space,
                    "expected_batch_size": obs.num_distinct_examples}
    inputs = torch.empty(0, *shape)
    res = inv.result
    if res is None:
        extras["status"] = inv.status
        return Reconstruction(inputs, None, 0, float("nan"), extras)
    extras.update(res.summary())
    extras.update(inv.guide)
    if res.X is None:  # not even an inconsistent batch of b directions
        return Reconstruction(inputs, None, res.samples, float("nan"), extras)
    G = inv.gradient.double()
    objective = float((G - res.delta.T @ res.X).norm() / G.norm().clamp_min(1e-300))
    layer = inv.model.get_submodule(inv.layer)
    labels = slot_labels(inv.model, layer, res.X, res.delta, shape)
    iterations = res.samples
    if inv.image_space:
        inputs = res.X.reshape(-1, *shape).float()
    else:
        extras["features_recovered"] = int(res.X.shape[0])
        extras["feature_dim"] = int(res.X.shape[1])
        if params.feature_fit_iterations:
            start = torch.randn((len(res.X), *shape), generator=torch.Generator().manual_seed(ctx.seed))
            fit = fit_images_to_features(obs, inv.model, layer, res.X, start, iterations=params.feature_fit_iterations,
                                         lr=params.fit_lr, tv_weight=TV_WEIGHT, deadline=ctx.deadline)
            inputs, iterations = fit.inputs, iterations + fit.steps
            extras["feature_fit_objective"] = fit.objective
    # fitted images all move; recovered images only where the check flagged them (an exact or
    # consistent example stays as it is). An unchecked batch (shuffled mini-batches) is left
    # alone: the attacker's batch schedule would put its exact images in the wrong steps, and
    # the descent then trades them away (measured: 155 dB -> 18 dB).
    movable = torch.zeros(len(inputs), dtype=torch.bool) if inv.image_space else torch.ones(len(inputs), dtype=torch.bool)
    if inv.image_space:
        movable[res.inconsistent or []] = True
    if params.refine_iterations and inv.image_space and res.inconsistent is None:
        extras["refine"] = "skipped: nothing checked the batch (mini-batch steps: the schedule is unknown)"
    elif params.refine_iterations and len(inputs) and movable.any():
        if num_examples(obs) != len(inputs):
            extras["refine"] = f"skipped: SPEAR found {len(inputs)} examples, the update reports {num_examples(obs)}"
        else:
            refined = refine_images(obs, inputs, labels, iterations=params.refine_iterations, lr=params.refine_lr,
                                    tv_weight=params.refine_tv_weight, bn_weight=BN_WEIGHT,
                                    device=ctx.device, movable=movable, deadline=ctx.deadline)
            inputs, iterations = refined.inputs.cpu(), iterations + refined.steps
            extras["refine"] = f"{int(movable.sum())} images, {refined.steps} steps, objective {refined.objective:.4g}"
    return Reconstruction(inputs, labels if len(inputs) else None, iterations, objective, extras)


ATTACK = Attack("spear", SpearParams, run, wants_prior=lambda params: params.guide == "previous")
