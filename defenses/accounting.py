"""Privacy accounting for the DP defenses: ε at the defense's δ, per client, cumulative over
rounds, by composition in RDP space with Opacus' RDP analysis (``opacus.accountants.analysis.rdp``,
the functions behind ``opacus.accountants.RDPAccountant``; same orders).

Use (the server, once per round):

    params = resolve_defense_params(scenario.defense, scenario.source)
    mech = privacy_mechanism(params, scenario.training, num_examples, num_steps, scenario.federation)
    if mech is not None:
        if mech.scope == "federation":
            ledger.record(None, mech)           # dp_central: once per round, every client
        else:
            ledger.record(client_id, mech)      # dp_sgd / dp_local: each participating client
    ledger.epsilon(client_id), ledger.worst_epsilon()

What each mechanism is, and the assumptions:

- ``dp_sgd`` — example-level DP of a client's local data set against everything it uploads
  (the server included). One round = ``num_steps`` steps of the sampled Gaussian mechanism with
  noise multiplier σ and sample rate q = B / n (n = the client's examples). The client's
  batches are shuffled fixed-size batches, accounted as Poisson sampling with rate B/n, as is
  common practice (Opacus, TF Privacy); the exact guarantee for shuffling differs. Neighbouring
  data sets: add/remove one example. The server's choice of clients gives no amplification
  against the server (it knows whom it sampled): only rounds the client took part in count.
- ``dp_local`` — client-level DP of the client's whole data set against the server. One
  participation = one Gaussian mechanism (sample rate 1 from the client's view) with noise
  multiplier σ: Δ clipped to C, noise σ·C, sensitivity C (add/remove-one convention, as in
  DP-FedAvg; under replace-one the sensitivity is 2C, i.e. noise multiplier σ/2).
- ``dp_central`` — client-level DP of the *released global models* against their users, not
  against this server (its tap sees every raw update). One round = one Gaussian mechanism on
  the sum of clipped updates, noise multiplier σ, sample rate q = clients_per_round/num_clients
  (the server samples a fixed number without replacement; accounted as Poisson with that rate,
  as DP-FedAvg does), and it counts for every client every round (scope "federation").
  ``amplification = false`` accounts it at q = 1, as Flower's own fixed-clipping accountant
  requires (no amplification).

σ = 0 gives ε = inf. For very small σ (ε in the hundreds) the optimal RDP order is Opacus'
smallest (1.1) and the reported ε is a loose upper bound; Opacus' warning about it is silenced.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from defenses.dp_central import DpCentralParams
from defenses.dp_local import DpLocalParams
from defenses.dp_sgd import DpSgdParams
from fedsim.scenario import FederationSpec, TrainingSpec


@lru_cache(maxsize=1)
def rdp_orders() -> tuple[float, ...]:
    """Opacus' RDP orders (``RDPAccountant.DEFAULT_ALPHAS``). Opacus is imported here, on first
    use, not with this module: it takes a second to import and most runs account nothing."""
    from opacus.accountants import RDPAccountant

    return tuple(RDPAccountant.DEFAULT_ALPHAS)


@dataclass(frozen=True)
class Mechanism:
    """``steps`` compositions of the sampled Gaussian mechanism (noise multiplier, sample rate),
    reported at ``delta``. ``scope``: "client" (charged to the client that ran it) or
    "federation" (one per round, charged to every client)."""

    defense: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    scope: str = "client"

    def rdp(self) -> np.ndarray:
        return _rdp(self.noise_multiplier, self.sample_rate, self.steps)

    def epsilon(self) -> float:
        """ε of this mechanism alone at ``delta``."""
        return _epsilon(self.rdp(), self.delta)


@lru_cache(maxsize=256)
def _rdp(noise_multiplier: float, sample_rate: float, steps: int) -> np.ndarray:
    if steps == 0 or sample_rate == 0.0:
        return np.zeros(len(rdp_orders()))
    from opacus.accountants.analysis import rdp as rdp_analysis

    return np.asarray(rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=steps,
                                               orders=list(rdp_orders())), dtype=float)


def _epsilon(rdp: np.ndarray, delta: float) -> float:
    if not np.any(rdp):
        return 0.0
    if not np.all(np.isfinite(rdp)):
        return math.inf
    from opacus.accountants.analysis import rdp as rdp_analysis

    with warnings.catch_warnings():  # "optimal order is the smallest alpha": tiny σ, see the docstring
        warnings.simplefilter("ignore", UserWarning)
        eps, _ = rdp_analysis.get_privacy_spent(orders=list(rdp_orders()), rdp=rdp, delta=delta)
    return float(eps)


def privacy_mechanism(params: object, training: TrainingSpec, num_examples: int, num_steps: int,
                      federation: FederationSpec) -> Mechanism | None:
    """The per-round mechanism of a resolved defense parameter object
    (``defenses.registry.resolve_defense_params``); None for defenses without a guarantee.

    ``num_examples``: the client's local data set size; ``num_steps``: its optimizer steps this
    round (both reported by the client: metrics ``num-examples`` and ``steps``)."""
    if isinstance(params, DpSgdParams):
        rate = min(1.0, training.batch_size / max(num_examples, 1))
        return Mechanism("dp_sgd", params.noise_multiplier, rate, num_steps, params.delta)
    if isinstance(params, DpLocalParams):
        return Mechanism("dp_local", params.noise_multiplier, 1.0, 1, params.delta)
    if isinstance(params, DpCentralParams):
        rate = federation.clients_per_round / federation.num_clients if params.amplification else 1.0
        return Mechanism("dp_central", params.noise_multiplier, rate, 1, params.delta, scope="federation")
    return None


class PrivacyLedger:
    """Cumulative privacy loss per client, composed in RDP space (not by adding ε)."""

    def __init__(self) -> None:
        self._client_rdp: dict[int, np.ndarray] = {}
        self._federation_rdp = np.zeros(len(rdp_orders()))
        self._delta: float | None = None

    def record(self, client_id: int | None, mechanism: Mechanism) -> None:
        """Charge ``mechanism`` to ``client_id`` (scope "client") or to every client (scope
        "federation"; ``client_id`` is ignored)."""
        if self._delta is not None and mechanism.delta != self._delta:
            raise ValueError(f"delta {mechanism.delta} differs from the ledger's {self._delta}")
        self._delta = mechanism.delta
        if mechanism.scope == "federation":
            self._federation_rdp = self._federation_rdp + mechanism.rdp()
            return
        if client_id is None:
            raise ValueError("a client-scope mechanism needs a client id")
        self._client_rdp[client_id] = self._client_rdp.get(client_id, np.zeros(len(rdp_orders()))) + mechanism.rdp()

    def clients(self) -> list[int]:
        return sorted(self._client_rdp)

    def epsilon(self, client_id: int) -> float:
        """ε of everything charged to ``client_id`` so far, at the recorded δ (0 if nothing)."""
        if self._delta is None:
            return 0.0
        rdp = self._client_rdp.get(client_id, np.zeros(len(rdp_orders()))) + self._federation_rdp
        return _epsilon(rdp, self._delta)

    def worst_epsilon(self) -> float:
        """The largest ε over the clients charged so far (the federation-wide ε if only
        federation-scope mechanisms were recorded)."""
        if self._delta is None:
            return 0.0
        if not self._client_rdp:
            return _epsilon(self._federation_rdp, self._delta)
        return max(self.epsilon(c) for c in self._client_rdp)

    @property
    def delta(self) -> float | None:
        return self._delta

    def state_dict(self) -> dict[str, object]:
        """The ledger as tensors and numbers (a run's checkpoint; ``torch.load(weights_only=True)``)."""
        clients = sorted(self._client_rdp)
        return {"clients": torch.tensor(clients, dtype=torch.int64),
                "client_rdp": torch.tensor(np.array([self._client_rdp[c] for c in clients]).reshape(len(clients),
                                                                                                 len(rdp_orders()))),
                "federation_rdp": torch.tensor(self._federation_rdp),
                "delta": -1.0 if self._delta is None else self._delta}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore what :meth:`state_dict` saved."""
        rdp = state["client_rdp"].numpy()
        self._client_rdp = {int(c): rdp[i].copy() for i, c in enumerate(state["clients"].tolist())}
        self._federation_rdp = state["federation_rdp"].numpy().copy()
        self._delta = None if state["delta"] < 0 else float(state["delta"])
