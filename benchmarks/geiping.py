"""Benchmark of Geiping et al.'s attack ("Inverting Gradients") from a scenario file.

Base scenario ``scenarios/geiping_fedsgd_b1.toml``: untrained ConvNet, FedSGD (one local
step), embedded 32x32 photos, labels recovered from the update. For every batch size b the
scenario is re-run with ``training.batch_size = data.examples_per_client = b`` and clients
0, 1, ... attacked in turn (each holds different images) until ``--images`` images are
scored. Then the multi-step comparison on the same base: 2 examples, batch 2, 5 local
epochs (5 SGD steps), momentum 0.9, weight decay 5e-4 — the attack unrolling the local
training vs the naive one (Δ treated as one gradient), on the same updates.

Everything goes through the code a run uses (``fedsim.run.single_shot.observe_first_update``:
the real client training; ``adversary.runtime.execution.run_job``: attack + scoring).

    python benchmarks/geiping.py --images 4 --batch-sizes 1 4 8 --out geiping.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adversary.runtime.execution import plan_jobs, run_job  # noqa: E402
from adversary.runtime.registry import resolve_attack_params  # noqa: E402
from fedsim.data import load_data  # noqa: E402
from fedsim.scenario import Scenario  # noqa: E402
from fedsim.run.single_shot import observe_first_update  # noqa: E402
from fedsim.run.preparation import validate_scenario  # noqa: E402


def attack_clients(scenario: Scenario, images: int, device: torch.device, iterations: int | None) -> list[dict]:
    """Attack clients 0, 1, ... of ``scenario`` (round 1) until ``images`` images are scored."""
    splits = load_data(scenario.data, scenario.seed)
    params = resolve_attack_params(scenario.attack.attacks, scenario.attack.params, scenario.source)
    if iterations is not None:
        params = {name: replace(p, iterations=iterations) for name, p in params.items()}
    records = []
    per_client = scenario.data.examples_per_client
    for client in range(math.ceil(images / per_client)):
        observation, truth = observe_first_update(scenario, splits, client)
        for job in plan_jobs(scenario, params, observation, truth, 0):
            record = run_job(job, device, lpips=None).record
            if record.status != "ok":
                raise RuntimeError(f"attack failed: {record.error}")
            records.append(record.to_dict())
            print(f"  client {client}: PSNR {[round(p, 2) for p in record.psnr]} ({record.seconds:.0f} s)", flush=True)
    return records


def summarise(records: list[dict]) -> dict:
    psnrs = [p for r in records for p in r["psnr"]]
    return {"images": len(psnrs), "batches": len(records), "psnr_median": statistics.median(psnrs),
            "psnr_mean": statistics.fmean(psnrs), "psnr_min": min(psnrs),
            "ssim_mean": statistics.fmean(r["ssim_mean"] for r in records),
            "label_acc": statistics.fmean(r["label_acc"] for r in records),
            "iterations": records[0]["iterations"],
            "seconds_per_batch": statistics.fmean(r["seconds"] for r in records)}


def markdown(summary: dict[str, dict]) -> str:
    lines = ["| case | images | PSNR median (dB) | PSNR mean (dB) | PSNR min (dB) | SSIM mean | label acc | "
             "iterations | s / batch |", "|---|---|---|---|---|---|---|---|---|"]
    for name, s in summary.items():
        lines.append(f"| {name} | {s['images']} | {s['psnr_median']:.2f} | {s['psnr_mean']:.2f} | "
                     f"{s['psnr_min']:.2f} | {s['ssim_mean']:.3f} | {s['label_acc']:.2f} | {s['iterations']} | "
                     f"{s['seconds_per_batch']:.0f} |")
    return "\n".join(lines)


def variant(base: Scenario, batch_size: int, epochs: int = 1, momentum: float = 0.0, weight_decay: float = 0.0,
            multistep: str | None = None) -> Scenario:
    training = replace(base.training, batch_size=batch_size, epochs=epochs, max_steps=0 if epochs > 1 else 1,
                       momentum=momentum, weight_decay=weight_decay)
    data = replace(base.data, examples_per_client=batch_size)
    attack = base.attack
    if multistep is not None:
        tables = {name: {**attack.params.get(name, {}), "multistep": multistep} for name in attack.attacks}
        attack = replace(attack, params=tables)
    return replace(base, training=training, data=data, attack=attack)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenario", type=Path, default=ROOT / "scenarios" / "geiping_fedsgd_b1.toml")
    ap.add_argument("--images", type=int, default=4, help="images scored per case")
    ap.add_argument("--batch-sizes", type=int, nargs="*", default=[1, 4, 8])
    ap.add_argument("--iterations", type=int, default=None, help="override the scenario's Geiping iterations")
    ap.add_argument("--skip-multistep", action="store_true")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (more than the free cores makes OpenMP spin: much slower)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=None, help="JSON file, rewritten after every case")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    base = validate_scenario(args.scenario)
    result: dict = {"scenario": str(args.scenario), "machine": {
        "cpus": os.cpu_count(), "threads": args.threads, "torch": torch.__version__, "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None, "loadavg_start": os.getloadavg()},
        "runs": {}, "summary": {}}

    cases = [(f"FedSGD b={b}", variant(base, b)) for b in args.batch_sizes]
    if not args.skip_multistep:
        cases += [(f"5 steps, b=2, {mode}", variant(base, 2, epochs=5, momentum=0.9, weight_decay=5e-4,
                                                     multistep=mode)) for mode in ("unroll", "naive")]
    for name, scenario in cases:
        print(name, flush=True)
        result["runs"][name] = attack_clients(scenario, args.images, device, args.iterations)
        result["summary"][name] = summarise(result["runs"][name])
        if args.out is not None:
            result["machine"]["loadavg_now"] = os.getloadavg()
            args.out.write_text(json.dumps(result, indent=1))
    print(markdown(result["summary"]))
    return result


if __name__ == "__main__":
    main()
