"""What the server does besides FedAvg: central DP after the tap (the tap sees raw updates, the
aggregate is clipped and noised), and the run's privacy accounting per round."""
from __future__ import annotations

import math

import pytest
import torch
from flwr.app import Message, MessageType, RecordDict

from defenses.accounting import privacy_mechanism
from defenses.registry import resolve_defense_params
from fedsim.domain import DataDomain
from fedsim.records import ClientUpload, reply_content
from fedsim.scenario import parse_scenario
from helpers import RecordingSink
from server.privacy import RunPrivacy
from server.strategy import CuriousFedAvg, RoundTrace

DOMAIN = DataDomain((1, 2, 2), 2, (0.5,), (0.5,))


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Flower stamps messages with the identity of the running task; give these tests one."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)
THETA = {"w": torch.zeros(4, 10), "b": torch.zeros(4), "count": torch.tensor(3)}


def _upload(scale: float, seed: int) -> ClientUpload:
    g = torch.Generator().manual_seed(seed)
    update = {"w": torch.randn(4, 10, generator=g) * scale, "b": torch.randn(4, generator=g) * scale,
              "count": torch.tensor(1)}
    return ClientUpload(update, 8, 1, 0.5, torch.zeros(1, 1, 2, 2), torch.tensor([1]), [(0,)])


def _aggregate(defense: dict, uploads: list[ClientUpload]):
    scenario = parse_scenario({"defense": defense, "federation": {"num_clients": 4, "clients_per_round": 2},
                               "attack": {"attacks": []}})
    sink = RecordingSink()
    strategy = CuriousFedAvg(scenario, "", DOMAIN, sink)
    strategy.node_to_client = {100 + i: i for i in range(len(uploads))}
    strategy.traces[1] = RoundTrace(scenario.round_training(1), dict(THETA), list(range(len(uploads))))
    replies = []
    for i, upload in enumerate(uploads):
        sent = Message(RecordDict(), dst_node_id=100 + i, message_type=MessageType.TRAIN)
        reply = Message(reply_content(THETA, upload), reply_to=sent)
        replies.append(reply)
    arrays, _ = strategy.aggregate_train(1, replies)
    return sink, {k: v for k, v in arrays.to_torch_state_dict().items()}, strategy.traces[1]


def _norm(update: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(v.double().pow(2).sum()) for v in update.values() if v.is_floating_point()))


def test_central_dp_clips_after_the_tap_saw_the_raw_update():
    uploads = [_upload(1.0, 0), _upload(1.0, 1)]  # norms ~6.4, far above C
    sink, aggregate, _ = _aggregate({"name": "dp_central", "clip_norm": 0.5, "noise_multiplier": 0.0}, uploads)
    for (observation, _), upload in zip(sink.taps, uploads):
        for key in ("w", "b"):
            assert torch.equal(observation.update[key], upload.update[key])  # raw, not clipped
    clipped = [{k: v * 0.5 / _norm(u.update) for k, v in u.update.items() if v.is_floating_point()} for u in uploads]
    for key in ("w", "b"):
        assert torch.allclose(aggregate[key], (clipped[0][key] + clipped[1][key]) / 2, atol=1e-6)
    assert _norm({k: aggregate[k] for k in ("w", "b")}) <= 0.5 + 1e-6
    assert int(aggregate["count"]) == 4  # integer buffers are averaged, never scaled


def test_central_dp_noise_on_the_average_has_std_sigma_c_over_m():
    uploads = [_upload(1e-3, 0), _upload(1e-3, 1)]  # below C: not clipped
    _, aggregate, _ = _aggregate({"name": "dp_central", "clip_norm": 1.0, "noise_multiplier": 2.0}, uploads)
    _, plain, _ = _aggregate({"name": "none"}, uploads)
    noise = torch.cat([(aggregate[k] - plain[k]).flatten() for k in ("w", "b")])
    assert noise.std().item() == pytest.approx(2.0 * 1.0 / 2, rel=0.3)  # σ·C/m, 44 entries


def test_the_round_reports_epsilon_of_the_ledger():
    uploads = [_upload(1e-3, 0), _upload(1e-3, 1)]
    defense = {"name": "dp_local", "clip_norm": 1.0, "noise_multiplier": 1.5, "delta": 1e-5}
    _, _, trace = _aggregate(defense, uploads)
    scenario = parse_scenario({"defense": defense})
    mechanism = privacy_mechanism(resolve_defense_params(scenario.defense, "x"), scenario.training, 8, 1,
                                  scenario.federation)
    assert trace.epsilon_round == pytest.approx(mechanism.epsilon()) and trace.epsilon == trace.epsilon_round
    privacy = RunPrivacy(scenario)
    first = privacy.charge(scenario.training, {0: (8, 1)})
    second = privacy.charge(scenario.training, {0: (8, 1), 1: (8, 1)})
    assert first[1] < second[1] and second[0] == pytest.approx(first[0])  # composition over rounds
    assert RunPrivacy(parse_scenario({"defense": {"name": "topk"}})).charge(scenario.training, {0: (8, 1)}) is None


def test_a_federation_short_of_nodes_stops_in_seconds_with_the_fix(monkeypatch):
    import time

    import server.strategy as strategy_module
    from server.stops import TooFewNodes

    class TwoNodes:
        def get_node_ids(self):
            return [11, 12]

    monkeypatch.setattr(strategy_module, "NODE_SETTLE_S", 0.5)
    scenario = parse_scenario({"federation": {"num_clients": 10}})
    strategy = CuriousFedAvg(scenario, "", DOMAIN, None)
    started = time.monotonic()
    with pytest.raises(TooFewNodes) as info:
        strategy.identify_clients(TwoNodes())
    assert time.monotonic() - started < 5 and info.value.exit_status == 2
    assert "federation.num_clients = 10, but the federation has 2 SuperNodes" in str(info.value)
    assert "flwr federation simulation-config --num-supernodes 10" in str(info.value)
