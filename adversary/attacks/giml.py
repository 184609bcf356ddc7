"""GIML's attack (Jeon et al., NeurIPS'21): GIAS with the generator the server meta-learned from
the updates it observed before this one.

The learning is stateful — it spans rounds and clients — so it runs in the run's attack sink
(:class:`adversary.runtime.giml.GimlSink`), which hands each job the checkpoint of the generator
learned so far in ``generator``. The attack itself is GIAS on that checkpoint, a function of the
observation and its parameters like every attack. ``generator`` in the scenario is where the
learning *starts*: ``"untrained"`` (the default) or a checkpoint (e.g. a wrong-domain prior).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from adversary.attacks.base import Attack
from adversary.attacks.gias import GiasParams, run
from adversary.priors.giml import GimlSettings

_META = GimlSettings()


@dataclass(frozen=True)
class GimlParams(GiasParams):
    """GIAS's parameters (the attack) plus the meta-learning's (per observed update). TV weight
    and parameter lr keep the values the GIML curve (benchmarks/results/giml_cpu.json) was
    measured with; GIAS's own defaults (Geiping's TV, lr 3e-4) were measured with the auxiliary
    prior only."""

    tv_weight: float = field(default=_META.tv_weight, metadata={"min": 0.0})
    parameter_lr: float = field(default=1e-4, metadata={"gt": 0.0})

    meta_latent_iterations: int = field(default=_META.latent_iterations,
                                        metadata={"min": 1, "doc": "latent-search steps per observed update"})
    inner_steps: int = field(default=_META.inner_steps, metadata={"min": 1, "doc": "generator steps per update"})
    inner_lr: float = field(default=_META.inner_lr, metadata={"gt": 0.0})
    meta_lr: float = field(default=_META.meta_lr, metadata={"gt": 0.0, "max": 1.0, "doc": "Reptile step size"})

    def settings(self) -> GimlSettings:
        """The meta-learning settings (the matching objective shared with the attack)."""
        return GimlSettings(latent_iterations=self.meta_latent_iterations, latent_lr=self.latent_lr,
                            inner_steps=self.inner_steps, inner_lr=self.inner_lr, meta_lr=self.meta_lr,
                            tv_weight=self.tv_weight, bn_weight=self.bn_weight, multistep=self.multistep)


ATTACK = Attack("giml", GimlParams, run)
