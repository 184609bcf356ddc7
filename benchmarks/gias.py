"""Benchmark of GIAS (Jeon et al., NeurIPS'21) against Geiping's attack on the same updates.

Base scenario ``scenarios/geiping_fedsgd_b1.toml`` (untrained ConvNet, embedded 32x32 photos,
labels recovered from the update). For every batch size b, clients 0 .. ``--batches``-1 (4 by
default) train once on b images (FedSGD: one step) and every method inverts the *same* observed
update with the same number of matching-objective evaluations E:

- GI-x: Geiping's attack (``geiping``), E pixel-search steps;
- GI-z: ``gias`` with stage "z", E latent-search steps through the auxiliary-trained prior;
- GI-w: ``gias`` with stage "w", E parameter-search steps from random latents;
- GI-z/w: ``gias`` with stage "z/w" (GIAS), E/3 latent + 2E/3 parameter-search steps;
- GI-z, GI-w, GI-z/w (untrained G): the same with an untrained DCGAN instead of the prior;
- GI-z, GI-w, GI-z/w (GIML G): the same with a generator GIML learned from other clients'
  updates (``--giml-prior``, e.g. ``benchmarks/giml.py --held-out 4 --save DIR``'s);
- GI-z, GI-w, GI-z/w (conditional G): the same with a class-conditional prior
  (``--conditional-prior``, ``fedsim train-prior --conditional``'s), at the recovered labels.

The paper's ablation rows (GI-w, the untrained and the GIML generator) run on the cases of
``--ablation-batch-sizes`` (b = 8 by default); ``--methods`` runs only the rows named.

Then a multi-step update (b images, batch b/2, 2 local epochs, momentum 0.9: 4 SGD steps, the
local training unrolled by every method). The prior is a ``fedsim train-prior`` checkpoint
(auxiliary data disjoint from the clients'); ``--prior`` trains one first if the file is missing.

Everything goes through the code a run uses (``observe_first_update``: the real client
training; ``run_job``: attack + scoring).

    python benchmarks/gias.py --prior scenarios/priors/embedded_photos_32.pt --out benchmarks/results/gias_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from geiping import variant  # noqa: E402
from adversary.attacks.geiping import GeipingParams  # noqa: E402
from adversary.attacks.gias import GiasParams  # noqa: E402
from adversary.priors.training import PriorTraining  # noqa: E402
from adversary.runtime.execution import AttackJob, run_job  # noqa: E402
from fedsim.data import load_data  # noqa: E402
from fedsim.run.preparation import validate_scenario  # noqa: E402
from fedsim.run.prior import train_prior_for  # noqa: E402
from fedsim.run.single_shot import observe_first_update  # noqa: E402
from fedsim.scenario import Scenario  # noqa: E402


#: the rows of the paper's ablation beyond GI-x, GI-z and GI-z/w with the trained prior
ABLATIONS = ("GI-w", "GI-z (untrained G)", "GI-w (untrained G)", "GI-z/w (untrained G)",
             "GI-z (GIML G)", "GI-w (GIML G)", "GI-z/w (GIML G)",
             "GI-z (conditional G)", "GI-w (conditional G)", "GI-z/w (conditional G)")


def methods(prior: Path, evaluations: int, ablations: bool, giml_prior: Path | None = None,
            conditional_prior: Path | None = None) -> dict[str, tuple[str, object]]:
    """Method name -> (attack, params), each spending ``evaluations`` objective evaluations;
    ``ablations``: also GI-w, the untrained-generator rows and, given ``giml_prior`` /
    ``conditional_prior``, the rows with that generator (:data:`ABLATIONS`)."""
    third = evaluations // 3
    stages = {"GI-z": GiasParams(stage="z", latent_iterations=evaluations),
              "GI-w": GiasParams(stage="w", parameter_iterations=evaluations),
              "GI-z/w": GiasParams(stage="z/w", latent_iterations=third, parameter_iterations=evaluations - third)}
    chosen: dict[str, tuple[str, object]] = {"GI-x": ("geiping", replace(GeipingParams(), iterations=evaluations))}
    for name, params in stages.items():
        chosen[name] = ("gias", replace(params, generator=str(prior)))
    for name, params in stages.items():
        chosen[f"{name} (untrained G)"] = ("gias", params)  # GiasParams' default generator: untrained
    for kind, path in (("GIML G", giml_prior), ("conditional G", conditional_prior)):
        if path is not None:
            for name, params in stages.items():
                chosen[f"{name} ({kind})"] = ("gias", replace(params, generator=str(path)))
    return {name: method for name, method in chosen.items() if ablations or name not in ABLATIONS}


def attack_case(scenario: Scenario, batches: int, chosen: dict[str, tuple[str, object]],
                device: torch.device) -> dict[str, list[dict]]:
    """Every method on the round-1 updates of clients 0 .. batches-1; method -> records."""
    splits = load_data(scenario.data, scenario.seed)
    records: dict[str, list[dict]] = {name: [] for name in chosen}
    for client in range(batches):
        observation, truth = observe_first_update(scenario, splits, client)
        for name, (attack, params) in chosen.items():
            job = AttackJob(0, attack, params, observation, truth, "none", scenario.attack.recovered_psnr,
                            3600.0, seed=client)
            record = run_job(job, device, lpips=None).record
            if record.status != "ok":
                raise RuntimeError(f"{name} failed: {record.error}")
            records[name].append(record.to_dict())
            print(f"  client {client} {name}: PSNR mean {record.psnr_mean:.2f} SSIM {record.ssim_mean:.3f} "
                  f"({record.seconds:.0f} s)", flush=True)
    return records


def summarise(records: list[dict]) -> dict:
    psnrs = [p for r in records for p in r["psnr"]]
    return {"updates": len(records), "images": len(psnrs), "psnr_mean": statistics.fmean(psnrs),
            "psnr_median": statistics.median(psnrs),
            "ssim_mean": statistics.fmean(r["ssim_mean"] for r in records),
            "label_acc": statistics.fmean(r["label_acc"] for r in records),
            "evaluations": records[0]["iterations"],
            "seconds_per_batch": statistics.fmean(r["seconds"] for r in records)}


def markdown(summary: dict[str, dict[str, dict]]) -> str:
    lines = ["| update | method | updates | images | PSNR mean (dB) | PSNR median (dB) | SSIM mean | label acc | "
             "evaluations | s / batch |", "|---|---|---|---|---|---|---|---|---|---|"]
    for case, by_method in summary.items():
        for name, s in by_method.items():
            lines.append(f"| {case} | {name} | {s['updates']} | {s['images']} | {s['psnr_mean']:.2f} | "
                         f"{s['psnr_median']:.2f} | "
                         f"{s['ssim_mean']:.3f} | {s['label_acc']:.2f} | {s['evaluations']} | "
                         f"{s['seconds_per_batch']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenario", type=Path, default=ROOT / "scenarios" / "geiping_fedsgd_b1.toml")
    ap.add_argument("--prior", type=Path, required=True, help="prior checkpoint (trained first if missing)")
    ap.add_argument("--prior-steps", type=int, default=PriorTraining().steps)
    ap.add_argument("--evaluations", type=int, default=300, help="objective evaluations per method")
    ap.add_argument("--batch-sizes", type=int, nargs="*", default=[8, 4])
    ap.add_argument("--batches", type=int, default=4, help="client updates per case (clients 0 .. batches-1)")
    ap.add_argument("--ablation-batch-sizes", type=int, nargs="*", default=[8],
                    help="FedSGD cases that also run GI-w and the untrained-generator rows")
    ap.add_argument("--multistep-batch", type=int, default=4, help="images of the multi-step update (0: skip)")
    ap.add_argument("--giml-prior", type=Path, default=None,
                    help="a generator GIML learned from other clients' updates: adds the (GIML G) ablation rows")
    ap.add_argument("--conditional-prior", type=Path, default=None,
                    help="a class-conditional prior (fedsim train-prior --conditional): adds the (conditional G) rows")
    ap.add_argument("--methods", nargs="*", default=None, help="run only these rows (e.g. 'GI-z/w (GIML G)')")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=None, help="JSON file, rewritten after every case")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if not args.prior.exists():
        print(f"training the prior {args.prior} ({args.prior_steps} steps)", flush=True)
        train_prior_for(args.scenario, args.prior, PriorTraining(steps=args.prior_steps), 2000, show_progress=False)
    base = validate_scenario(args.scenario)
    result: dict = {"scenario": str(args.scenario), "prior": str(args.prior), "evaluations": args.evaluations,
                    "giml_prior": None if args.giml_prior is None else str(args.giml_prior),
                    "conditional_prior": None if args.conditional_prior is None else str(args.conditional_prior),
                    "machine": {"cpus": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
                                "platform": platform.platform(), "loadavg_start": os.getloadavg()},
                    "runs": {}, "summary": {}}
    cases = [(f"FedSGD b={b}", variant(base, b), b in args.ablation_batch_sizes) for b in args.batch_sizes]
    if args.multistep_batch:
        b = args.multistep_batch
        cases.append((f"{b} images, batch {b // 2}, 2 epochs, momentum 0.9", multistep_variant(base, b), False))
    for name, scenario, ablations in cases:
        print(name, flush=True)
        chosen = {name: method for name, method in methods(args.prior, args.evaluations, ablations,
                                                           args.giml_prior, args.conditional_prior).items()
                  if args.methods is None or name in args.methods}
        if not chosen:
            continue
        result["runs"][name] = attack_case(scenario, args.batches, chosen, device)
        result["summary"][name] = {m: summarise(r) for m, r in result["runs"][name].items()}
        if args.out is not None:
            result["machine"]["loadavg_now"] = os.getloadavg()
            args.out.write_text(json.dumps(result, indent=1))
    print(markdown(result["summary"]))
    return result


def multistep_variant(base: Scenario, images: int) -> Scenario:
    """``images`` examples, batch images/2, 2 local epochs (4 SGD steps), momentum 0.9."""
    scenario = variant(base, images // 2, epochs=2, momentum=0.9)
    return replace(scenario, data=replace(scenario.data, examples_per_client=images))


if __name__ == "__main__":
    main()
