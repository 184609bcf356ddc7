"""The ``fedsim`` command line.

``fedsim run SCENARIO [--out DIR]``     run the federation (and its attack plan)
``fedsim attack SCENARIO [--out DIR]``  single shot: attack one update at round 1, print leakage
``fedsim validate SCENARIO``            check a scenario file and exit
Bad input exits with status 2 and one line naming the file and the key.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from fedsim.config import ScenarioError
from fedsim.run.tables import leakage_table, rounds_table


class UserError(Exception):
    """An error caused by the user's input; printed as one line, no traceback."""


def cmd_run(args: argparse.Namespace) -> int:
    from fedsim.rundir import LEAKAGE, ROUNDS
    from fedsim.run.simulation import run_scenario

    setup = run_scenario(args.scenario, args.out, args.ray_address, show_progress=not args.quiet,
                         verbose=args.verbose)
    records = setup.run_dir.read(ROUNDS)
    print(f"\nScenario {setup.scenario.name} ({setup.scenario.source}) -> {setup.run_dir.path}")
    print(rounds_table(records))
    leakage = setup.run_dir.read(LEAKAGE)
    if leakage:
        print("\nLeakage (PSNR/SSIM/LPIPS after optimal matching; recovered = share of images >= "
              f"{setup.scenario.attack.recovered_psnr:g} dB)")
        print(leakage_table(leakage))
    if len(records) != setup.scenario.federation.rounds:
        print(f"fedsim: error: only {len(records)} of {setup.scenario.federation.rounds} rounds completed",
              file=sys.stderr)
        return 1
    return 0


def cmd_attack(args: argparse.Namespace) -> int:
    from fedsim.run.single_shot import attack_once

    setup, records = attack_once(args.scenario, args.out, show_progress=not args.quiet)
    print(f"\nScenario {setup.scenario.name} ({setup.scenario.source}) -> {setup.run_dir.path}")
    print(leakage_table(records))
    return 0 if all(r["status"] == "ok" for r in records) else 1


def cmd_validate(args: argparse.Namespace) -> int:
    from fedsim.run.preparation import validate_scenario

    scenario = validate_scenario(args.scenario)
    print(f"{args.scenario}: ok ({scenario.name})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedsim", description=__doc__.splitlines()[0])
    parser.add_argument("--verbose", action="store_true", help="show Flower/Ray logs")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a scenario")
    run.add_argument("scenario", type=Path)
    run.add_argument("--out", type=Path, default=None, help="run directory (default runs/NAME-TIMESTAMP)")
    run.add_argument("--ray-address", default=None, help="join an existing Ray cluster")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.set_defaults(func=cmd_run)
    attack = sub.add_parser("attack", help="single shot: attack one client update at round 1 and exit")
    attack.add_argument("scenario", type=Path)
    attack.add_argument("--out", type=Path, default=None, help="run directory (default runs/NAME-TIMESTAMP)")
    attack.add_argument("--quiet", action="store_true", help="no progress bars")
    attack.set_defaults(func=cmd_attack)
    val = sub.add_parser("validate", help="check a scenario file")
    val.add_argument("scenario", type=Path)
    val.set_defaults(func=cmd_validate)
    return parser


def _one_line_warning(message, category, filename, lineno, line=None) -> str:  # noqa: ANN001
    return f"fedsim: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.formatwarning = _one_line_warning
    from fedsim.data import DataError
    from fedsim.rundir import RunDirectoryError

    try:
        return args.func(args)
    except (ScenarioError, UserError, DataError, RunDirectoryError) as exc:
        print(f"fedsim: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedsim: interrupted; records written so far are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
