"""Benchmark of GIML (Jeon et al., NeurIPS'21): how GIAS improves as the server meta-learns its
generator from the updates it observes, starting from an untrained one.

Base scenario ``scenarios/geiping_fedsgd_b1.toml`` with b images per client (FedSGD, untrained
ConvNet, 32x32 embedded photos). The meta-learner (:class:`adversary.priors.giml.MetaLearner`,
the code a run's GimlSink uses) takes the updates of clients ``--held-out`` .. in order; after
N of them (N in ``--curve``) GIAS (stage z/w, ``--evaluations`` objective evaluations) attacks
the updates of the held-out clients 0 .. held_out-1 — never learned from — with that generator.
N = 0 is GIAS with the untrained generator the learning starts from.

    python benchmarks/giml.py --curve 0 4 8 16 --out benchmarks/results/giml_cpu.json
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from geiping import variant  # noqa: E402
from adversary.attacks.giml import GimlParams  # noqa: E402
from adversary.priors.checkpoint import save_prior  # noqa: E402
from adversary.priors.giml import MetaLearner  # noqa: E402
from adversary.priors.training import untrained_generator  # noqa: E402
from adversary.runtime.execution import AttackJob, run_job  # noqa: E402
from fedsim.data import load_data  # noqa: E402
from fedsim.run.preparation import validate_scenario  # noqa: E402
from fedsim.run.single_shot import observe_first_update  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenario", type=Path, default=ROOT / "scenarios" / "geiping_fedsgd_b1.toml")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--curve", type=int, nargs="+", default=[0, 4, 8, 16], help="observed updates N")
    ap.add_argument("--held-out", type=int, default=2, help="held-out client updates scored per N")
    ap.add_argument("--evaluations", type=int, default=200, help="GIAS objective evaluations per attack")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="JSON file, rewritten after every point")
    ap.add_argument("--save", type=Path, default=None, metavar="DIR",
                    help="keep the generator after N updates as DIR/giml_after_N.pt (default: a temporary folder)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    base = variant(validate_scenario(args.scenario), args.batch_size)
    clients = args.held_out + max(args.curve)
    scenario = replace(base, federation=replace(base.federation, num_clients=clients))
    splits = load_data(scenario.data, scenario.seed)
    third = args.evaluations // 3
    params = GimlParams(latent_iterations=third, parameter_iterations=args.evaluations - third)
    learner = MetaLearner(untrained_generator(splits.domain.shape, params.latent_dim, params.width, seed=0),
                          params.settings(), seed=0, device=device)
    held_out = [observe_first_update(scenario, splits, c) for c in range(args.held_out)]
    result: dict = {"scenario": str(args.scenario), "batch_size": args.batch_size, "evaluations": args.evaluations,
                    "params": {k: getattr(params, k) for k in ("meta_latent_iterations", "inner_steps", "inner_lr",
                                                               "meta_lr", "latent_iterations", "parameter_iterations")},
                    "machine": {"cpus": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
                                "platform": platform.platform(), "loadavg_start": os.getloadavg()},
                    "tasks": [], "curve": []}
    folder = args.save if args.save is not None else Path(tempfile.mkdtemp(prefix="giml-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    learned = 0
    for n in sorted(args.curve):
        started = time.monotonic()
        while learned < n:
            observation, _ = observe_first_update(scenario, splits, args.held_out + learned)
            task = learner.learn(observation)
            result["tasks"].append({"n": learned + 1, **task.__dict__})
            learned += 1
        learn_seconds = time.monotonic() - started
        path = folder / f"giml_after_{n}.pt"
        save_prior(path, copy.deepcopy(learner.generator).cpu(), {"latent_dim": params.latent_dim, "width": params.width},
                   {"learned_from": f"{n} observed updates", "clients": f"{args.held_out} .. {args.held_out + n - 1}",
                    "batch_size": args.batch_size})
        records = []
        for k, (observation, truth) in enumerate(held_out):
            job = AttackJob(0, "giml", replace(params, generator=str(path)), observation, truth,
                            "none", scenario.attack.recovered_psnr, 3600.0, seed=k)
            record = run_job(job, device, lpips=None).record
            if record.status != "ok":
                raise RuntimeError(f"GIAS failed: {record.error}")
            records.append(record.to_dict())
        psnrs = [p for r in records for p in r["psnr"]]
        point = {"observed_updates": n, "psnr_mean": statistics.fmean(psnrs),
                 "ssim_mean": statistics.fmean(r["ssim_mean"] for r in records), "images": len(psnrs),
                 "learn_seconds": round(learn_seconds, 1),
                 "attack_seconds": round(statistics.fmean(r["seconds"] for r in records), 1), "records": records}
        result["curve"].append(point)
        print(f"N={n}: held-out PSNR mean {point['psnr_mean']:.2f} dB, SSIM {point['ssim_mean']:.3f} "
              f"(learning {learn_seconds:.0f} s)", flush=True)
        if args.out is not None:
            result["machine"]["loadavg_now"] = os.getloadavg()
            args.out.write_text(json.dumps(result, indent=1))
    print("| observed updates N | held-out PSNR mean (dB) | SSIM mean |\n|---|---|---|")
    for p in result["curve"]:
        print(f"| {p['observed_updates']} | {p['psnr_mean']:.2f} | {p['ssim_mean']:.3f} |")
    return result


if __name__ == "__main__":
    main()
