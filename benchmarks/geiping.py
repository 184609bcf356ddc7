"""Benchmark of Geiping et al.'s attack ("Inverting Gradients") on the FedSGD ConvNet scenario.

Scenario: untrained ``fedsim.models.ConvNet`` (width 32 by default), embedded photos (32x32,
``fedsim.data``), one client step on one batch (FedSGD, Δ = −lr·∇L, BatchNorm in train mode as
the client trains), labels *recovered* from the update (not granted). For every batch size b the
attack reconstructs ceil(images / b) batches of b random training images; PSNR/SSIM are scored
on [0, 1] images after optimal matching (``adversary.metrics``).

Then the multi-step comparison: 2 examples, batch 2, 5 local epochs (5 SGD steps), momentum 0.9,
weight decay 5e-4 — the attack unrolling the local training vs the naive one (Δ as one gradient).

    python benchmarks/geiping.py --images 4 --batch-sizes 1 4 8 --iterations 2000 --out geiping.json

Writes the JSON after every attack (so a long run can be polled) and prints a markdown table.
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
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adversary.attacks.geiping import GeipingParams, run as geiping_run  # noqa: E402
from adversary.metrics import score_reconstruction  # noqa: E402
from adversary.observation import Observation  # noqa: E402
from adversary.registry import AttackContext  # noqa: E402
from fedsim.data import load_data  # noqa: E402
from fedsim.domain import DataDomain  # noqa: E402
from fedsim.models import build_model  # noqa: E402
from fedsim.scenario import DataSpec, ModelSpec, TrainingSpec  # noqa: E402
from fedsim.schedule import local_batches  # noqa: E402


def client_update(spec: ModelSpec, domain: DataDomain, x: torch.Tensor, y: torch.Tensor, training: TrainingSpec,
                  seed: int) -> Observation:
    """The client's local training (train-mode model, torch.optim.SGD, batch-mean cross-entropy),
    on a freshly initialised (untrained) model; returns what the server observes."""
    torch.manual_seed(seed)
    model = build_model(spec, domain.shape, domain.num_classes)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = local_batches(len(x), training.batch_size, training.epochs, training.max_steps)
    opt = torch.optim.SGD(model.parameters(), lr=training.lr, momentum=training.momentum,
                          weight_decay=training.weight_decay, nesterov=training.nesterov)
    model.train()
    for idx in batches:
        opt.zero_grad()
        F.cross_entropy(model(x[list(idx)]), y[list(idx)]).backward()
        opt.step()
    update = {k: v.detach() - before[k] for k, v in model.state_dict().items()}
    return Observation(1, 0, spec, domain, before, update, training, len(x), len(batches))


def attack_once(obs: Observation, x: torch.Tensor, y: torch.Tensor, params: GeipingParams, seed: int,
                device: torch.device) -> dict:
    start = time.perf_counter()
    rec = geiping_run(obs, params, AttackContext(device=device, seed=seed))
    seconds = time.perf_counter() - start
    dom = obs.domain
    scores = score_reconstruction(dom.to_unit(rec.inputs), dom.to_unit(x), rec.labels, y)
    return {"psnr": scores.psnr, "ssim": scores.ssim, "label_acc": scores.label_acc, "iterations": rec.iterations,
            "seconds": seconds, "objective": rec.objective, "mode": rec.extras["mode"]}


def summarise(runs: list[dict]) -> dict:
    psnrs = [p for r in runs for p in r["psnr"]]
    ssims = [s for r in runs for s in r["ssim"]]
    return {"images": len(psnrs), "batches": len(runs),
            "psnr_median": statistics.median(psnrs), "psnr_mean": statistics.fmean(psnrs),
            "psnr_min": min(psnrs), "ssim_mean": statistics.fmean(ssims),
            "label_acc": statistics.fmean(r["label_acc"] for r in runs),
            "iterations": runs[0]["iterations"], "seconds_per_batch": statistics.fmean(r["seconds"] for r in runs)}


def markdown(result: dict) -> str:
    lines = ["| case | images | PSNR median (dB) | PSNR mean (dB) | PSNR min (dB) | SSIM mean | label acc | "
             "iterations | s / batch |", "|---|---|---|---|---|---|---|---|---|"]
    for name, s in result["summary"].items():
        lines.append(f"| {name} | {s['images']} | {s['psnr_median']:.2f} | {s['psnr_mean']:.2f} | "
                     f"{s['psnr_min']:.2f} | {s['ssim_mean']:.3f} | {s['label_acc']:.2f} | {s['iterations']} | "
                     f"{s['seconds_per_batch']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=4, help="images per batch size (ceil(images/b) batches)")
    ap.add_argument("--batch-sizes", type=int, nargs="*", default=[1, 4, 8])
    ap.add_argument("--iterations", type=int, default=GeipingParams().iterations)
    ap.add_argument("--restarts", type=int, default=GeipingParams().restarts)
    ap.add_argument("--width", type=int, default=32, help="ConvNet base width")
    ap.add_argument("--lr", type=float, default=TrainingSpec().lr, help="client learning rate")
    ap.add_argument("--multistep-cases", type=int, default=None,
                    help="cases (of 2 images) in the multi-step comparison; default ceil(images/2), 0 = skip")
    ap.add_argument("--multistep-iterations", type=int, default=None, help="default: --iterations")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (more than the free cores makes OpenMP spin: much slower)")
    ap.add_argument("--device", default="cpu", help="device the attack runs on (cpu, cuda)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="JSON file (rewritten after every attack)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    data = load_data(DataSpec(), seed=args.seed)
    domain = data.domain
    spec = ModelSpec(name="convnet", width=args.width)
    params = replace(GeipingParams(), iterations=args.iterations, restarts=args.restarts)
    result: dict = {
        "config": {"model": asdict(spec), "data": "embedded_photos 32x32", "params": asdict(params),
                   "client_lr": args.lr, "seed": args.seed, "threads": args.threads, "device": args.device,
                   "labels": "recovered"},
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "platform": platform.platform(),
                    "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
                    "loadavg_start": os.getloadavg()},
        "runs": {}, "summary": {},
    }

    def save() -> None:
        if args.out is not None:
            result["machine"]["loadavg_now"] = os.getloadavg()
            result["table"] = markdown(result)
            args.out.write_text(json.dumps(result, indent=1))

    gen = torch.Generator().manual_seed(args.seed)
    for b in args.batch_sizes:
        name = f"FedSGD b={b}"
        runs = result["runs"].setdefault(name, [])
        for t in range(max(1, math.ceil(args.images / b))):
            idx = torch.randperm(len(data.train_y), generator=gen)[:b]
            x, y = data.train_x[idx], data.train_y[idx]
            obs = client_update(spec, domain, x, y, TrainingSpec(batch_size=b, lr=args.lr), seed=1000 * b + t)
            runs.append(attack_once(obs, x, y, params, seed=t, device=device) | {"indices": idx.tolist()})
            result["summary"][name] = summarise(runs)
            print(f"{name} batch {t}: PSNR {[round(p, 2) for p in runs[-1]['psnr']]} "
                  f"{runs[-1]['seconds']:.0f}s", flush=True)
            save()

    cases = math.ceil(args.images / 2) if args.multistep_cases is None else args.multistep_cases
    multistep = TrainingSpec(batch_size=2, epochs=5, lr=args.lr, momentum=0.9, weight_decay=5e-4)
    ms_params = replace(params, iterations=args.multistep_iterations or args.iterations)
    for t in range(cases):
        idx = torch.randperm(len(data.train_y), generator=gen)[:2]
        x, y = data.train_x[idx], data.train_y[idx]
        obs = client_update(spec, domain, x, y, multistep, seed=5000 + t)
        for mode in ("unroll", "naive"):
            name = f"5 steps, b=2, {mode}"
            runs = result["runs"].setdefault(name, [])
            runs.append(attack_once(obs, x, y, replace(ms_params, multistep=mode), seed=t,
                                     device=device) | {"indices": idx.tolist()})
            result["summary"][name] = summarise(runs)
            print(f"{name} case {t}: PSNR {[round(p, 2) for p in runs[-1]['psnr']]} "
                  f"{runs[-1]['seconds']:.0f}s", flush=True)
            save()
    result["machine"]["loadavg_end"] = os.getloadavg()
    save()
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
