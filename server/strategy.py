"""The honest-but-curious strategy: FedAvg exactly, plus a tap on every update.

Each round it samples clients deterministically from the scenario seed, sends θ_t and
the public round config, aggregates the replies as FedAvg (in client-id order, so runs
are bit-reproducible), and turns every reply the attack sink wants into an
:class:`Observation` (what the server saw) plus a :class:`GroundTruth` (the evaluation-only
channel). A defense that acts on the server (central DP) clips each update and noises the
average *after* the tap has seen the raw updates; the run's DP accounting is charged per round.

Flower counts rounds from 1; a resumed run starts at ``first_round``, so every round here is
Flower's round + ``first_round`` − 1. Each update handed to the attack sink is also kept in
``pending_dir`` (``fedsim.records.save_upload``) until its attacks are done, so that a resumed
run can queue them again. Nothing round-dependent carries state from round to round: sampling,
the clients' seeds and the server defense's noise all derive from (seed, round).
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Protocol

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from adversary.observation import GroundTruth, Observation, observe
from fedsim.domain import DataDomain
from defenses.registry import DEFENSES, build_defense
from fedsim.records import (GROUND_TRUTH_CLIENTS, GROUND_TRUTH_KEY, all_finite, from_record, save_upload, take_upload,
                            to_record)
from fedsim.scenario import Scenario, TrainingSpec
from fedsim.seeding import derive_seed, generator
from server.privacy import RunPrivacy
from server.stops import TooFewNodes


def concise_error(reason: str) -> str:
    """The client's own exception message out of Flower/Ray's wrapped reason (which carries
    process ids and a traceback), so failure records are short and reproducible."""
    reason = re.sub(r"\x1b\[[0-9;]*m", "", reason)
    found = re.findall(r"Message: (.+)", reason)
    if found:
        return found[-1].strip().rstrip("'>\"")
    lines = [line.strip() for line in reason.splitlines() if line.strip()]
    return lines[-1] if lines else reason


#: seconds without a new node after which a federation short of nodes is given up on
NODE_SETTLE_S = 10.0


class AttackSink(Protocol):
    """Where tapped updates go (the inversion pool; a recorder in tests). The strategy builds
    an observation only for the updates the sink ``wants``, and keeps none itself."""

    def wants(self, server_round: int, client_id: int) -> bool: ...

    def submit(self, observation: Observation, truth: GroundTruth) -> None: ...

    def close(self) -> None:
        """Wait for the submitted work to finish (end of the run)."""

    def abort(self) -> None:
        """Abandon the work in flight (the run is interrupted)."""


@dataclass
class RoundTrace:
    """One round as the strategy ran it: the public training config it dictated (computed once,
    sent to the clients and handed to the attacker), θ_t until the round is aggregated, and what
    rounds.jsonl reports."""

    training: TrainingSpec
    global_state: dict[str, torch.Tensor] | None = None
    clients: list[int] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)  # {"client", "error"}: the client's own message
    failure_details: list[str] = field(default_factory=list)  # Flower's full reason (traceback), per failure
    train_loss: float | None = None
    epsilon_round: float | None = None  # ε of this round's DP mechanisms alone (None: no DP defense)
    epsilon: float | None = None  # cumulative worst-case ε over the clients after this round
    started: float = field(default_factory=time.monotonic)
    ended: tuple[float, float] | None = None  # (seconds since started, Unix time) when the server had the new model


class CuriousFedAvg(FedAvg):
    def __init__(self, scenario: Scenario, scenario_text: str, domain: DataDomain, sink: AttackSink | None,
                 first_round: int = 1, pending_dir: Path | None = None):
        fed = scenario.federation
        super().__init__(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=fed.clients_per_round,
                         min_available_nodes=fed.num_clients)
        self.scenario = scenario
        self.scenario_text = scenario_text
        self.domain = domain
        self.sink = sink
        self.node_to_client: dict[int, int] = {}
        self.traces: dict[int, RoundTrace] = {}
        self.first_round = first_round
        self.pending_dir = pending_dir
        self.privacy = RunPrivacy(scenario)
        # θ_t and each received Δ are needed only to attack an update or for a server-side defense
        self.keeps_updates = sink is not None or DEFENSES[scenario.defense.name].defense_type.acts_on_server

    def round_of(self, flower_round: int) -> int:
        """The run's round number of Flower's ``flower_round`` (they differ in a resumed run)."""
        return flower_round + self.first_round - 1

    # -- sampling ---------------------------------------------------------------------
    def identify_clients(self, grid: Grid) -> None:
        """Wait for every node, then ask each for its client id (partition) once. Nodes that
        stop arriving (no new one for ``NODE_SETTLE_S``) short of ``num_clients`` end the run
        with :class:`TooFewNodes`."""
        expected = self.scenario.federation.num_clients
        seen, last_change = -1, time.monotonic()
        while len(nodes := sorted(grid.get_node_ids())) < expected:
            if len(nodes) != seen:
                seen, last_change = len(nodes), time.monotonic()
            elif time.monotonic() - last_change > NODE_SETTLE_S:
                raise TooFewNodes(self.scenario, len(nodes))
            time.sleep(0.2)
        queries = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
        for reply in grid.send_and_receive(queries, timeout=600):
            if reply.has_error():
                raise RuntimeError(f"node {reply.metadata.src_node_id} did not identify: {reply.error.reason}")
            self.node_to_client[reply.metadata.src_node_id] = int(reply.content["identity"]["client-id"])
        missing = set(range(expected)) - set(self.node_to_client.values())
        if missing:
            raise RuntimeError(f"clients {sorted(missing)} did not answer the identity query")

    def sample_clients(self, server_round: int) -> list[int]:
        fed = self.scenario.federation
        rng = np.random.default_rng(derive_seed(self.scenario.seed, "sample", server_round))
        return sorted(int(c) for c in rng.choice(fed.num_clients, fed.clients_per_round, replace=False))

    def configure_train(self, flower_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if not self.node_to_client:
            self.identify_clients(grid)
        server_round = self.round_of(flower_round)
        clients = self.sample_clients(server_round)
        trace = RoundTrace(self.scenario.round_training(server_round),
                           from_record(arrays) if self.keeps_updates else None, clients)
        self.traces[server_round] = trace
        scored = [c for c in clients if self.sink is not None and self.sink.wants(server_round, c)]
        config = ConfigRecord({"scenario": self.scenario_text, "lr": trace.training.lr, "server-round": server_round,
                               GROUND_TRUTH_CLIENTS: scored})
        client_to_node = {c: n for n, c in self.node_to_client.items()}
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, [client_to_node[c] for c in clients], MessageType.TRAIN)

    # -- aggregation and the tap ------------------------------------------------------
    def aggregate_train(self, flower_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round = self.round_of(flower_round)
        trace = self.traces[server_round]
        defense = build_defense(self.scenario.defense, generator(self.scenario.seed, "server-defense", server_round),
                                self.scenario.source)
        server_defense = defense if defense.acts_on_server else None
        ok: list[tuple[int, Message]] = []
        for msg in replies:
            client = self.node_to_client.get(msg.metadata.src_node_id, -1)
            if msg.has_error():
                trace.failures.append({"client": client, "error": concise_error(msg.error.reason)})
                trace.failure_details.append(msg.error.reason)
            else:
                ok.append((client, msg))
        ok.sort(key=lambda pair: pair[0])
        reported = {client: (int(msg.content["metrics"]["num-examples"]), int(msg.content["metrics"]["steps"]))
                    for client, msg in ok}
        theta = trace.global_state
        for client, msg in ok:  # the tap: every update, before FedAvg sees the message
            if not self.keeps_updates:
                msg.content.pop(GROUND_TRUTH_KEY, None)  # nothing is attacked: FedAvg sees arrays and metrics
                continue
            upload = take_upload(msg.content, theta)  # strips the evaluation-only record
            # a diverged update (non-finite) is not attacked: the run stops on it (server.app)
            if self.sink is not None and self.sink.wants(server_round, client) and all_finite(upload.update):
                if self.pending_dir is not None:
                    save_upload(pending_path(self.pending_dir, server_round, client), server_round, client, theta,
                                upload)
                self.sink.submit(*observe(self.scenario, self.domain, trace.training, server_round, client, theta,
                                          upload))
            if server_defense is not None:
                msg.content[self.arrayrecord_key] = _state_record(theta, server_defense.on_server_update(upload.update))
        arrays, metrics = super().aggregate_train(flower_round, [m for _, m in ok])
        if arrays is not None and server_defense is not None:
            average = from_record(arrays)
            arrays = _state_record(theta, server_defense.on_aggregate(
                {k: average[k] - theta[k] for k in theta}, len(trace.clients)))
        if metrics is not None:
            trace.train_loss = float(metrics["train-loss"])
        trace.epsilon_round, trace.epsilon = self.privacy.charge(trace.training, reported) or (None, None)
        trace.global_state = None
        return arrays, metrics


def pending_path(folder: Path, server_round: int, client: int) -> Path:
    """Where the tapped update of ``client`` in ``server_round`` waits for its attacks."""
    return folder / f"r{server_round:03d}_c{client:03d}.pt"


def _state_record(theta: dict[str, torch.Tensor], update: dict[str, torch.Tensor]) -> ArrayRecord:
    """θ_t + Δ as the ArrayRecord a reply (or the aggregate) carries."""
    return to_record({k: theta[k] + update[k] for k in theta})
