"""The privacy–utility benchmark of the defenses, through ``fedsim sweep``.

Base scenario ``scenarios/defenses_benchmark.toml``: an MLP 3072 → 256 → 10, 20 Dirichlet(0.5)
clients with 4 photos each, full-batch local SGD for 3 epochs (momentum 0.9, weight decay 5e-4),
10 rounds; the server attacks every round-1 update it picks (``attack.clients``) with Geiping
(unrolled) and SPEAR (checked by replaying the local training). Every setting runs on the
same seed, so the attacked round-1 updates differ only by the defense (central DP acts after
the tap: its round-1 updates are those of no defense).

Part ``tradeoff`` — one run per defense setting: utility = mean test accuracy of the last three
rounds (the last round alone swings by ±0.1 on this small federation), as a ratio to no
defense; leakage = mean PSNR per attack over its jobs (a SPEAR job that returned no batch
counts as 0 dB: nothing leaked) and the share of SPEAR jobs that were exact; final ε where
accounted. Part ``bayes`` — the same updates under Laplace noise and under top-k pruning +
Gaussian noise, attacked by Geiping with the cosine objective and with the defense's
likelihood (``loss = "bayes"``, the attacker knows the defense).

    python benchmarks/defenses.py --part tradeoff --runs /tmp/defenses --out benchmarks/results/defenses_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedsim.run.sweep import run_sweep  # noqa: E402
from fedsim.rundir import LEAKAGE, ROUNDS, RunDirectory  # noqa: E402

# (defenses, --param strings): each group is one sweep; settings are named after what changed
TRADEOFF = [
    (["none", "outpost", "soteria"], []),
    (["dp_local"], ["defense.clip_norm=1.0", "defense.noise_multiplier=0.001,0.01"]),
    (["dp_central"], ["defense.clip_norm=1.0", "defense.noise_multiplier=0.01"]),
    (["dp_sgd"], ["defense.clip_norm=1.0", "defense.noise_multiplier=0.05"]),
    (["topk"], ["defense.percent=1,10"]),
    (["laplace"], ["defense.scale=0.001"]),
]
BAYES = [
    (["laplace"], ["defense.scale=0.001", "attack.knows_defense=true", "attack.geiping.loss=cosine,bayes"]),
    (["topk"], ["defense.percent=10", "defense.noise_std=0.001", "attack.knows_defense=true",
                "attack.geiping.loss=cosine,bayes"]),
]


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def measure(run_dir: Path) -> dict:
    """Utility and leakage of one run directory (see the module docstring)."""
    directory = RunDirectory(run_dir)
    rounds = directory.read(ROUNDS)
    leakage = directory.read(LEAKAGE)
    accuracies = [r["test_accuracy"] for r in rounds[-3:] if r["test_accuracy"] is not None]
    out = {"rounds": len(rounds), "accuracy_last3": mean(accuracies),
           "final_accuracy": rounds[-1]["test_accuracy"] if rounds else None,
           "epsilon": rounds[-1].get("epsilon") if rounds else None}
    for attack in sorted({r["attack"] for r in leakage}):
        jobs = [r for r in leakage if r["attack"] == attack]
        psnr = [r["psnr_mean"] if r["psnr_mean"] is not None else 0.0 for r in jobs]
        out[attack] = {"jobs": len(jobs), "psnr_mean": mean(psnr), "psnr_per_job": psnr,
                       "recovered_share": mean([r["recovered_share"] or 0.0 for r in jobs]),
                       "exact_share": mean([float(r["extras"].get("status") in ("exact", "consistent")
                                                  and (r["psnr_mean"] or 0.0) > 100) for r in jobs])}
    return out


def run_part(groups: list, scenario: Path, runs: Path) -> dict[str, dict]:
    results = {}
    for defenses, params in groups:
        for row in run_sweep(scenario, defenses, params, 1, runs, show_progress=True):
            results[row["setting"]] = {"defense": row["defense.name"], **measure(runs / row["setting"]),
                                       "status": row["status"]}
            print(f"{row['setting']}: {json.dumps(results[row['setting']], default=str)[:300]}", flush=True)
    return results


def fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def tradeoff_table(results: dict[str, dict]) -> str:
    base = results["none_seed-0"]
    lines = ["| setting | accuracy (last 3 rounds) | ratio to none | Geiping PSNR (dB) | Δ vs none | SPEAR PSNR (dB) "
             "| Δ vs none | SPEAR exact | ε |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        g, s = r.get("geiping", {}), r.get("spear", {})
        ratio = r["accuracy_last3"] / base["accuracy_last3"] if r["accuracy_last3"] is not None else None
        dg = g.get("psnr_mean") - base["geiping"]["psnr_mean"] if g.get("psnr_mean") is not None else None
        ds = s.get("psnr_mean") - base["spear"]["psnr_mean"] if s.get("psnr_mean") is not None else None
        lines.append(f"| {name.removesuffix('_seed-0')} | {fmt(r['accuracy_last3'], '.3f')} | {fmt(ratio, '.2f')} "
                     f"| {fmt(g.get('psnr_mean'), '.1f')} | {fmt(dg, '+.1f')} | {fmt(s.get('psnr_mean'), '.1f')} "
                     f"| {fmt(ds, '+.1f')} | {fmt(s.get('exact_share'), '.0%')} | {fmt(r['epsilon'], '.3g')} |")
    return "\n".join(lines)


def ordering(results: dict[str, dict]) -> list[str]:
    """The required ordering, checked: every defense but central DP lowers mean leakage PSNR
    (Geiping and SPEAR) relative to none; central DP leaves it unchanged."""
    base = results["none_seed-0"]
    verdicts = []
    for name, r in results.items():
        if name == "none_seed-0":
            continue
        for attack in ("geiping", "spear"):
            ours, ref = r[attack]["psnr_mean"], base[attack]["psnr_mean"]
            if r["defense"] == "dp_central":
                ok = abs(ours - ref) <= 0.5
                verdicts.append(f"{'ok ' if ok else 'NOT'} {name} {attack}: {ours:.2f} vs none {ref:.2f} (within 0.5 dB)")
            else:
                verdicts.append(f"{'ok ' if ours < ref else 'NOT'} {name} {attack}: {ours:.2f} < none {ref:.2f}")
    return verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", type=Path, default=ROOT / "scenarios" / "defenses_benchmark.toml")
    parser.add_argument("--part", choices=("tradeoff", "bayes", "all"), default="all")
    parser.add_argument("--runs", type=Path, required=True, help="folder for the run directories (must be new)")
    parser.add_argument("--out", type=Path, default=None, help="JSON file of the results (merged by part)")
    args = parser.parse_args()
    previous = json.loads(args.out.read_text()) if args.out and args.out.exists() else {}
    results = dict(previous, machine={"cpus": os.cpu_count(), "platform": platform.platform(),
                                      "scenario": str(args.scenario.relative_to(ROOT))})
    if args.part in ("tradeoff", "all"):
        results["tradeoff"] = run_part(TRADEOFF, args.scenario, args.runs)
        print(tradeoff_table(results["tradeoff"]))
        print("\n".join(ordering(results["tradeoff"])))
    if args.part in ("bayes", "all"):
        results["bayes"] = run_part(BAYES, args.scenario, args.runs)
        for name, r in results["bayes"].items():
            print(f"{name}: Geiping mean PSNR {fmt(r['geiping']['psnr_mean'], '.2f')} dB over {r['geiping']['jobs']} updates")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
