"""The run's privacy accounting on the server: every round, the DP mechanism each successful
client ran (``defenses.accounting.privacy_mechanism``: dp_sgd, dp_local) or the server's own
(dp_central, once per round, charged to every client) goes into one ``PrivacyLedger``; the
round reports ε of its own mechanisms and the cumulative worst-case ε over clients, both at
the defense's δ (``rounds.jsonl``: ``epsilon_round``, ``epsilon``)."""
from __future__ import annotations

from defenses.accounting import PrivacyLedger, privacy_mechanism
from defenses.registry import resolve_defense_params
from fedsim.scenario import Scenario, TrainingSpec


class RunPrivacy:
    """Composes the scenario's DP mechanisms over the rounds; inert for defenses without one."""

    def __init__(self, scenario: Scenario):
        self.scenario = scenario
        self.params = resolve_defense_params(scenario.defense, scenario.source)
        probe = privacy_mechanism(self.params, scenario.training, 1, 1, scenario.federation)
        # the defense has a DP guarantee to account (no ledger, and no Opacus import, otherwise)
        self.ledger = PrivacyLedger() if probe is not None else None

    def state_dict(self) -> dict:
        """The ledger's state for a checkpoint (empty without a DP defense)."""
        return self.ledger.state_dict() if self.ledger is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.ledger is not None:
            self.ledger.load_state_dict(state)

    def charge(self, training: TrainingSpec, reported: dict[int, tuple[int, int]]) -> tuple[float, float] | None:
        """Record one round (``reported``: client id -> the (examples, local steps) it reported for
        its successful update); returns (ε of this round's
        mechanisms alone, 0 when no client succeeded; cumulative worst ε over the clients), or
        None without a DP defense."""
        if self.ledger is None:
            return None
        mechanisms = {client: privacy_mechanism(self.params, training, examples, steps, self.scenario.federation)
                      for client, (examples, steps) in reported.items()}
        if not mechanisms:
            return 0.0, self.ledger.worst_epsilon()
        federation = [m for m in mechanisms.values() if m.scope == "federation"]
        if federation:
            self.ledger.record(None, federation[0])  # the server's release: once per round
        for client, mechanism in mechanisms.items():
            if mechanism.scope != "federation":
                self.ledger.record(client, mechanism)
        return max(m.epsilon() for m in mechanisms.values()), self.ledger.worst_epsilon()
