"""What fedsim costs on top of plain Flower, on the same federation, measured in one run.

Two programs train the same federation (100 clients, 10 per round, 10 rounds; ConvNet width 8
on 32×32 embedded photos, 50 examples per client, batch 16, 2 local epochs of SGD): a textbook
Flower app (Message API, ``FedAvg``, a ClientApp that loads its partition and trains, no
evaluation, no tap) and ``fedsim run`` on the equivalent scenario (no attack, no defense;
fedsim evaluates the global model on its test split every round and writes its records). Both
load their data with the same loader (``fedsim.data``), from the disk cache the benchmark
fills first (:mod:`fedsim.cache`), so the comparison is of the machinery. Each runs in its own process (its own Ray); the benchmark samples the resident
memory of each process tree every 0.2 s.

Each program runs ``--repeats`` times, alternating, each run on a machine left idle by the
previous one (its Ray processes gone). Reported: steady-state seconds per round (median over
rounds 2–10 of all repeats of the time from one round's end to the next, the evaluation and the
records included; round 1 starts the actors), wall seconds of the whole command (median over
repeats), peak memory of the process tree (largest), and fedsim / Flower ratios.

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
examples_per_client = {EXAMPLES}
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

# The textbook app: everything a Flower user writes for FedAvg with the Message API. It is a
# module of its own (``textbook_app``), as in a Flower App: Ray's workers import the ClientApp's
# functions by name. Run by RUN_TEXTBOOK, which prints the gaps between round ends and the rounds
# that aggregated replies (all of them, or the comparison is void).
TEXTBOOK = f'''
import functools, os, time
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
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
TRAINED = []

@server.main()
def main(grid: Grid, context: Context) -> None:
    strategy = FedAvg(fraction_train={PER_ROUND / CLIENTS}, fraction_evaluate=0.0,
                      min_train_nodes={PER_ROUND}, min_available_nodes={CLIENTS})
    def mark(server_round, arrays):
        ENDS.append(time.monotonic())
        return None
    torch.manual_seed(0)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(ConvNet(3, 10, {WIDTH}).state_dict()),
                            num_rounds={ROUNDS}, evaluate_fn=mark)
    TRAINED.append(len(result.train_metrics_clientapp))
'''

RUN_TEXTBOOK = f'''
import json, time
from flwr.simulation import run_simulation
import textbook_app as app

run_simulation(server_app=app.server, client_app=app.client, num_supernodes={CLIENTS},
               backend_config={{"client_resources": {{"num_cpus": 1.0, "num_gpus": 0.0}}}})
print(json.dumps({{"gaps": [b - a for a, b in zip(app.ENDS, app.ENDS[1:])], "trained_rounds": app.TRAINED[0]}}))
'''


def run_measured(command: list[str], cwd: Path, env: dict | None = None) -> tuple[float, float, subprocess.CompletedProcess]:
    """(wall seconds, peak RSS of the process tree in MB, the finished process)."""
    started = time.monotonic()
    proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
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


def settle(timeout_s: float = 60.0) -> None:
    """Wait until no Ray process of an earlier run is left, then a little more."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ray = [p for p in psutil.process_iter(["cmdline"]) if any("ray" in part for part in (p.info["cmdline"] or [])[:2])]
        if not ray:
            break
        time.sleep(0.5)
    time.sleep(2.0)


def run_flower(tmp: Path) -> tuple[float, float, list[float]]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp), str(ROOT)])}
    wall, peak, proc = run_measured([sys.executable, str(tmp / "run_textbook.py")], ROOT, env)
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    if printed["trained_rounds"] != ROUNDS:
        raise RuntimeError(f"plain Flower aggregated {printed['trained_rounds']} of {ROUNDS} rounds: its clients failed")
    return wall, peak, printed["gaps"][1:]  # gaps between round ends: rounds 2..10


def run_fedsim(tmp: Path, repeat: int) -> tuple[float, float, list[float]]:
    out = tmp / f"run{repeat}"
    wall, peak, _ = run_measured([sys.executable, "-m", "fedsim.run.cli", "run", str(tmp / "overhead.toml"),
                                  "--out", str(out), "--quiet"], ROOT)
    ends = [json.loads(line)["ended_at"] for line in (out / "rounds.jsonl").read_text().splitlines()]
    return wall, peak, [b - a for a, b in zip(ends, ends[1:])]  # rounds 2..10, as for Flower


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="JSON file of the results")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from fedsim.data import load_data
    from fedsim.scenario import DataSpec

    load_data(DataSpec(train_examples=CLIENTS * EXAMPLES, test_examples=500), 0)  # fills the cache for both
    runs: dict[str, list[tuple[float, float, list[float]]]] = {"flower": [], "fedsim": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "overhead.toml").write_text(SCENARIO)
        (tmp / "textbook_app.py").write_text(TEXTBOOK)
        (tmp / "run_textbook.py").write_text(RUN_TEXTBOOK)
        for repeat in range(args.repeats):
            settle()
            runs["flower"].append(run_flower(tmp))
            settle()
            runs["fedsim"].append(run_fedsim(tmp, repeat))
    walls = {k: [w for w, _, _ in v] for k, v in runs.items()}
    peaks = {k: [p for _, p, _ in v] for k, v in runs.items()}
    gaps = {k: [g for _, _, gs in v for g in gs] for k, v in runs.items()}
    flower_rounds, fedsim_rounds = gaps["flower"], gaps["fedsim"]
    flower_wall, fedsim_wall = statistics.median(walls["flower"]), statistics.median(walls["fedsim"])
    flower_peak, fedsim_peak = max(peaks["flower"]), max(peaks["fedsim"])
    flower_steady, fedsim_steady = statistics.median(flower_rounds), statistics.median(fedsim_rounds)
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "federation": {"clients": CLIENTS, "per_round": PER_ROUND, "rounds": ROUNDS, "examples": EXAMPLES,
                       "batch": BATCH, "epochs": EPOCHS, "model": f"ConvNet width {WIDTH}"},
        "flower": {"steady_s_per_round": flower_steady, "rounds_s": flower_rounds, "wall_s": flower_wall,
                   "walls_s": walls["flower"], "peak_rss_mb": flower_peak},
        "fedsim": {"steady_s_per_round": fedsim_steady, "rounds_s": fedsim_rounds, "wall_s": fedsim_wall,
                   "walls_s": walls["fedsim"], "peak_rss_mb": fedsim_peak},
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
