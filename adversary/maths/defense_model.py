"""The attacker's model of the defense: the Bayes-optimal matching objective (Balunović et al.,
"Bayesian Framework for Gradient Leakage", ICLR'22).

An attacker that knows the defense and its parameters (``attack.knows_defense = true``, so
``Observation.defense`` is set) replaces a heuristic distance by the defense's negative
log-likelihood of the observed update Δ_obs given the update Δ_pred the dummies would produce
(:class:`adversary.maths.matching.Matcher` with ``loss = "bayes"``). The noise lives on Δ, so
the comparison is in Δ units (not gradient units). Per defense, with constants dropped:

- ``gaussian`` (N(0, s²) on every floating entry): Σ (Δ_obs − Δ_pred)² / (2 s²);
- ``laplace`` (Laplace(0, b) on every floating entry): Σ |Δ_obs − Δ_pred| / b;
- ``dp_local`` (Δ clipped to L2 norm C over every floating entry, then N(0, (σ·C)²)): Δ_pred is
  clipped the same way first, differentiably, Δ_pred·min(1, C/‖Δ_pred‖) with the norm over every
  predicted floating entry (parameters and BatchNorm running statistics, whether compared or
  not), then the Gaussian NLL with std σ·C;
- ``topk`` (the p % largest |Δ| of each tensor kept, the rest zeroed, then N(0, noise_std²) on
  the kept entries): the kept entries (non-zero in the observed update) by the Gaussian NLL of
  std ``noise_std``; a pruned entry says only that its |Δ| was below the smallest kept one of
  its tensor, τ, so it costs max(0, |Δ_pred| − τ)² / (2 noise_std²) (a soft version of that
  constraint; measured on the defenses benchmark's unrolled 3-step updates, Geiping 500
  iterations: 9.7 dB comparing the kept entries alone, 11.1 dB with the pruned ones' term).

Normalisation: every NLL is divided by the number of entries it covers (a mean per entry), so its
size does not grow with the model and Geiping's TV weight keeps a comparable meaning (in
likelihood terms the prior is then weighted per entry rather than per update).

Noise-free mechanisms (``topk`` with ``noise_std = 0``, or a zero std/scale/σ): the likelihood
degenerates to the constraint Δ_pred = Δ_obs on the compared entries; every positive scale has the
same minimiser, and the one used is the observed compared entries' RMS (Gaussian) or mean
absolute value (Laplace), which puts the objective on the scale of a relative L2 (L1) distance.

Which entries are compared is the matcher's choice: the parameters, plus the BatchNorm running
statistics when it compares them (``bn_weight > 0``); they share one likelihood, no separate BN
term. :func:`check_bayes_loss` is the scenario-level check that the attacker may use it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from defenses.registry import resolve_defense_params
from fedsim.config import ScenarioError
from fedsim.scenario import DefenseSpec, Scenario

#: the name of the Bayes-optimal matching loss in the attacks' ``loss`` choices
BAYES_LOSS = "bayes"
#: the defenses the attacker has a likelihood for
BAYES_DEFENSES = ("gaussian", "laplace", "dp_local", "topk")
NOISE_LAWS = ("gaussian", "laplace")


@dataclass(frozen=True)
class DefenseModel:
    """What the attacker knows of a defense's mechanism on Δ.

    ``noise``: the law of the noise on each compared entry (``gaussian`` or ``laplace``);
    ``scale``: its std (Gaussian) or scale b (Laplace), 0 for none; ``clip_norm``: Δ is clipped to
    this global L2 norm before the noise (``dp_local``); ``masked``: only the entries the observed
    update kept are compared (``topk``).
    """

    defense: str
    noise: str
    scale: float
    clip_norm: float | None = None
    masked: bool = False

    def __post_init__(self) -> None:
        if self.noise not in NOISE_LAWS:
            raise ValueError(f"unknown noise law {self.noise!r}; choose one of {NOISE_LAWS}")
        if self.scale < 0:
            raise ValueError(f"noise scale must be >= 0, got {self.scale}")

    def likelihood(self, observed: Sequence[torch.Tensor], names: Sequence[str]) -> UpdateLikelihood:
        """The objective against the observed tensors ``observed`` (state keys ``names``)."""
        return UpdateLikelihood(self, observed, names)


def defense_model(spec: DefenseSpec | None, source: str = "<observation>") -> DefenseModel:
    """The attacker's model of the defense ``spec`` (``Observation.defense``); ValueError when the
    attacker does not know the defense or has no likelihood for it."""
    if spec is None:
        raise ValueError(f"loss {BAYES_LOSS!r} needs the defense (attack.knows_defense = true)")
    if spec.name not in BAYES_DEFENSES:
        raise ValueError(f"loss {BAYES_LOSS!r} has no model of defense {spec.name!r}; "
                         f"supported: {', '.join(BAYES_DEFENSES)}")
    params = resolve_defense_params(spec, source)
    if spec.name == "gaussian":
        return DefenseModel("gaussian", "gaussian", params.std)
    if spec.name == "laplace":
        return DefenseModel("laplace", "laplace", params.scale)
    if spec.name == "dp_local":
        return DefenseModel("dp_local", "gaussian", params.noise_multiplier * params.clip_norm,
                            clip_norm=params.clip_norm)
    return DefenseModel("topk", "gaussian", params.noise_std, masked=True)


def check_bayes_loss(scenario: Scenario, attack_params: Mapping[str, object]) -> None:
    """Scenario check for run preparation: every planned attack whose ``loss`` is ``bayes`` needs
    ``attack.knows_defense = true`` and a defense listed in :data:`BAYES_DEFENSES`.
    ``attack_params``: attack name -> its validated parameters
    (``adversary.runtime.registry.resolve_attack_params``). Raises ScenarioError naming the file
    and ``attack.<name>.loss``."""
    for name, params in attack_params.items():
        if getattr(params, "loss", None) != BAYES_LOSS:
            continue
        key = f"attack.{name}.loss"
        if not scenario.attack.knows_defense:
            raise ScenarioError(scenario.source, key, f"{BAYES_LOSS!r} is the defense's likelihood and needs "
                                                      f"attack.knows_defense = true")
        if scenario.defense.name not in BAYES_DEFENSES:
            raise ScenarioError(scenario.source, key,
                                f"{BAYES_LOSS!r} has no model of defense.name = {scenario.defense.name!r}; "
                                f"supported: {', '.join(BAYES_DEFENSES)}")


# --------------------------------------------------------------------------- the likelihoods

def _entries(pred: Sequence[torch.Tensor], target: Sequence[torch.Tensor],
             masks: Sequence[torch.Tensor] | None) -> tuple[list[torch.Tensor], int]:
    if len(pred) != len(target) or not pred:
        raise ValueError(f"need equally many tensors, got {len(pred)} and {len(target)}")
    if masks is None:
        return [t - p for p, t in zip(pred, target)], sum(t.numel() for t in target)
    diffs = [(t - p)[m] for p, t, m in zip(pred, target, masks)]
    return diffs, sum(int(m.sum()) for m in masks)


def gaussian_nll(pred: Sequence[torch.Tensor], target: Sequence[torch.Tensor], std: float,
                 masks: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """Σ (t − p)² / (2 std²) over the compared entries (all, or where ``masks`` is true), divided
    by their number."""
    diffs, count = _entries(pred, target, masks)
    total = sum(d.pow(2).sum() for d in diffs)
    return total / (2.0 * std ** 2 * max(count, 1))


def laplace_nll(pred: Sequence[torch.Tensor], target: Sequence[torch.Tensor], scale: float,
                masks: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """Σ |t − p| / scale over the compared entries, divided by their number."""
    diffs, count = _entries(pred, target, masks)
    total = sum(d.abs().sum() for d in diffs)
    return total / (scale * max(count, 1))


def clip_update(update: Mapping[str, torch.Tensor], clip_norm: float) -> dict[str, torch.Tensor]:
    """``update`` scaled by min(1, C/‖update‖), the norm over every floating entry (as
    ``defenses.tensors.clip_to_norm``), differentiably; integer entries untouched."""
    floats = [v for v in update.values() if v.is_floating_point()]
    norm = torch.sqrt(sum(v.pow(2).sum() for v in floats).clamp_min(1e-30))
    factor = torch.clamp(clip_norm / norm, max=1.0)
    return {k: v * factor if v.is_floating_point() else v for k, v in update.items()}


class UpdateLikelihood:
    """The defense's NLL of fixed observed tensors, as a function of the predicted update.

    Built once per attack (the masks and, for a noise-free mechanism, the nominal scale depend on
    the observation only); called with the full predicted update ``{state key: Δ}`` (every
    parameter, plus the BN running statistics when the matcher predicts them), of which the
    entries ``names`` are compared.
    """

    def __init__(self, model: DefenseModel, observed: Sequence[torch.Tensor], names: Sequence[str]):
        if len(observed) != len(names) or not names:
            raise ValueError(f"need one observed tensor per name, got {len(observed)} and {len(names)}")
        self.model = model
        self.names = list(names)
        self.observed = [o.detach() for o in observed]
        self.masks = [o != 0 for o in self.observed] if model.masked else None
        self.count = (sum(int(m.sum()) for m in self.masks) if self.masks is not None
                      else sum(o.numel() for o in self.observed))
        # pruning: the smallest kept |Δ| of each tensor bounds its pruned entries
        self.thresholds = ([o[m].abs().min() if bool(m.any()) else o.new_zeros(()) for o, m in
                            zip(self.observed, self.masks)] if self.masks is not None else None)
        self.scale = model.scale if model.scale > 0 else self._nominal_scale()

    def _nominal_scale(self) -> float:
        kept = torch.cat([(o[m] if self.masks is not None else o).reshape(-1).double()
                          for o, m in zip(self.observed, self.masks or [None] * len(self.observed))])
        value = float(kept.pow(2).mean().sqrt()) if self.model.noise == "gaussian" else float(kept.abs().mean())
        return value if value > 0 else 1.0

    def __call__(self, predicted: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if self.model.clip_norm is not None:
            predicted = clip_update(predicted, self.model.clip_norm)
        pred = [predicted[k] for k in self.names]
        if self.model.noise == "gaussian":
            value = gaussian_nll(pred, self.observed, self.scale, self.masks)
        else:
            value = laplace_nll(pred, self.observed, self.scale, self.masks)
        if self.masks is None:
            return value
        pruned = sum(int((~m).sum()) for m in self.masks)
        excess = sum((p[~m].abs() - tau).clamp_min(0).pow(2).sum() for p, m, tau in zip(pred, self.masks, self.thresholds))
        total = self.count + pruned
        return value * (self.count / total) + excess / (2.0 * self.scale ** 2 * total)
