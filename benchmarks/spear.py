"""Benchmark SPEAR (adversary/attacks/spear.py) on the realistic single-gradient setting.

Setting: MLP 3x32x32 -> 256 -> ReLU -> 10 with torch's default init (seed = batch seed),
FedSGD gradient of the batch-mean cross entropy on ``b`` random photos of the embedded
data set (``fedsim.data``, DataSpec() defaults, pool seed 0); one batch per seed.

A batch counts as *exact* when SPEAR reports "exact" (its ReLU-pattern check passed) and
the recovered inputs are within 1e-4 (max abs, normalised space) of the true batch after
optimal matching. ``samples`` are the (b-1)-row submatrices the search examined.

For comparison the table gives two sample counts a plain sampler (independent uniformly
random (b-1)-row submatrices) would need on average to see every direction: the
paper-style ``(1/2)^(b-1)`` argument (each direction is hit with probability
``2^-(b-1)`` per sample; coupon collector: ``H_b 2^(b-1)``), and the same expectation
computed from the batch's actual zero counts (hypergeometric; evaluation only, uses the
ground-truth activation pattern).

    python benchmarks/spear.py --sizes 8 16 20 25 --batches 10 --budget 120 --out spear.json

``--fedavg`` adds a small multi-step (FedAvg) measurement of :func:`spear_fedavg`.
Timings depend on the machine; the JSON records its CPU count and torch threads.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from scipy.special import gammaln

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adversary.attacks.spear import SpearParams, spear_fedavg, spear_invert_linear  # noqa: E402
from fedsim.data import load_data  # noqa: E402
from fedsim.models import MLP, state_to_tensors  # noqa: E402
from fedsim.scenario import DataSpec  # noqa: E402

EXACT_TOL = 1e-4


def matched_error(X: torch.Tensor | None, truth: torch.Tensor) -> float:
    if X is None or X.shape[0] != truth.shape[0]:
        return math.inf
    X, truth = X.double().flatten(1), truth.double().flatten(1)
    rows, cols = linear_sum_assignment(torch.cdist(X, truth).numpy())
    return float((X[rows] - truth[cols]).abs().max())


def half_rule_expectation(b: int) -> float:
    """Samples to see all b directions when each is hit w.p. 2^-(b-1) per sample: H_b 2^(b-1)."""
    return sum(1.0 / k for k in range(1, b + 1)) * 2.0 ** (b - 1)


def uniform_expectation(zero_counts: list[int], live: int, b: int) -> float:
    """Expected independent uniform samples until every direction was hit, from the actual
    zero counts (hypergeometric per-sample probabilities, Poisson clocks)."""
    def lcomb(n, k):
        return gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1)

    p = np.exp([lcomb(z, b - 1) - lcomb(live, b - 1) if z >= b - 1 else -np.inf for z in zero_counts])
    if (p <= 0).any():
        return math.inf
    t = np.logspace(0, math.log10(200.0 / p.min()), 4000)
    surv = 1.0 - np.prod(1.0 - np.exp(-np.outer(t, p)), axis=1)
    return float(np.trapezoid(surv, t) + 1.0)


def one_batch(pool_x, pool_y, b: int, seed: int, budget: float, device: str = "cpu") -> dict:
    idx = torch.randperm(len(pool_x), generator=torch.Generator().manual_seed(seed))[:b]
    x, y = pool_x[idx], pool_y[idx]
    torch.manual_seed(seed)
    model = MLP(3 * 32 * 32, 10, (256,))
    layer = model.layers[0]
    loss = F.cross_entropy(model(x), y)
    gw, gb = torch.autograd.grad(loss, [layer.weight, layer.bias])
    with torch.no_grad():  # evaluation only: the true activation pattern
        z = layer(x.flatten(1))
    live = int((gw.abs().sum(1) > 0).sum())
    zero_counts = [int(v) for v in ((z <= 0) & (gw.abs().sum(1) > 0)).sum(1)]
    res = spear_invert_linear(gw, gb, weight=layer.weight.detach(), bias=layer.bias.detach(), seed=seed,
                              params=SpearParams(time_budget_s=budget), device=device)
    err = matched_error(res.X, x)
    return {"b": b, "seed": seed, **res.summary(), "max_abs_error": err if math.isfinite(err) else None,
            "exact_verified": bool(res.status == "exact" and err <= EXACT_TOL),
            "uniform_expected_samples": uniform_expectation(zero_counts, live, b),
            "min_zero_fraction": min(zero_counts) / live}


def fedavg_batch(pool_x, pool_y, steps: int, batch: int, wd: float, seed: int, budget: float) -> dict:
    n = steps * batch
    idx = torch.randperm(len(pool_x), generator=torch.Generator().manual_seed(10_000 + seed))[:n]
    x, y = pool_x[idx], pool_y[idx]
    torch.manual_seed(seed)
    model = MLP(3 * 32 * 32, 10, (256,))
    theta = state_to_tensors(model)
    lr, momentum = 0.05, 0.9
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=wd)
    for s in range(steps):  # one epoch over disjoint batches, as a client does
        opt.zero_grad()
        F.cross_entropy(model(x[s * batch:(s + 1) * batch]), y[s * batch:(s + 1) * batch]).backward()
        opt.step()
    after = state_to_tensors(model)
    res = spear_fedavg(after["layers.0.weight"] - theta["layers.0.weight"], after["layers.0.bias"] - theta["layers.0.bias"],
                       theta["layers.0.weight"], theta["layers.0.bias"], lr=lr, steps=steps, momentum=momentum,
                       weight_decay=wd, seed=seed, params=SpearParams(time_budget_s=budget))
    err = matched_error(res.X, x)
    return {"steps": steps, "batch": batch, "weight_decay": wd, "seed": seed, **res.summary(),
            "max_abs_error": err if math.isfinite(err) else None, "within_tol": bool(err <= EXACT_TOL)}


def summarise(runs: list[dict], batches: int) -> list[dict]:
    out = []
    for b in sorted({r["b"] for r in runs}):
        rs = [r for r in runs if r["b"] == b]
        secs = [r["seconds"] for r in rs]
        out.append({
            "b": b, "batches": len(rs), "exact": sum(r["exact_verified"] for r in rs),
            "median_s": statistics.median(secs), "max_s": max(secs),
            "median_samples": statistics.median(r["samples"] for r in rs),
            "median_uniform_expected": statistics.median(r["uniform_expected_samples"] for r in rs),
            "half_rule_expected": half_rule_expectation(b),
            "endgame_used": sum(bool(r["endgame_used"]) for r in rs),
            "worst_error_exact": max((r["max_abs_error"] for r in rs if r["exact_verified"]), default=None),
        })
    return out


def table(summary: list[dict], budget: float) -> str:
    lines = ["| b | exact | median s | max s | median samples | uniform sampler, expected (actual zeros) | (1/2)^(b-1) rule: H_b 2^(b-1) | endgame used |",
             "|---|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['b']} | {s['exact']}/{s['batches']} | {s['median_s']:.1f} | {s['max_s']:.1f} | "
                     f"{s['median_samples']:.3g} | {s['median_uniform_expected']:.3g} | {s['half_rule_expected']:.3g} | "
                     f"{s['endgame_used']}/{s['batches']} |")
    lines.append(f"\nBudget {budget:.0f} s per batch; a failed batch counts with the time it used.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 20, 25])
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--budget", type=float, default=120.0, help="seconds per batch")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: with other jobs on the cores, more threads are much slower)")
    ap.add_argument("--fedavg", action="store_true", help="also measure the FedAvg extension")
    ap.add_argument("--device", default="cpu", help="where the search runs (cpu, cuda)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "torch": torch.__version__, "cuda": torch.cuda.is_available(),
               "note": "shared machine: other jobs ran concurrently, timings are indicative"}
    splits = load_data(DataSpec(), 0)
    runs: list[dict] = []
    fed: list[dict] = []
    report = {"machine": machine, "setting": "MLP 3x32x32-256-ReLU-10, default init, FedSGD, batch-mean CE, embedded photos",
              "budget_s": args.budget, "runs": runs, "fedavg": fed}

    def save() -> None:
        if args.out:
            report["summary"] = summarise(runs, args.batches) if runs else []
            args.out.write_text(json.dumps(report, indent=1))

    for b in args.sizes:
        for seed in range(args.batches):
            r = one_batch(splits.train_x, splits.train_y, b, seed, args.budget, args.device)
            runs.append(r)
            print(f"b={b} seed={seed}: {r['status']} {r['seconds']:.1f}s samples={r['samples']:.3g} "
                  f"err={r['max_abs_error']}", flush=True)
            save()
    if args.fedavg:
        for wd in (0.0, 5e-4):
            for seed in range(min(args.batches, 5)):
                r = fedavg_batch(splits.train_x, splits.train_y, 2, 4, wd, seed, args.budget)
                fed.append(r)
                print(f"fedavg 2x4 wd={wd} seed={seed}: {r['status']} b_est={r['estimated_batch_size']} "
                      f"err={r['max_abs_error']}", flush=True)
                save()
    save()
    print()
    print(table(summarise(runs, args.batches), args.budget))
    print(f"\nMachine: {machine['cpus']} CPUs, torch threads {machine['torch_threads']}, {machine['platform']}; {machine['note']}.")
    if fed:
        print("\n| FedAvg (2 steps x 4, momentum 0.9) | within 1e-4 | median error |\n|---|---|---|")
        for wd in (0.0, 5e-4):
            rs = [r for r in fed if r["weight_decay"] == wd]
            errs = [r["max_abs_error"] if r["max_abs_error"] is not None else math.inf for r in rs]
            print(f"| wd = {wd:g} | {sum(r['within_tol'] for r in rs)}/{len(rs)} | {statistics.median(errs):.2g} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
