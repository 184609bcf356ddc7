"""Central differential privacy (DP-FedAvg with fixed clipping, McMahan et al. ICLR'18): the
*server* clips each client update to L2 norm C, averages, and adds Gaussian noise of std
σ·C / clients_per_round to the average (Flower's
``DifferentialPrivacyServerSideFixedClipping(strategy, noise_multiplier, clipping_norm,
num_sampled_clients)``; ``num_sampled_clients`` is ``federation.clients_per_round``).

On the client this defense is the identity: ``acts_on_server`` tells the server to wire the
strategy. It protects the released global model from its users, not a client from this
server: the curious server's tap sees every raw update before it clips and noises the
aggregate.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from defenses.base import Defense


@dataclass(frozen=True)
class DpCentralParams:
    clip_norm: float = field(default=1.0, metadata={"gt": 0.0, "doc": "C: the server clips each update to this L2 norm"})
    noise_multiplier: float = field(default=1.0, metadata={"min": 0.0, "doc": "σ: noise std on the average is σ·C / clients_per_round"})
    delta: float = field(default=1e-5, metadata={"gt": 0.0, "doc": "δ at which the accountant reports ε"})
    amplification: bool = field(default=True, metadata={"doc": "account client sampling as Poisson with rate clients_per_round/num_clients (false: no amplification, as Flower's own fixed-clipping accountant requires)"})

    def check(self) -> tuple[str, str] | None:
        if self.delta >= 1.0:
            return "delta", f"got {self.delta!r}, must be < 1"
        return None


class DpCentral(Defense):
    """Identity on the client; the server applies the mechanism."""

    name = "dp_central"
    acts_on_server = True
    params: DpCentralParams
