"""Benchmark SPEAR (adversary/attacks/spear/) on the realistic single-gradient setting.

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

``--fedavg`` adds the FedAvg sweep (``scenarios/spear_fedavg.toml``: 8 images per client,
full-batch local epochs K with momentum and weight decay): SPEAR, SPEAR + refinement with the
unrolled-training objective, and Geiping with unrolling, on the same updates, per K and lr:

    python benchmarks/spear.py --sizes --fedavg --lrs 0.01 0.1 --clients 8 --geiping-iterations 1000
    python benchmarks/spear.py --sizes --fedavg --batch-size 4 --lrs 0.01 0.1 --clients 4 --geiping-iterations 1000

``--guided`` runs the prior-guided search instead (``guide = "geiping"``): the same batches
through an MLP 3072 -> ``--hidden`` -> 10, a FedSGD observation (Δ = −lr·∇, lr 0.1), Geiping
(``--guide-iterations``) on it for the guide, then SPEAR with the rest of ``--budget``. Each run
also records, from the ground truth (evaluation only), the guide's PSNR, the sign accuracy p of
its predicted pre-activations, and the hit rate of guided draws (share of 1,000 draws per guide
example whose b − 1 rows all lie inside some example's true zero set):

    python benchmarks/spear.py --guided --sizes 25 --batches 10 --budget 120 --out spear_guided_b25.json
    python benchmarks/spear.py --guided --sizes 50 --batches 3 --budget 600 --out spear_guided_b50.json
    python benchmarks/spear.py --guided --sizes 100 --hidden 1024 --batches 1 --budget 900 --out spear_guided_b100.json

``--features`` runs SPEAR as a seed for images on a conv model's head
(``scenarios/spear_convnet_features.toml``) against Geiping; ``--spear-only`` skips the
baselines in both modes.
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
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from scipy.special import gammaln

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adversary.attacks.base import AttackContext  # noqa: E402
from adversary.attacks.spear import SpearParams, spear_invert_linear  # noqa: E402
from adversary.attacks.spear.attack import guide_images  # noqa: E402
from adversary.attacks.spear.guide import Guide, GuidedSampler, predicted_preactivations  # noqa: E402
from adversary.attacks.spear.problem import Problem  # noqa: E402
from adversary.observation import Observation  # noqa: E402
from adversary.scoring.metrics import psnr  # noqa: E402
from adversary.runtime.execution import plan_jobs, run_job  # noqa: E402
from adversary.runtime.registry import resolve_attack_params  # noqa: E402
from fedsim.data import load_data  # noqa: E402
from fedsim.models import MLP  # noqa: E402
from fedsim.scenario import DataSpec, ModelSpec, Scenario, TrainingSpec  # noqa: E402
from fedsim.run.single_shot import observe_first_update  # noqa: E402
from fedsim.run.preparation import validate_scenario  # noqa: E402

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


def fedsgd_observation(model: MLP, hidden: int, x: torch.Tensor, y: torch.Tensor, domain,
                       lr: float = 0.1) -> Observation:
    """What the server sees of one FedSGD step of ``model`` on (x, y): Δ = −lr·∇ (float32)."""
    names = [k for k, _ in model.named_parameters()]
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    update = {k: (-lr * g).detach() for k, g in zip(names, grads)}
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return Observation(1, 0, ModelSpec(name="mlp", hidden=(hidden,)), domain, state, update,
                       TrainingSpec(batch_size=len(x), max_steps=1, lr=lr, shuffle=False), len(x), 1)


def guide_quality(x: torch.Tensor, guide: Guide, gw: torch.Tensor, gb: torch.Tensor, params: SpearParams,
                  domain, draws: int = 1000) -> dict:
    """Evaluation only (ground truth ``x``): the guide's median PSNR and the sign accuracy p of its
    predicted pre-activations (guide matched to the truth, live neurons), and the hit rate of
    ``draws`` guided draws per guide example (all b − 1 rows inside some true zero set)."""
    b = len(x)
    G = gw.double()
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    prob = Problem(G, gb, b, guide.weight, guide.bias, U, S, Vh, params)
    truth = x.double().flatten(1)
    rows, cols = linear_sum_assignment(torch.cdist(guide.inputs.double().flatten(1), truth).numpy())
    W, bias = guide.weight.double(), guide.bias.double()
    z_true = (truth @ W.T + bias)[:, prob.live_idx]  # (b, m_live)
    z_pred = predicted_preactivations(prob, guide)[:, prob.live_idx]
    p = float(((z_pred[rows] <= 0) == (z_true[cols] <= 0)).double().mean())
    guide_img = guide.inputs.reshape(-1, *x.shape[1:]).float()
    guide_psnr = float(psnr(domain.to_unit(guide_img[rows]), domain.to_unit(x[cols])).median())
    sampler = GuidedSampler(prob, guide, draws, seed=0)
    inactive = (z_true <= 0).double()  # (b, m_live)
    hit_rates = []
    for j in range(len(guide.inputs)):
        drawn = sampler.sample(torch.full((draws,), j, dtype=torch.long))  # (draws, b-1)
        inside = (inactive[:, drawn].sum(2) >= b - 1).any(0)  # inside some Z_i
        hit_rates.append(float(inside.double().mean()))
    hr = torch.tensor(hit_rates)
    return {"guide_psnr": guide_psnr, "sign_accuracy": p, "hit_rate_median": float(hr.median()),
            "hit_rate_min": float(hr.min()), "examples_with_hits": int((hr > 0).sum()),
            "uniform_hit_rate_half_rule": b * 0.5 ** (b - 1)}


def guided_batch(splits, b: int, seed: int, budget: float, hidden: int, guide_iterations: int,
                 active_zeros: int, device: str = "cpu") -> dict:
    """The batch of ``one_batch`` (same photos, same seed) through MLP 3072 -> hidden -> 10,
    inverted with a Geiping guide; the guide's time counts against ``budget``."""
    idx = torch.randperm(len(splits.train_x), generator=torch.Generator().manual_seed(seed))[:b]
    x, y = splits.train_x[idx], splits.train_y[idx]
    torch.manual_seed(seed)
    model = MLP(3 * 32 * 32, 10, (hidden,))
    layer = model.layers[0]
    obs = fedsgd_observation(model, hidden, x, y, splits.domain)
    params = SpearParams(guide="geiping", guide_iterations=guide_iterations, time_budget_s=budget,
                         active_zeros=active_zeros)
    started = time.monotonic()
    images, note = guide_images(obs, params, AttackContext(seed=seed, deadline=started + budget))
    guide = Guide(images.flatten(1), layer.weight.detach(), layer.bias.detach())
    gw, gb = -obs.update["layers.0.weight"] / 0.1, -obs.update["layers.0.bias"] / 0.1
    left = max(1.0, budget - (time.monotonic() - started))
    res = spear_invert_linear(gw, gb, weight=layer.weight.detach(), bias=layer.bias.detach(), seed=seed,
                              params=replace(params, time_budget_s=left), device=device, guide=guide,
                              next_weight=model.layers[2].weight.detach())
    seconds = time.monotonic() - started
    err = matched_error(res.X, x)
    return {"b": b, "seed": seed, "hidden": hidden, **res.summary(), **note, "seconds": round(seconds, 3),
            "search_seconds": round(res.seconds, 3), "max_abs_error": err if math.isfinite(err) else None,
            "exact_verified": bool(res.status == "exact" and err <= EXACT_TOL),
            **guide_quality(x, guide, gw, gb, params, splits.domain)}


def compare_on_clients(scenario: Scenario, params: dict, clients: int, device: str, tags: dict,
                       on_record, with_baselines: bool = True) -> None:
    """SPEAR without and with its image stage (refinement / feature fit as the scenario's
    ``[attack.spear]`` says), and the scenario's other attacks, on the round-1 updates of
    clients 0..clients-1 (real client training; attacks and scoring by ``run_job``)."""
    if clients > scenario.federation.num_clients:
        raise SystemExit(f"{scenario.source}: --clients {clients} exceeds federation.num_clients "
                         f"({scenario.federation.num_clients})")
    splits = load_data(scenario.data, scenario.seed)
    for client in range(clients):
        observation, truth = observe_first_update(scenario, splits, client)
        jobs = plan_jobs(scenario, params, observation, truth, 0)
        spear_job = next(j for j in jobs if j.attack == "spear")
        bare = replace(spear_job.params, refine_iterations=0, feature_fit_iterations=0)
        variants = [("spear", replace(spear_job, params=bare)), ("spear+images", spear_job)]
        if with_baselines:
            variants += [(j.attack, j) for j in jobs if j.attack != "spear"]
        for label, job in variants:
            outcome = run_job(job, torch.device(device), lpips=None)
            record = outcome.record.to_dict()
            psnr = record["psnr"] or [None] * len(truth.inputs)  # nothing recovered
            on_record({**tags, "method": label, "client": client, "status": record["status"],
                       "attack_status": record["extras"].get("status"), "psnr": psnr,
                       "psnr_mean": record["psnr_mean"], "label_acc": record["label_acc"],
                       "iterations": record["iterations"], "seconds": record["seconds"], "error": record["error"],
                       "extras": record["extras"], "exact_images": exact_images(outcome, observation.domain)})


def local_steps_variant(base: Scenario, steps: int, lr: float, batch_size: int = 0) -> Scenario:
    """``base`` with exactly ``steps`` local steps of batch ``batch_size`` (0: the scenario's) at
    ``lr``: as many epochs over the client's examples as the steps need, capped at ``steps``."""
    batch = batch_size or base.training.batch_size
    per_epoch = math.ceil(base.data.examples_per_client / batch)
    training = replace(base.training, batch_size=batch, lr=lr, epochs=math.ceil(steps / per_epoch), max_steps=steps)
    return replace(base, training=training)


def scenario_params(path: Path, geiping_iterations: int | None) -> tuple[Scenario, dict]:
    scenario = validate_scenario(path)
    params = resolve_attack_params(scenario.attack.attacks, scenario.attack.params, scenario.source)
    if geiping_iterations is not None:
        params["geiping"] = replace(params["geiping"], iterations=geiping_iterations)
    return scenario, params


def exact_images(outcome, domain) -> int:
    """Images recovered within EXACT_TOL (max abs, normalised space) after the scorer's matching."""
    if outcome.recon_unit is None:
        return 0
    err = (domain.normalise(outcome.recon_unit) - domain.normalise(outcome.truth_unit)).abs().flatten(1).amax(1)
    return int((err <= EXACT_TOL).sum())


def comparison_table(records: list[dict], keys: tuple[str, ...]) -> str:
    """One row per value of ``keys``, one cell per method: median PSNR over all images (an image
    an attack did not return counts as 0 dB) and the exact images."""
    methods = list(dict.fromkeys(r["method"] for r in records))
    lines = ["| " + " | ".join(keys) + " | " + " | ".join(f"{m}: median PSNR (exact)" for m in methods) + " |",
             "|" + "---|" * (len(keys) + len(methods))]
    for key in dict.fromkeys(tuple(r[k] for k in keys) for r in records):
        cells = []
        for m in methods:
            rs = [r for r in records if r["method"] == m and tuple(r[k] for k in keys) == key]
            psnrs = [p if p is not None else 0.0 for r in rs for p in r["psnr"]]
            cells.append(f"{statistics.median(psnrs):.1f} dB ({sum(r['exact_images'] for r in rs)}/{len(psnrs)})")
        lines.append("| " + " | ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in key) + " | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def summarise(runs: list[dict], batches: int) -> list[dict]:
    out = []
    for b in sorted({r["b"] for r in runs}):
        rs = [r for r in runs if r["b"] == b]
        secs = [r["seconds"] for r in rs]
        row = {
            "b": b, "batches": len(rs), "exact": sum(r["exact_verified"] for r in rs),
            "median_s": statistics.median(secs), "max_s": max(secs),
            "median_samples": statistics.median(r["samples"] for r in rs),
            "half_rule_expected": half_rule_expectation(b),
            "endgame_used": sum(bool(r["endgame_used"]) for r in rs),
            "worst_error_exact": max((r["max_abs_error"] for r in rs if r["exact_verified"]), default=None),
        }
        if "guide" in rs[0]:
            row.update({key: statistics.median(r[key] for r in rs) for key in GUIDE_KEYS})
            row["median_s_exact"] = statistics.median([r["seconds"] for r in rs if r["exact_verified"]] or [math.nan])
        else:
            row["median_uniform_expected"] = statistics.median(r["uniform_expected_samples"] for r in rs)
        out.append(row)
    return out


GUIDE_KEYS = ("hidden", "guide_seconds", "guide_psnr", "sign_accuracy", "hit_rate_median", "hit_rate_min",
              "guided_samples", "directions_found")


def markdown_table(header: list[str], rows: list[str], note: str) -> str:
    """A markdown table from a header's cells and ready-made row lines, then a note."""
    return "\n".join([f"| {' | '.join(header)} |", "|" + "---|" * len(header), *rows, f"\n{note}"])


def guided_table(summary: list[dict], budget: float) -> str:
    header = ["b", "hidden", "exact", "median s (guide s)", "max s", "guide PSNR dB", "sign accuracy p",
              "guided-draw hit rate: median (min) example", "uniform draw: b 2^-(b-1)", "median samples (guided)"]
    rows = [f"| {s['b']} | {int(s['hidden'])} | {s['exact']}/{s['batches']} | {s['median_s']:.1f} ({s['guide_seconds']:.1f}) | "
            f"{s['max_s']:.1f} | {s['guide_psnr']:.1f} | {s['sign_accuracy']:.3f} | {s['hit_rate_median']:.2g} "
            f"({s['hit_rate_min']:.2g}) | {s['b'] * 0.5 ** (s['b'] - 1):.2g} | {s['median_samples']:.3g} "
            f"({s['guided_samples']:.3g}) |" for s in summary]
    return markdown_table(header, rows, f"Budget {budget:.0f} s per batch including the guide (medians over batches); "
                                        "a failed batch counts with the time it used.")


def table(summary: list[dict], budget: float) -> str:
    header = ["b", "exact", "median s", "max s", "median samples", "uniform sampler, expected (actual zeros)",
              "(1/2)^(b-1) rule: H_b 2^(b-1)", "endgame used"]
    rows = [f"| {s['b']} | {s['exact']}/{s['batches']} | {s['median_s']:.1f} | {s['max_s']:.1f} | "
            f"{s['median_samples']:.3g} | {s['median_uniform_expected']:.3g} | {s['half_rule_expected']:.3g} | "
            f"{s['endgame_used']}/{s['batches']} |" for s in summary]
    return markdown_table(header, rows, f"Budget {budget:.0f} s per batch; a failed batch counts with the time it used.")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=[8, 16, 20, 25], help="FedSGD batch sizes (none: skip)")
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + batches - 1")
    ap.add_argument("--budget", type=float, default=120.0, help="seconds per batch")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: with other jobs on the cores, more threads are much slower)")
    ap.add_argument("--guided", action="store_true", help="FedSGD sizes with a Geiping guide (guide = 'geiping')")
    ap.add_argument("--hidden", type=int, default=256, help="guided: hidden width of the MLP (b must stay below it)")
    ap.add_argument("--guide-iterations", type=int, default=500, help="guided: Geiping steps of the guide")
    ap.add_argument("--active-zeros", type=int, default=2, help="guided: SpearParams.active_zeros")
    ap.add_argument("--fedavg", action="store_true", help="also run the FedAvg sweep (scenarios/spear_fedavg.toml)")
    ap.add_argument("--fedavg-scenario", type=Path, default=ROOT / "scenarios" / "spear_fedavg.toml")
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 2, 5, 10], help="FedAvg: local steps K (full-batch epochs)")
    ap.add_argument("--lrs", type=float, nargs="+", default=[0.01, 0.1], help="FedAvg: local learning rates")
    ap.add_argument("--batch-size", type=int, default=0, help="FedAvg: local batch size (0: the scenario's full batch)")
    ap.add_argument("--clients", type=int, default=3, help="FedAvg / features: clients attacked per setting")
    ap.add_argument("--features", action="store_true", help="also run SPEAR as a seed for images from a conv model's features")
    ap.add_argument("--features-scenario", type=Path, default=ROOT / "scenarios" / "spear_convnet_features.toml")
    ap.add_argument("--geiping-iterations", type=int, default=None, help="override the scenarios' Geiping iterations")
    ap.add_argument("--spear-only", action="store_true", help="FedAvg / features: skip the scenarios' other attacks")
    ap.add_argument("--device", default="cpu", help="where the search runs (cpu, cuda)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--machine-note", default="shared machine: other jobs ran concurrently, timings are indicative",
                    help="how the machine was shared while this ran (recorded in the JSON)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "torch": torch.__version__, "cuda": torch.cuda.is_available(),
               "note": args.machine_note}
    runs: list[dict] = []
    fed: list[dict] = []
    setting = (f"MLP 3x32x32-{args.hidden}-ReLU-10, default init, FedSGD (lr 0.1), batch-mean CE, embedded photos, "
               f"guide: Geiping {args.guide_iterations} steps, active_zeros {args.active_zeros}" if args.guided else
               "MLP 3x32x32-256-ReLU-10, default init, FedSGD, batch-mean CE, embedded photos")
    report = {"machine": machine, "setting": setting,
              "budget_s": args.budget, "runs": runs, "fedavg": fed}

    def save() -> None:
        if args.out:
            report["summary"] = summarise(runs, args.batches) if runs else []
            args.out.write_text(json.dumps(report, indent=1))

    if args.sizes:
        splits = load_data(DataSpec(), 0)
    for b in args.sizes:
        for seed in range(args.first_seed, args.first_seed + args.batches):
            if args.guided:
                r = guided_batch(splits, b, seed, args.budget, args.hidden, args.guide_iterations, args.active_zeros,
                                 args.device)
            else:
                r = one_batch(splits.train_x, splits.train_y, b, seed, args.budget, args.device)
            runs.append(r)
            guided = (f" guide {r['guide_seconds']:.1f}s PSNR {r['guide_psnr']:.1f} p={r['sign_accuracy']:.3f} "
                      f"hits {r['hit_rate_median']:.3g} (min {r['hit_rate_min']:.2g}) guided={r['guided_samples']:.3g} "
                      f"found={r['directions_found']}" if args.guided else "")
            print(f"b={b} seed={seed}: {r['status']} {r['seconds']:.1f}s samples={r['samples']:.3g} "
                  f"err={r['max_abs_error']}{guided}", flush=True)
            save()
    def on_record(row: dict) -> None:
        fed.append(row)
        psnr = statistics.median(p or 0.0 for p in row["psnr"])
        setting = ", ".join(f"{k}={row[k]}" for k in ("scenario", "batch", "lr", "steps") if k in row)
        print(f"{setting} client {row['client']} {row['method']}: {row['attack_status'] or row['status']} "
              f"PSNR median {psnr:.1f} exact {row['exact_images']} ({row['seconds']} s)", flush=True)
        save()

    if args.fedavg:
        base, params = scenario_params(args.fedavg_scenario, args.geiping_iterations)
        for lr in args.lrs:
            for k in args.steps:
                compare_on_clients(local_steps_variant(base, k, lr, args.batch_size), params, args.clients,
                                   args.device, {"scenario": base.name, "batch": args.batch_size or
                                                 base.training.batch_size, "lr": lr, "steps": k}, on_record,
                                   not args.spear_only)
    if args.features:
        base, params = scenario_params(args.features_scenario, args.geiping_iterations)
        compare_on_clients(base, params, args.clients, args.device, {"scenario": base.name}, on_record,
                           not args.spear_only)
    save()
    if runs:
        print()
        print((guided_table if args.guided else table)(summarise(runs, args.batches), args.budget))
        print(f"\nMachine: {machine['cpus']} CPUs, torch threads {machine['torch_threads']}, {machine['platform']}; {machine['note']}.")
    for name in dict.fromkeys(r["scenario"] for r in fed):
        rows = [r for r in fed if r["scenario"] == name]
        print(f"\n{name}\n" + comparison_table(rows, ("batch", "lr", "steps") if "steps" in rows[0] else ("scenario",)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
