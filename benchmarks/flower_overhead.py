"""What fedsim costs on top of plain Flower, on the same federation, measured in one run.

Two programs train the same federation (100 clients, 10 per round, 10 rounds; ConvNet width 8
on 32×32 embedded photos, 50 examples per client, batch 16, 2 local epochs of SGD): a textbook
Flower app (Message API, ``FedAvg``, a ClientApp that loads its partition and trains, no
evaluation, no tap) and ``fedsim run`` on the equivalent scenario (no attack, no defense;
fedsim evaluates the global model on its test split every round and writes its records). Both
load their data with the same loader (``fedsim.data``), so the comparison is of the
machinery. Each runs in its own process (its own Ray); the benchmark samples the resident
memory of each process tree every 0.2 s.

Reported: steady-state seconds per round (median over rounds 2–10 of the time from one round's
end to the next, the evaluation and the records included; round 1 starts the actors),
wall seconds of the whole command, peak memory of the process tree, and fedsim / Flower ratios.

    python benchmarks/flower_overhead.py --out benchmarks/results/flower_overhead_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]

CLIENTS, PER_ROUND, ROUNDS, EXAMPLES, BATCH, EPOCHS, WIDTH, LR = 100, 10, 10, 50, 16, 2, 8, 0.05

SCENARIO = f"""
name = "flower_overhead"
seed = 0
[data]
train_examples = {CLIENTS * EXAMPLES}
test_examples = 500
[model]
name = "convnet"
width = {WIDTH}
[federation]
num_clients = {CLIENTS}
clients_per_round = {PER_ROUND}
rounds = {ROUNDS}
[training]
epochs = {EPOCHS}
batch_size = {BATCH}
lr = {LR}
"""

# The textbook app: everything a Flower user writes for FedAvg with the Message API.
TEXTBOOK = f'''
import functools, json, os, sys, time
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation
from fedsim.data import load_data
from fedsim.models import ConvNet
from fedsim.scenario import DataSpec

SPEC = DataSpec(train_examples={CLIENTS * EXAMPLES}, test_examples=500)

@functools.lru_cache(maxsize=1)
def dataset():
    return load_data(SPEC, 0)

def partition(i):
    d = dataset()
    return d.train_x[i * {EXAMPLES}:(i + 1) * {EXAMPLES}], d.train_y[i * {EXAMPLES}:(i + 1) * {EXAMPLES}]

client = ClientApp()

@client.train()
def train(msg: Message, context: Context) -> Message:
    model = ConvNet(3, 10, {WIDTH})
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = partition(int(context.node_config["partition-id"]))
    opt = torch.optim.SGD(model.parameters(), lr={LR})
    model.train()
    for _ in range({EPOCHS}):
        for i in torch.randperm(len(x)).split({BATCH}):
            opt.zero_grad()
            F.cross_entropy(model(x[i]), y[i]).backward()
            opt.step()
    content = RecordDict({{"arrays": ArrayRecord(model.state_dict()),
                           "metrics": MetricRecord({{"num-examples": len(x)}})}})
    return Message(content=content, reply_to=msg)

server = ServerApp()
ENDS = []

@server.main()
def main(grid: Grid, context: Context) -> None:
    strategy = FedAvg(fraction_train={PER_ROUND / CLIENTS}, fraction_evaluate=0.0,
                      min_train_nodes={PER_ROUND}, min_available_nodes={CLIENTS})
    def mark(server_round, arrays):
        ENDS.append(time.monotonic())
        return None
    torch.manual_seed(0)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(ConvNet(3, 10, {WIDTH}).state_dict()),
                   num_rounds={ROUNDS}, evaluate_fn=mark)

run_simulation(server_app=server, client_app=client, num_supernodes={CLIENTS},
               backend_config={{"client_resources": {{"num_cpus": 1.0, "num_gpus": 0.0}}}})
print(json.dumps([b - a for a, b in zip(ENDS, ENDS[1:])]))
'''


def run_measured(command: list[str], cwd: Path) -> tuple[float, float, subprocess.CompletedProcess]:
    """(wall seconds, peak RSS of the process tree in MB, the finished process)."""
    started = time.monotonic()
    proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0.0]

    def sample() -> None:
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                tree = [root, *root.children(recursive=True)]
                peak[0] = max(peak[0], sum(p.memory_info().rss for p in tree if p.is_running()) / 2**20)
            except psutil.Error:
                pass
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    wall = time.monotonic() - started
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{command[:3]} failed:\n{err[-3000:]}")
    return wall, peak[0], subprocess.CompletedProcess(command, proc.returncode, out, err)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="JSON file of the results")
    args = parser.parse_args()
    env_python = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "overhead.toml").write_text(SCENARIO)
        (tmp / "textbook.py").write_text(TEXTBOOK)
        flower_wall, flower_peak, flower = run_measured([env_python, str(tmp / "textbook.py")], ROOT)
        flower_rounds = json.loads(flower.stdout.strip().splitlines()[-1])  # rounds 2..10: gaps between ends
        fedsim_wall, fedsim_peak, _ = run_measured([env_python, "-m", "fedsim.run.cli", "run", str(tmp / "overhead.toml"),
                                                    "--out", str(tmp / "run"), "--quiet"], ROOT)
        ends = [json.loads(line)["ended_at"] for line in (tmp / "run" / "rounds.jsonl").read_text().splitlines()]
        fedsim_rounds = [b - a for a, b in zip(ends, ends[1:])]  # rounds 2..10, as for Flower
    flower_steady, fedsim_steady = statistics.median(flower_rounds), statistics.median(fedsim_rounds)
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "federation": {"clients": CLIENTS, "per_round": PER_ROUND, "rounds": ROUNDS, "examples": EXAMPLES,
                       "batch": BATCH, "epochs": EPOCHS, "model": f"ConvNet width {WIDTH}"},
        "flower": {"steady_s_per_round": flower_steady, "rounds_s": flower_rounds, "wall_s": flower_wall,
                   "peak_rss_mb": flower_peak},
        "fedsim": {"steady_s_per_round": fedsim_steady, "rounds_s": fedsim_rounds, "wall_s": fedsim_wall,
                   "peak_rss_mb": fedsim_peak},
        "ratios": {"steady": fedsim_steady / flower_steady, "wall": fedsim_wall / flower_wall,
                   "peak_rss": fedsim_peak / flower_peak},
    }
    print(json.dumps(result, indent=2))
    print(f"| | plain Flower | fedsim | ratio |\n|---|---|---|---|\n"
          f"| steady s / round (median, rounds 2–{ROUNDS}) | {flower_steady:.3f} | {fedsim_steady:.3f} "
          f"| {result['ratios']['steady']:.2f} |\n"
          f"| wall s | {flower_wall:.1f} | {fedsim_wall:.1f} | {result['ratios']['wall']:.2f} |\n"
          f"| peak memory of the process tree (MB) | {flower_peak:.0f} | {fedsim_peak:.0f} "
          f"| {result['ratios']['peak_rss']:.2f} |")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
