"""The ``fedsim`` command line.

``fedsim run SCENARIO [--out DIR]``     run the federation (and its attack plan); ``--resume RUN_DIR`` continues one
``fedsim attack SCENARIO [--out DIR]``  single shot: attack one update at round 1, print leakage
``fedsim sweep SCENARIO --out DIR``     one run per defense / parameter value / seed, one table
``fedsim validate SCENARIO``            check a scenario file and exit
``fedsim report RUN_DIR... [--out F]``  plots and one self-contained HTML page from run directories
``fedsim train-prior SCENARIO --out F``  train the attacker's generative prior (GIAS) on auxiliary data

Exit status: 0 done; 1 incomplete (an attack of ``fedsim attack`` did not finish ok); 2 bad
input (one line naming the file and the key, or the path); 3 the global model diverged; 4 every
sampled client of a round failed; 130 / 143 interrupted by SIGINT (Ctrl-C) / SIGTERM.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import warnings
from pathlib import Path

from fedsim.config import ScenarioError
from fedsim.run.tables import leakage_table, rounds_table


class UserError(Exception):
    """An error caused by the user's input; printed as one line, no traceback."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt."""


def _print_tables(setup) -> None:  # noqa: ANN001 - a server.app.ServerSetup
    from fedsim.rundir import LEAKAGE, ROUNDS

    print(f"\nScenario {setup.scenario.name} ({setup.scenario.source}) -> {setup.run_dir.path}")
    print(rounds_table(setup.run_dir.read(ROUNDS)))
    leakage = setup.run_dir.read(LEAKAGE)
    if leakage:
        print("\nLeakage (PSNR/SSIM/LPIPS after optimal matching; recovered = share of images >= "
              f"{setup.scenario.attack.recovered_psnr:g} dB)")
        print(leakage_table(leakage))


def _write_report(setup) -> None:  # noqa: ANN001 - a server.app.ServerSetup
    """The run's ``report.html``, after its tables (:func:`fedsim.run.ending.write_report`)."""
    from fedsim.run.ending import write_report

    html = write_report(setup.run_dir.path)
    if html is not None:
        print(f"\nReport: {html}")


def cmd_run(args: argparse.Namespace) -> int:
    from fedsim.run.simulation import run_scenario
    from fedsim.rundir import ROUNDS
    from server.stops import RunStopped

    if (args.scenario is None) == (args.resume is None):
        raise UserError("give a SCENARIO to run, or --resume RUN_DIR to continue a run (not both)")
    if args.resume is not None and args.out is not None:
        raise UserError("--resume continues the run in its own folder; leave --out out")
    try:
        setup = run_scenario(args.scenario, args.out, args.ray_address, show_progress=not args.quiet,
                             verbose=args.verbose, resume=args.resume)
    except RunStopped as stop:
        _print_tables(stop.setup)
        _write_report(stop.setup)
        print(f"fedsim: error: {stop}", file=sys.stderr)
        return stop.exit_status
    _print_tables(setup)
    _write_report(setup)
    done = len(setup.run_dir.read(ROUNDS))
    if done != setup.scenario.federation.rounds:
        print(f"fedsim: error: only {done} of {setup.scenario.federation.rounds} rounds completed", file=sys.stderr)
        return 1
    return 0


def cmd_attack(args: argparse.Namespace) -> int:
    from fedsim.run.single_shot import attack_once

    setup, records = attack_once(args.scenario, args.out, show_progress=not args.quiet)
    print(f"\nScenario {setup.scenario.name} ({setup.scenario.source}) -> {setup.run_dir.path}")
    print(leakage_table(records))
    _write_report(setup)
    return 0 if all(r["status"] == "ok" for r in records) else 1


def cmd_sweep(args: argparse.Namespace) -> int:
    from fedsim.run.sweep import run_sweep
    from fedsim.run.tables import sweep_table

    if args.seeds < 1:
        raise UserError(f"--seeds: got {args.seeds}, must be >= 1")
    defenses = [d.strip() for d in args.defense.split(",") if d.strip()] if args.defense else []
    rows = run_sweep(args.scenario, defenses, args.param, args.seeds, args.out, args.ray_address,
                     show_progress=not args.quiet)
    print(f"\nSweep of {args.scenario} -> {args.out} (sweep.json, sweep.csv)")
    print(sweep_table(rows))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from fedsim.run.preparation import validate_scenario

    scenario = validate_scenario(args.scenario)
    print(f"{args.scenario}: ok ({scenario.name})")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from fedsim.run.report import build_report

    report = build_report(args.run_dirs, args.out)
    count = len(report.embedded)
    print(f"Report: {report.html} ({count} image{'' if count == 1 else 's'} embedded; PNGs in "
          f"{report.html.parent / (report.html.stem + '_files')})")
    return 0


def cmd_train_prior(args: argparse.Namespace) -> int:
    from adversary.priors.training import PriorTraining
    from fedsim.run.prior import train_prior_for

    if args.out.is_dir() or args.out.suffix == ".png":
        raise UserError(f"--out '{args.out}': give a checkpoint file name such as prior.pt")
    chosen = {k: v for k, v in (("steps", args.steps), ("latent_dim", args.latent_dim), ("width", args.width))
              if v is not None}
    for name, value in {**chosen, "examples": args.examples}.items():
        if value < 1:
            raise UserError(f"--{name.replace('_', '-')}: got {value}, must be >= 1")
    if args.conditional and args.aux_folder is not None:
        raise UserError(f"--conditional trains on labelled images; the files under --aux-folder '{args.aux_folder}' "
                        "have no labels (leave out one of the two)")
    settings = PriorTraining(**chosen, conditional=args.conditional)
    outcome = train_prior_for(args.scenario, args.out, settings, args.examples, show_progress=not args.quiet,
                              folder=args.aux_folder)
    kind = outcome.header.architecture
    if outcome.header.config.get("num_classes"):
        kind += f", conditional on {outcome.header.config['num_classes']} classes"
    print(f"Prior: {outcome.checkpoint} ({kind}, images {list(outcome.header.image_shape)}, "
          f"{outcome.header.data['examples']} auxiliary images from {outcome.header.data['split']}; "
          f"last {outcome.loss_steps} steps: d_loss {outcome.d_loss:.3f}, "
          f"g_loss {outcome.g_loss:.3f})")
    print(f"Samples: {outcome.samples} (auxiliary images above, generated samples below)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    # --verbose / --quiet are accepted before or after the subcommand (SUPPRESS: an absent flag
    # does not overwrite one given on the other side)
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="show Flower's and Ray's own logs in the terminal")
    flags.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    parser = argparse.ArgumentParser(prog="fedsim", description=__doc__.splitlines()[0], parents=[flags])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a scenario (or continue an interrupted run)", parents=[flags])
    run.add_argument("scenario", type=Path, nargs="?")
    run.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                     help="continue the run in RUN_DIR after its last completed round")
    run.add_argument("--out", type=Path, default=None, help="run directory (default runs/NAME-TIMESTAMP)")
    run.add_argument("--ray-address", default=None, help="join an existing Ray cluster (HOST:PORT or auto)")
    run.set_defaults(func=cmd_run)
    attack = sub.add_parser("attack", help="single shot: attack one client update at round 1 and exit",
                            parents=[flags])
    attack.add_argument("scenario", type=Path)
    attack.add_argument("--out", type=Path, default=None, help="run directory (default runs/NAME-TIMESTAMP)")
    attack.set_defaults(func=cmd_attack)
    sweep = sub.add_parser("sweep", help="run a scenario once per defense / parameter value / seed",
                           parents=[flags])
    sweep.add_argument("scenario", type=Path)
    sweep.add_argument("--defense", default="", help="comma-separated defenses (default: the scenario's)")
    sweep.add_argument("--param", action="append", default=[], metavar="KEY=V1,V2",
                       help="a scenario key and its values (repeatable), e.g. defense.noise_multiplier=0.1,1")
    sweep.add_argument("--seeds", type=int, default=1, help="seeds per setting: the scenario's and the next ones")
    sweep.add_argument("--out", type=Path, required=True, help="folder of the runs (one per setting)")
    sweep.add_argument("--ray-address", default=None, help="join an existing Ray cluster (HOST:PORT or auto)")
    sweep.set_defaults(func=cmd_sweep)
    val = sub.add_parser("validate", help="check a scenario file", parents=[flags])
    val.add_argument("scenario", type=Path)
    val.set_defaults(func=cmd_validate)
    rep = sub.add_parser("report", help="plots and one self-contained HTML page from run directories",
                         parents=[flags])
    rep.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    rep.add_argument("--out", type=Path, default=None, metavar="FILE.html",
                     help="the HTML page (default RUN_DIR/report.html for one run, ./report.html for several); "
                          "the PNGs go to FILE_files/ beside it")
    rep.set_defaults(func=cmd_report)
    prior = sub.add_parser("train-prior", help="train a generative prior (GIAS) on the attacker's auxiliary data",
                           parents=[flags])
    prior.add_argument("scenario", type=Path)
    prior.add_argument("--out", type=Path, required=True, help="checkpoint file (a PNG of samples goes beside it)")
    prior.add_argument("--steps", type=int, default=None, help="GAN training steps (default 3000)")
    prior.add_argument("--examples", type=int, default=2000, help="auxiliary images to train on (at most)")
    prior.add_argument("--aux-folder", type=Path, default=None, metavar="DIR",
                       help="train on the image files under DIR (any depth) instead of the data set's auxiliary "
                            "split (embedded photos: new crops; other data sets: training images no client holds)")
    prior.add_argument("--latent-dim", type=int, default=None, help="latent size (default 64)")
    prior.add_argument("--width", type=int, default=None, help="base channel width of both nets (default 32)")
    prior.add_argument("--conditional", action="store_true",
                       help="class-conditional prior: GIAS then searches among the images of the labels it "
                            "recovered from the update")
    prior.set_defaults(func=cmd_train_prior)
    return parser


def _one_line_warning(message, category, filename, lineno, line=None) -> str:  # noqa: ANN001
    return f"fedsim: warning: {message}\n"


def _raise_terminated(signum, frame) -> None:  # noqa: ANN001
    raise Terminated()


def _exit_interrupted(status: int) -> int:
    """After an interrupt: Ray is already shut down and the records are on disk. Flower's server
    thread may still wait in the grid for replies that will never come: end the process now
    rather than join it (the command would hang)."""
    print("fedsim: interrupted; records written so far are kept", file=sys.stderr)
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.verbose = getattr(args, "verbose", False)
    args.quiet = getattr(args, "quiet", False)
    warnings.formatwarning = _one_line_warning
    from adversary.priors.checkpoint import PriorError
    from fedsim.data import DataError
    from fedsim.run.ray_cluster import RayClusterError
    from fedsim.run.report import ReportError
    from fedsim.rundir import RunDirectoryError

    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return args.func(args)
    except (ScenarioError, UserError, DataError, RunDirectoryError, RayClusterError,
            ReportError, PriorError) as exc:
        print(f"fedsim: error: {exc}", file=sys.stderr)
        return 2
    except Terminated:
        return _exit_interrupted(128 + signal.SIGTERM)
    except KeyboardInterrupt:
        return _exit_interrupted(128 + signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
