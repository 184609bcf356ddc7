"""Closing a round: the failed clients' lines, the test accuracy of the new global model, the
round's record in ``rounds.jsonl``, the checkpoint — and the reasons a run stops.

The evaluation on the test split takes as long as a tenth of a round of client training, so it
runs in a background thread while the next round's clients train (one thread: records are
written in round order, each checkpoint after its record). A round waits for the previous
round's evaluation before queueing its own, so at most one global state waits in the queue:
with an unbounded queue, a starved low-priority evaluation let states pile up (50 MB each for
a 3072-4096-10 MLP) and the driver's memory grew with the number of rounds. What can be decided at once is
decided in the server's thread when Flower hands over the round: non-finite weights or training
loss (:class:`RunDiverged`), every sampled client failed (:class:`RoundFailed`); those rounds
are recorded before the run stops. A test loss that is not finite is found by the background
evaluation and stops the run when the server next hands over a round (or at the end). The
privacy ledger is snapshotted with the round, before the next round charges it.
"""
from __future__ import annotations

import math
import os
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn
from tqdm import tqdm

from fedsim.evaluation import evaluate_model
from fedsim.records import all_finite
from fedsim.rundir import CLIENT_LOG, ROUNDS
from server.checkpoint import Checkpoint, pending_uploads
from server.stops import RoundFailed, RunDiverged
from server.strategy import CuriousFedAvg, RoundTrace


def _lowest_priority() -> None:
    """The evaluation thread yields to the client actors: it runs on the cores they leave idle
    (Linux thread niceness; one torch thread)."""
    torch.set_num_threads(1)
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):  # not Linux, or not allowed: normal priority
        pass


def divergence(state: dict[str, torch.Tensor], train_loss: float | None, test_loss: float | None) -> str | None:
    """What is not finite about a round's result, or None."""
    if not all_finite(state):
        return "non-finite global weights"
    if train_loss is not None and not math.isfinite(train_loss):
        return "non-finite training loss"
    if test_loss is not None and not math.isfinite(test_loss):
        return "non-finite test loss"
    return None


class RoundCloser:
    """Closes the rounds of one run (see the module docstring); ``close`` is Flower's
    ``evaluate_fn``, ``finish`` waits for the last evaluation, ``shutdown`` ends the thread."""

    def __init__(self, setup, model: nn.Module, strategy: CuriousFedAvg, bar: tqdm):  # noqa: ANN001 - ServerSetup
        self.setup = setup
        self.model = model
        self.strategy = strategy
        self.bar = bar
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="round-evaluation",
                                           initializer=_lowest_priority)
        self.pending: Future | None = None

    def close(self, flower_round: int, arrays) -> None:  # noqa: ANN001 - a Flower ArrayRecord
        if flower_round == 0:
            return None
        self.raise_stop()  # an earlier round's evaluation found a non-finite test loss
        server_round = self.strategy.round_of(flower_round)
        trace = self.strategy.traces[server_round]
        self._report_failures(server_round, trace)
        trace.ended = (round(time.monotonic() - trace.started, 3), round(time.time(), 3))  # the round, not its evaluation
        state = arrays.to_torch_state_dict()
        privacy = self.strategy.privacy.state_dict()
        diverged = divergence(state, trace.train_loss, None)
        failed = bool(trace.clients) and len(trace.failures) == len(trace.clients)
        if diverged is not None or (failed and not self.setup.scenario.federation.failures_expected):
            self.finish()
            self._record(server_round, trace, None, None, diverged)
            if diverged is not None:
                raise RunDiverged(server_round, diverged)
            raise RoundFailed(server_round, len(trace.failures))
        self.finish()  # at most one state waits for evaluation: memory stays flat when evaluation lags
        self.pending = self.executor.submit(self._evaluate, server_round, trace, state, privacy)
        return None

    def finish(self) -> None:
        """Wait for the evaluation in flight; raise what it found."""
        if self.pending is not None:
            self.pending.exception()  # blocks until it is done
        self.raise_stop()

    def shutdown(self) -> None:
        self.executor.shutdown(wait=True)

    def raise_stop(self) -> None:
        if self.pending is not None and self.pending.done() and self.pending.exception() is not None:
            stop, self.pending = self.pending.exception(), None
            raise stop

    # -- in the background thread -----------------------------------------------------
    def _evaluate(self, server_round: int, trace: RoundTrace, state: dict[str, torch.Tensor], privacy: dict) -> None:
        splits = self.setup.splits
        self.model.load_state_dict(state)
        accuracy, loss = evaluate_model(self.model, splits.test_x, splits.test_y, self.setup.device)
        diverged = divergence({}, None, loss)
        self._record(server_round, trace, accuracy, loss, diverged)
        if diverged is not None:
            raise RunDiverged(server_round, diverged)
        Checkpoint(server_round, state, privacy).save(self.setup.run_dir)
        pending_uploads(self.setup.run_dir, self.setup.scenario.attack.attacks)  # drops those whose attacks are done

    def _record(self, server_round: int, trace: RoundTrace, accuracy: float | None, loss: float | None,
                diverged: str | None) -> None:
        ok = diverged is None
        self.setup.run_dir.append(ROUNDS, {
            "round": server_round, "test_accuracy": accuracy if ok else None, "test_loss": loss if ok else None,
            "train_loss": trace.train_loss, "clients": trace.clients, "failures": trace.failures,
            "diverged": not ok, "epsilon_round": trace.epsilon_round, "epsilon": trace.epsilon,
            "seconds": trace.ended[0], "ended_at": trace.ended[1],
        })
        self.bar.set_postfix(acc="-" if accuracy is None else f"{accuracy:.3f}", failures=len(trace.failures))
        self.bar.update()

    def _report_failures(self, server_round: int, trace: RoundTrace) -> None:
        for failure, detail in zip(trace.failures, trace.failure_details):
            tqdm.write(f"fedsim: warning: round {server_round}: client {failure['client']} failed: "
                       f"{failure['error']}", file=sys.stderr)
            self.setup.run_dir.log(CLIENT_LOG, f"--- round {server_round}, client {failure['client']}\n{detail}")

