"""Central differential privacy (DP-FedAvg with fixed clipping, McMahan et al. ICLR'18): the
*server* clips each client update to L2 norm C, averages, and adds Gaussian noise of std
σ·C / clients_per_round to the average (Flower's
``DifferentialPrivacyServerSideFixedClipping(strategy, noise_multiplier, clipping_norm,
num_sampled_clients)``; ``num_sampled_clients`` is ``federation.clients_per_round``).

On the client this defense is the identity; the server calls ``on_server_update`` (clip) on
every received Δ and ``on_aggregate`` (noise) on their average, after its tap has seen the raw
updates. It protects the released global model from its users, not a client from this
server.

Not Flower's ``DifferentialPrivacyServerSideFixedClipping`` itself, for three reasons: it
clips every array of a reply in place with a float factor, which fails on the integer
``num_batches_tracked`` buffers of BatchNorm models (and adds rounded noise to them); its
noise comes from NumPy's unseeded global generator (runs would not be reproducible); and it
clips the replies before the wrapped strategy sees them, where the tap must see them raw. The
mechanism is the same: flat clipping of each update to C (parameters and BN running
statistics together), Gaussian noise of std σ·C / num_sampled_clients on the average.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from defenses.base import Defense
from defenses.tensors import clip_to_norm, gaussian_like, with_noise


@dataclass(frozen=True)
class DpCentralParams:
    clip_norm: float = field(default=1.0, metadata={"gt": 0.0, "doc": "C: the server clips each update to this L2 norm"})
    noise_multiplier: float = field(default=1.0, metadata={"min": 0.0, "doc": "σ: noise std on the average is σ·C / clients_per_round"})
    delta: float = field(default=1e-5, metadata={"gt": 0.0, "lt": 1.0, "doc": "δ at which the accountant reports ε"})
    amplification: bool = field(default=True, metadata={"doc": "account client sampling as Poisson with rate clients_per_round/num_clients (false: no amplification, as Flower's own fixed-clipping accountant requires)"})


class DpCentral(Defense):
    """Identity on the client; the server applies the mechanism."""

    name = "dp_central"
    acts_on_server = True
    params: DpCentralParams

    def on_server_update(self, update: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return clip_to_norm(update, self.params.clip_norm)

    def on_aggregate(self, update: dict[str, torch.Tensor], num_sampled: int) -> dict[str, torch.Tensor]:
        std = self.params.noise_multiplier * self.params.clip_norm / max(num_sampled, 1)
        return with_noise(update, lambda v: gaussian_like(v, std, self.generator))
