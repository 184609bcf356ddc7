"""What the server remembers of each client: its latest reconstructions, to guide later attacks.

The pool records every scored reconstruction here (the attack's own output, normalised, never
matched to the ground truth) and hands the latest one from an *earlier* round to a job whose
attack wants it (``Attack.needs_prior``, e.g. SPEAR with ``guide = "previous"``) as
``Observation.prior``. Such a job is dispatched only after every earlier-round job of its client
has finished, so what it gets does not depend on how fast the workers were.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ReconstructionMemory:
    """client -> round -> (plan position of the attack, reconstruction (b', C, H, W) normalised).

    ``attack_order``: the scenario's planned attacks; within one round the reconstruction of the
    attack listed first wins, whatever order the jobs finished in."""

    attack_order: tuple[str, ...]
    rounds: dict[int, dict[int, tuple[int, torch.Tensor]]] = field(default_factory=dict)

    def record(self, server_round: int, client_id: int, attack: str, inputs: torch.Tensor) -> None:
        """Remember ``inputs`` (b', C, H, W) unless an attack earlier in the plan already left
        one for this client and round."""
        rank = self.attack_order.index(attack) if attack in self.attack_order else len(self.attack_order)
        held = self.rounds.setdefault(client_id, {})
        if server_round not in held or rank < held[server_round][0]:
            held[server_round] = (rank, inputs.detach().float().cpu())

    def prior_for(self, server_round: int, client_id: int) -> tuple[int, torch.Tensor] | None:
        """(round, reconstruction) of the client's latest round before ``server_round``, or None.
        Older rounds are forgotten: the job asking runs after all earlier-round jobs of the client,
        so none of them can ask again."""
        held = self.rounds.get(client_id, {})
        earlier = [r for r in held if r < server_round]
        if not earlier:
            return None
        chosen = max(earlier)
        for r in [r for r in held if r < chosen]:
            del held[r]
        return chosen, held[chosen][1]
