"""The run's privacy accounting on the server: every round, the DP mechanism each successful
client ran (``defenses.accounting.privacy_mechanism``: dp_sgd, dp_local) or the server's own
(dp_central, once per round, charged to every client) goes into one ``PrivacyLedger``; the
round reports ε of its own mechanisms and the cumulative worst-case ε over clients, both at
the defense's δ (``rounds.jsonl``: ``epsilon_round``, ``epsilon``)."""
from __future__ import annotations

from defenses.accounting import PrivacyLedger, privacy_mechanism
from defenses.registry import resolve_defense_params
from fedsim.records import ClientUpload
from fedsim.scenario import Scenario, TrainingSpec


class RunPrivacy:
    """Composes the scenario's DP mechanisms over the rounds; inert for defenses without one."""

    def __init__(self, scenario: Scenario):
        self.scenario = scenario
        self.params = resolve_defense_params(scenario.defense, scenario.source)
        self.ledger = PrivacyLedger()
        probe = privacy_mechanism(self.params, scenario.training, 1, 1, scenario.federation)
        self.accounted = probe is not None  # the defense has a DP guarantee to account

    def charge(self, training: TrainingSpec, uploads: dict[int, ClientUpload]) -> tuple[float, float] | None:
        """Record one round (``uploads``: client id -> what it sent); returns (ε of this round's
        mechanisms alone, 0 when no client succeeded; cumulative worst ε over the clients), or
        None without a DP defense."""
        if not self.accounted:
            return None
        mechanisms = {client: privacy_mechanism(self.params, training, upload.num_examples, upload.num_steps,
                                                 self.scenario.federation)
                      for client, upload in uploads.items()}
        if not mechanisms:
            return 0.0, self.ledger.worst_epsilon()
        federation = [m for m in mechanisms.values() if m.scope == "federation"]
        if federation:
            self.ledger.record(None, federation[0])  # the server's release: once per round
        for client, mechanism in mechanisms.items():
            if mechanism.scope != "federation":
                self.ledger.record(client, mechanism)
        return max(m.epsilon() for m in mechanisms.values()), self.ledger.worst_epsilon()
