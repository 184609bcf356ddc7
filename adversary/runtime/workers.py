"""The Ray inversion pool: attacks run asynchronously on Ray actors while FL continues.

``InversionPool.submit(observation, truth)`` turns a tapped update into one job per
planned attack (if the plan selects that round and client) and hands it to an idle actor
— together with up to ``attack.batch_jobs`` − 1 queued jobs it can share one vectorised launch
with (same attack, equal ``Attack.key``: same round, config and parameters)
(placed with the Ray resources the wiring chooses: a GPU where CUDA exists, else an inversion
slot or CPUs, see ``fedsim.run.ray_cluster``). A job whose attack wants the server's earlier
reconstruction of its client (``Attack.needs_prior``) waits for that client's earlier-round jobs
and gets the latest of their reconstructions (``adversary.runtime.memory``). The pool joins the Ray cluster the wiring
started; it never starts one. A
collector thread streams finished jobs to ``leakage.jsonl`` (one flushed line each) and
their image grids to ``reconstructions/``. A job past its timeout gets its actor killed
and replaced and a "timeout" record; an actor that dies yields a "failed" record; nothing
else is lost. Progress (iteration, objective) flows back through a Ray queue to one
progress bar per running job.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Any, Callable

import ray
import torch
from ray.util.queue import Empty, Queue
from tqdm import tqdm

from adversary.runtime.execution import AttackJob, JobResult, failed_record, plan_jobs, run_jobs, store_result
from adversary.runtime.memory import ReconstructionMemory
from adversary.observation import GroundTruth, Observation
from adversary.runtime.registry import get_attack, resolve_attack_params
from fedsim.rundir import RunDirectory
from fedsim.scenario import AttackPlan, Scenario

#: extra seconds past a job's own deadline before its actor is killed
HARD_TIMEOUT_GRACE_S = 30.0


def plan_selects(plan: AttackPlan, server_round: int, client_id: int) -> bool:
    """Whether the attack plan targets this round and client (empty lists mean all)."""
    return ((not plan.rounds or server_round in plan.rounds)
            and (not plan.clients or client_id in plan.clients))


def take_launch(queue: deque[AttackJob], batch_jobs: int,
                ready: Callable[[AttackJob], bool] = lambda job: True) -> list[AttackJob]:
    """Pop the first queued job that is ``ready`` and up to ``batch_jobs`` − 1 later ready ones
    that can share its launch (same attack, equal non-None ``Attack.key``); the others keep their
    order. Empty when no queued job is ready."""
    job = next((job for job in queue if ready(job)), None)
    if job is None:
        return []
    queue.remove(job)
    attack = get_attack(job.attack)
    key = attack.key(job.observation, job.params)
    launch = [job]
    if key is None:
        return launch
    for other in list(queue):
        if len(launch) == batch_jobs:
            break
        if other.attack == job.attack and ready(other) and attack.key(other.observation, other.params) == key:
            queue.remove(other)
            launch.append(other)
    return launch


@ray.remote
class InversionWorker:
    """A Ray actor that runs one launch at a time (one job, or compatible jobs together)."""

    def __init__(self, progress: Queue | None):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.progress = progress
        self.lpips = None

    def ready(self) -> str:
        return str(self.device)

    def run(self, jobs: list[AttackJob]) -> list[JobResult]:
        from adversary.scoring.metrics import LpipsScorer

        if self.lpips is None:
            self.lpips = LpipsScorer(device=self.device)
        last: dict[int, float] = {}

        def report(job_id: int, iteration: int, total: int, objective: float) -> None:
            now = time.monotonic()
            if self.progress is not None and (now - last.get(job_id, 0.0) > 0.5 or iteration >= total):
                last[job_id] = now
                try:
                    self.progress.put_nowait((job_id, iteration, total, objective))
                except Exception:  # noqa: BLE001 - a full queue only drops a progress tick
                    pass

        return run_jobs(jobs, self.device, self.lpips, report)


@dataclass
class _Running:
    jobs: list[AttackJob]
    actor: Any
    future: Any
    hard_deadline: float
    bars: list[tqdm]


class InversionPool:
    """Asynchronous attack execution for one run (see module docstring)."""

    def __init__(self, scenario: Scenario, run_dir: RunDirectory, actor_options: dict[str, Any],
                 show_progress: bool = True, done: set[tuple[int, int, str]] = frozenset()):
        """Start ``attack.pool_size`` workers on the running Ray cluster, each placed with
        ``actor_options`` (Ray resources: the wiring decides, ``fedsim.run.ray_cluster``).
        ``done``: (round, client, attack) already recorded (a resumed run): never run again."""
        self.scenario = scenario
        self.plan = scenario.attack
        self.params = resolve_attack_params(self.plan.attacks, self.plan.params, scenario.source)
        self.run_dir = run_dir
        self.show_progress = show_progress
        self.actor_options = actor_options
        self.claimed = set(done)  # (round, client, attack) recorded or queued: each runs once
        wanted = any(get_attack(name).needs_prior(self.params[name]) for name in self.plan.attacks)
        self.memory = ReconstructionMemory(tuple(self.plan.attacks)) if wanted else None
        self.progress = Queue(maxsize=10_000, actor_options={"num_cpus": 0})
        self.idle = [self._new_actor() for _ in range(self.plan.pool_size)]
        ray.get([a.ready.remote() for a in self.idle])
        self.queue: deque[AttackJob] = deque()
        self.running: dict[Any, _Running] = {}
        self.next_id = 0
        self.lock = threading.Lock()
        self.closing = threading.Event()
        self.aborted = threading.Event()
        self.collector = threading.Thread(target=self._collect_loop, name="inversion-collector", daemon=True)
        self.collector.start()

    def _new_actor(self) -> Any:
        env = {"OMP_NUM_THREADS": str(max(1, int(self.plan.worker_cpus)))}
        return InversionWorker.options(**self.actor_options, runtime_env={"env_vars": env}).remote(self.progress)

    # -- submission -------------------------------------------------------------------
    def wants(self, server_round: int, client_id: int) -> bool:
        return plan_selects(self.plan, server_round, client_id)

    def submit(self, observation: Observation, truth: GroundTruth, params: dict[str, Any] | None = None) -> None:
        """Queue the plan's jobs for this update. The pool keeps the observation only in those
        jobs: it is released once they are done. ``params``: attack name -> the parameters of
        this update's job instead of the scenario's (GIML's learned generator)."""
        with self.lock:
            planned = plan_jobs(self.scenario, {**self.params, **(params or {})}, observation, truth, self.next_id)
            self.next_id += len(planned)
            key = (observation.server_round, observation.client_id)
            jobs = [job for job in planned if (*key, job.attack) not in self.claimed]
            self.claimed |= {(*key, job.attack) for job in jobs}
            self.queue.extend(jobs)
            self._dispatch()
        if self.plan.wait:
            self._wait_for({job.job_id for job in jobs})

    def _dispatch(self) -> None:
        """Start queued jobs on idle actors (caller holds the lock). A job that wants a prior
        waits until its client's earlier-round jobs are done, then gets the latest of them."""
        while self.queue and self.idle:
            jobs = take_launch(self.queue, self.plan.batch_jobs, self._ready)
            if not jobs:
                return
            for job in jobs:
                self._attach_prior(job)
            actor = self.idle.pop()
            bars = [tqdm(total=1, desc=f"{job.attack} r{job.observation.server_round} c{job.observation.client_id}",
                         unit="it", leave=False, position=1 + len(self.running) + i)
                    for i, job in enumerate(jobs)] if self.show_progress else []
            future = actor.run.remote(jobs)
            deadline = time.monotonic() + min(job.timeout_s for job in jobs) + HARD_TIMEOUT_GRACE_S
            self.running[future] = _Running(jobs, actor, future, deadline, bars)

    def _ready(self, job: AttackJob) -> bool:
        """False while a job wanting a prior has an earlier-round job of its client queued or
        running (caller holds the lock)."""
        if self.memory is None or not get_attack(job.attack).needs_prior(job.params):
            return True
        obs = job.observation
        busy = list(self.queue) + [j for r in self.running.values() for j in r.jobs]
        return not any(j.observation.client_id == obs.client_id and j.observation.server_round < obs.server_round
                       for j in busy)

    def _attach_prior(self, job: AttackJob) -> None:
        if self.memory is None or not get_attack(job.attack).needs_prior(job.params):
            return
        found = self.memory.prior_for(job.observation.server_round, job.observation.client_id)
        if found is not None:
            job.observation = replace(job.observation, prior_round=found[0], prior=found[1])

    # -- collection -------------------------------------------------------------------
    def _collect_loop(self) -> None:
        while not self.aborted.is_set() and not (self.closing.is_set() and not self.pending()):
            self._drain_progress()
            with self.lock:
                futures = list(self.running)
            if not futures:
                time.sleep(0.2)
                continue
            done, _ = ray.wait(futures, num_returns=1, timeout=0.5)
            for future in done:
                self._finish(future)
            self._enforce_timeouts()

    def _drain_progress(self) -> None:
        bars = {job.job_id: bar for r in list(self.running.values()) for job, bar in zip(r.jobs, r.bars)}
        while True:
            try:
                job_id, iteration, total, objective = self.progress.get_nowait()
            except Empty:
                return
            bar = bars.get(job_id)
            if bar is not None:
                bar.total = total
                bar.n = iteration
                bar.set_postfix(objective=f"{objective:.4g}", refresh=True)

    def _finish(self, future: Any) -> None:
        with self.lock:
            running = self.running.pop(future)
        try:
            results: list[JobResult] = ray.get(future)
            actor = running.actor
        except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as exc:
            results = [JobResult(failed_record(job, "failed", f"worker died: {type(exc).__name__}"))
                       for job in running.jobs]
            actor = self._new_actor()
        except ray.exceptions.RayError as exc:
            results = [JobResult(failed_record(job, "failed", f"{type(exc).__name__}: {exc}")) for job in running.jobs]
            actor = running.actor
        for result in results:
            self._write(result)
        for bar in running.bars:
            bar.close()
        with self.lock:
            self.idle.append(actor)
            self._dispatch()

    def _enforce_timeouts(self) -> None:
        now = time.monotonic()
        with self.lock:
            late = [r for r in self.running.values() if now > r.hard_deadline]
            for r in late:
                del self.running[r.future]
        for r in late:
            ray.kill(r.actor, no_restart=True)
            for job in r.jobs:
                self._write(JobResult(failed_record(job, "timeout", f"no result within {job.timeout_s:.0f} s "
                                                    f"(+{HARD_TIMEOUT_GRACE_S:.0f} s grace); worker killed")))
            for bar in r.bars:
                bar.close()
            with self.lock:
                self.idle.append(self._new_actor())
                self._dispatch()

    def _write(self, result: JobResult) -> None:
        store_result(self.run_dir, result)
        record = result.record
        if self.memory is not None and result.reconstruction is not None:
            with self.lock:
                self.memory.record(record.round, record.client, record.attack, result.reconstruction)

    # -- waiting ----------------------------------------------------------------------
    def pending(self) -> int:
        with self.lock:
            return len(self.queue) + len(self.running)

    def _wait_for(self, job_ids: set[int]) -> None:
        while True:
            with self.lock:
                busy = {j.job_id for j in self.queue} | {j.job_id for r in self.running.values() for j in r.jobs}
            if not job_ids & busy:
                return
            time.sleep(0.2)

    def kill_worker_running(self, job_id: int) -> bool:
        """Kill the actor running ``job_id`` (fault injection for tests and operators)."""
        with self.lock:
            for r in self.running.values():
                if any(job.job_id == job_id for job in r.jobs):
                    ray.kill(r.actor, no_restart=True)
                    return True
        return False

    def abort(self) -> None:
        """Stop collecting at once (the run is interrupted): jobs in flight are abandoned, the
        records written so far stay. Ray itself is shut down by the caller."""
        self.aborted.set()
        self.collector.join(timeout=5)
        for bar in [bar for r in self.running.values() for bar in r.bars]:
            bar.close()

    def close(self) -> None:
        """Wait for every submitted job, then stop the collector and the actors."""
        self.closing.set()
        self.collector.join()
        for actor in self.idle:
            ray.kill(actor, no_restart=True)
        self.idle.clear()
        self.progress.shutdown()
