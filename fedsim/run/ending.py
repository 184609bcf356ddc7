"""How a run ends on disk, whichever way it was started (``fedsim run``, ``flwr run .``,
``fedsim attack``): ``summary.json`` says how it ended, and the report is written from its records.
"""
from __future__ import annotations

import resource
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from fedsim.rundir import ROUNDS
from server.app import ServerSetup
from server.stops import RunStopped


def peak_memory_mb() -> float:
    """This process' peak resident memory (MB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


@contextmanager
def federated_outcome(setup: ServerSetup, started: float) -> Iterator[None]:
    """Around a federated run: ``summary.json`` gets its status — completed, "stopped: why" (the
    server stopped it), interrupted, crashed —, rounds done of planned, seconds since ``started``
    (a ``time.monotonic()`` value) and the peak memory, however the block ends. On an interrupt or a
    crash the attack sink is abandoned first. Exceptions propagate."""
    status = "crashed"
    try:
        yield
        status = "completed"
    except RunStopped as stop:
        status = f"stopped: {stop}"
        raise
    except BaseException as exc:
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            status = "interrupted"
        if setup.sink is not None:
            setup.sink.abort()
        raise
    finally:
        setup.run_dir.write_summary({
            "status": status, "rounds_completed": len(setup.run_dir.read(ROUNDS)),
            "rounds_planned": setup.scenario.federation.rounds, "seconds": round(time.monotonic() - started, 3),
            "driver_peak_rss_mb": peak_memory_mb()})


def write_report(run_dir: Path) -> Path | None:
    """``RUN_DIR/report.html`` from the run's records; a report that cannot be made is one warning
    line on stderr and None, never an error (the records are on disk: ``fedsim report`` retries)."""
    from fedsim.run.report import build_report

    try:
        return build_report([run_dir]).html
    except Exception as exc:  # noqa: BLE001 - the run's result must not depend on its report
        print(f"fedsim: warning: no report written ({type(exc).__name__}: {exc}); "
              f"retry with `fedsim report {run_dir}`", file=sys.stderr)
        return None
