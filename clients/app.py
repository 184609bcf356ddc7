"""The Flower ClientApp: local training, then the defense, then upload.

The server dictates everything in the train message's config: the scenario (TOML text),
the round's learning rate, and which clients send their ground truth (evaluation only: the
updates the server will score an attack on). A client's identity is its ``partition-id``; its private data
is the partition of the scenario's training pool with that id.
"""
from __future__ import annotations

import functools

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.training import run_client_round
from fedsim.data import DatasetSplits, load_data, scenario_partitions
from fedsim.records import GROUND_TRUTH_CLIENTS, from_record, reply_content
from fedsim.scenario import Scenario, parse_scenario

app = ClientApp()


class InjectedClientFailure(RuntimeError):
    """Raised by clients listed in ``federation.failing_clients`` (fault-injection)."""


@functools.lru_cache(maxsize=2)
def scenario_from_text(text: str) -> Scenario:
    import tomllib

    return parse_scenario(tomllib.loads(text), "<server config>")


@functools.lru_cache(maxsize=2)
def client_partitions(text: str) -> tuple[DatasetSplits, list[torch.Tensor]]:
    """The scenario's data and one index tensor per client, cached per process."""
    scenario = scenario_from_text(text)
    splits = load_data(scenario.data, scenario.seed)
    parts = scenario_partitions(scenario, splits)
    return splits, parts


def client_id_of(context: Context) -> int:
    return int(context.node_config["partition-id"])


@app.query()
def identify(msg: Message, context: Context) -> Message:
    """Tell the server which client (partition) this node is."""
    return Message(RecordDict({"identity": MetricRecord({"client-id": client_id_of(context)})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    config: ConfigRecord = msg.content["config"]
    text = str(config["scenario"])
    scenario = scenario_from_text(text)
    client_id = client_id_of(context)
    server_round = int(config["server-round"])
    if client_id in scenario.federation.failing_clients:
        raise InjectedClientFailure(f"client {client_id} fails by scenario (federation.failing_clients)")

    splits, parts = client_partitions(text)
    global_state = from_record(msg.content["arrays"])
    upload = run_client_round(scenario, splits, parts[client_id], client_id, server_round, global_state,
                              float(config["lr"]))
    with_truth = GROUND_TRUTH_CLIENTS not in config or client_id in list(config[GROUND_TRUTH_CLIENTS])
    return Message(reply_content(global_state, upload, with_truth), reply_to=msg)
