"""Attack throughput: Geiping's iteration against breaching's configuration, against a training
step, and restarts vectorised vs one by one.

The update: ``scenarios/geiping_fedsgd_b1.toml`` (untrained ConvNet width 32, FedSGD, 32x32
photos, lr 0.1), client 0's round-1 update at batch size b, made by the real client training
(``fedsim.run.single_shot.observe_first_update``). Measured per case, variants interleaved
(``--rounds`` rounds of ``--steps`` steps each), the median step:

- ``iteration``: fedsim's Geiping step (defaults: cosine + TV 0.01 + BN-statistics term; and
  set up as breaching: TV 0.2, no BN term) through ``adversary.attacks.geiping.run``, against
  :class:`BreachingReference` — breaching's ``invertinggradients`` configuration written out here
  (breaching is not installed: its PyPI wheel pins an old stack), and one local training step
  (``torch.optim.SGD`` on the same model and batch); with ``--compiled`` also the defaults with
  ``compile = true`` (the first step, which compiles, is not among the timed ones);
- ``throughput``: image-iterations per second for R restarts, vectorised (``batch_restarts``) vs
  one by one.

Times are the thread's CPU time (``time.thread_time``) with one torch thread unless ``--wall``:
the CI-sized machine is shared, and CPU time is what another process' load does not inflate.

    python benchmarks/attack_throughput.py --out benchmarks/results/attack_throughput_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adversary.attacks import geiping  # noqa: E402
from adversary.attacks.base import AttackContext  # noqa: E402
from adversary.maths.matching import attack_labels, initial_inputs, num_examples  # noqa: E402
from adversary.observation import Observation, global_model  # noqa: E402
from fedsim.data import load_data  # noqa: E402
from fedsim.run.preparation import validate_scenario  # noqa: E402
from fedsim.run.single_shot import observe_first_update  # noqa: E402


def fedsgd_update(scenario_path: Path, batch_size: int) -> Observation:
    """Client 0's round-1 FedSGD update of the scenario at batch size ``batch_size``."""
    base = validate_scenario(scenario_path)
    scenario = replace(base, training=replace(base.training, batch_size=batch_size),
                       data=replace(base.data, examples_per_client=batch_size))
    observation, _ = observe_first_update(scenario, load_data(scenario.data, scenario.seed), 0)
    return observation


class BreachingReference:
    """breaching's Inverting-Gradients configuration (``attack=invertinggradients``) on a FedSGD
    update: 1 − cosine similarity between the gradient of the batch-mean cross-entropy
    (``torch.autograd.grad(create_graph=True)`` through the module in train mode, as breaching's
    ``_grad_fn_single_step``) and −Δ/lr over every parameter, accumulated tensor by tensor; total
    variation scale 0.2 computed by a grouped finite-difference convolution (|dx| + |dy| + 1e-8,
    mean); Adam lr 0.1 on the sign of the gradient, lr x0.1 at 3/8, 5/8, 7/8; projection onto the
    data box after each step. Written from breaching's config and code, not copied."""

    def __init__(self, obs: Observation, labels: torch.Tensor, start: torch.Tensor, iterations: int):
        self.model = global_model(obs).to(start.device).train()
        self.params = list(self.model.parameters())
        names = [name for name, _ in self.model.named_parameters()]
        self.target = [-obs.update[name].to(start.device, torch.float32) / obs.training.lr for name in names]
        self.labels = labels
        kernel = torch.tensor([[0.0, 0.0, 0.0], [0.0, -1.0, 1.0], [0.0, 0.0, 0.0]])[None, None]
        channels = start.shape[1]
        self.tv_kernel = torch.cat([kernel.transpose(2, 3), kernel] * channels).to(start.device)
        self.lo, self.hi = obs.domain.bounds(start)
        self.x = start.clone().requires_grad_(True)
        self.opt = torch.optim.Adam([self.x], lr=0.1)
        self.sched = torch.optim.lr_scheduler.MultiStepLR(
            self.opt, milestones=[int(iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)], gamma=0.1)

    def total_variation(self, x: torch.Tensor) -> torch.Tensor:
        diffs = F.conv2d(x, self.tv_kernel, padding=1, groups=x.shape[1])
        squares = diffs.abs() + 1e-8
        return (squares[:, 0::2] + squares[:, 1::2]).mean() * 0.2

    def step(self) -> float:
        self.opt.zero_grad()
        loss = F.cross_entropy(self.model(self.x), self.labels)
        grads = torch.autograd.grad(loss, self.params, create_graph=True)
        dot, rec, data = self.x.new_zeros(1), self.x.new_zeros(1), self.x.new_zeros(1)
        for g, t in zip(grads, self.target):
            dot += (g * t).sum()
            rec += g.pow(2).sum()
            data += t.pow(2).sum()
        objective = (1 - dot / (rec.sqrt() * data.sqrt()) + self.total_variation(self.x)).squeeze(0)
        objective.backward(inputs=[self.x])
        self.x.grad.sign_()
        self.opt.step()
        self.sched.step()
        with torch.no_grad():
            self.x.data = torch.max(torch.min(self.x, self.hi), self.lo)
        return objective.detach().item()


def step_times(run_steps: Callable[[Callable[[], None]], None], clock: Callable[[], float]) -> list[float]:
    """Seconds between consecutive ``tick()`` calls made by ``run_steps(tick)`` (one per step)."""
    stamps: list[float] = []
    run_steps(lambda: stamps.append(clock()))
    return [b - a for a, b in zip(stamps, stamps[1:])]


def geiping_steps(obs: Observation, params: geiping.GeipingParams, steps: int, device: torch.device) -> Callable:
    params = replace(params, iterations=steps, report_every=1)

    def run(tick: Callable[[], None]) -> None:
        geiping.run(obs, params, AttackContext(device=device, seed=0, progress=lambda *_: tick()))
    return run


def breaching_steps(obs: Observation, steps: int, device: torch.device) -> Callable:
    labels, _ = attack_labels(obs, num_examples(obs))
    labels = labels.to(device)
    start = initial_inputs("randn", (len(labels), *obs.domain.shape), torch.Generator().manual_seed(0), device)

    def run(tick: Callable[[], None]) -> None:
        reference = BreachingReference(obs, labels, start, iterations=2000)
        tick()
        for _ in range(steps):
            reference.step()
            tick()
    return run


def training_steps(obs: Observation, steps: int, device: torch.device) -> Callable:
    """One local step of the client: SGD on the batch-mean cross-entropy, model in train mode."""
    labels, _ = attack_labels(obs, num_examples(obs))
    labels = labels.to(device)
    x = torch.randn(len(labels), *obs.domain.shape, generator=torch.Generator().manual_seed(0)).to(device)

    def run(tick: Callable[[], None]) -> None:
        model = global_model(obs).to(device).train()
        opt = torch.optim.SGD(model.parameters(), lr=obs.training.lr)
        tick()
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(model(x), labels).backward()
            opt.step()
            tick()
    return run


def interleaved(variants: dict[str, Callable], rounds: int, clock: Callable[[], float]) -> dict[str, float]:
    """Median step time (s) of each variant, the variants run in turn ``rounds`` times."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, run in variants.items():
            times[name] += step_times(run, clock)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenario", type=Path, default=ROOT / "scenarios" / "geiping_fedsgd_b1.toml")
    ap.add_argument("--batch-sizes", type=int, nargs="*", default=[1, 4])
    ap.add_argument("--restarts", type=int, nargs="*", default=[1, 4, 16])
    ap.add_argument("--steps", type=int, default=10, help="steps per variant and round (iteration table)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--throughput-steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--wall", action="store_true", help="wall-clock time instead of the thread's CPU time")
    ap.add_argument("--device", default="cpu", help="cuda: wall-clock time, synchronised at every step")
    ap.add_argument("--compiled", action="store_true",
                    help="also fedsim's defaults with compile = true (its first step, the compile, is not timed)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    clock = time.perf_counter if args.wall else time.thread_time
    if device.type == "cuda":
        def clock() -> float:
            torch.cuda.synchronize()
            return time.perf_counter()
    result: dict = {"scenario": str(args.scenario), "device": str(device),
                    "clock": "wall" if args.wall or device.type == "cuda" else "thread CPU time",
                    "reference": "breaching's invertinggradients configuration re-implemented "
                                 "(BreachingReference; breaching not installed)",
                    "machine": {"cpus": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
                                "platform": platform.platform(), "loadavg_start": os.getloadavg(),
                                "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None},
                    "iteration": {}, "throughput": {}}
    defaults = geiping.GeipingParams()
    as_breaching = replace(defaults, tv_weight=0.2, bn_weight=0.0)
    for b in args.batch_sizes:
        obs = fedsgd_update(args.scenario, b)
        variants = {"fedsim": geiping_steps(obs, defaults, args.steps, device),
                          "fedsim as breaching": geiping_steps(obs, as_breaching, args.steps, device),
                          "breaching reference": breaching_steps(obs, args.steps, device),
                          "training step": training_steps(obs, args.steps, device)}
        if args.compiled:
            variants["fedsim, compiled"] = geiping_steps(obs, replace(defaults, compile=True), args.steps, device)
        ms = {k: v * 1e3 for k, v in interleaved(variants, args.rounds, clock).items()}
        row = {"ms": ms, "fedsim / breaching": ms["fedsim"] / ms["breaching reference"],
               "fedsim as breaching / breaching": ms["fedsim as breaching"] / ms["breaching reference"],
               "fedsim / training step": ms["fedsim"] / ms["training step"],
               "breaching / training step": ms["breaching reference"] / ms["training step"]}
        if args.compiled:
            row["compiled / breaching"] = ms["fedsim, compiled"] / ms["breaching reference"]
        result["iteration"][f"b={b}"] = row
        print(f"b={b}: " + ", ".join(f"{k} {v:.3g}" for k, v in {**ms, **{k: v for k, v in row.items()
                                                                       if k != 'ms'}}.items()), flush=True)
        for r in args.restarts:
            restarts = replace(defaults, restarts=r)
            s = interleaved({"vectorised": geiping_steps(obs, restarts, args.throughput_steps, device),
                             "one by one": geiping_steps(obs, replace(restarts, batch_restarts=False),
                                                         args.throughput_steps, device)}, args.rounds, clock)
            rate = {k: r * b / v for k, v in s.items()}  # image-iterations per second
            result["throughput"][f"b={b} R={r}"] = {"image_iterations_per_s": rate,
                                                   "speed-up": rate["vectorised"] / rate["one by one"]}
            print(f"b={b} R={r}: image-it/s vectorised {rate['vectorised']:.1f}, one by one "
                  f"{rate['one by one']:.1f}, speed-up {rate['vectorised'] / rate['one by one']:.2f}", flush=True)
        if args.out is not None:
            result["machine"]["loadavg_now"] = os.getloadavg()
            args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
