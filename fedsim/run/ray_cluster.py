"""The one place Ray is started (or joined), and where inversion workers are placed.

Flower sizes its client-actor pool from each node's *total* CPUs (``pool_size_from_resources``),
so an inversion worker that holds a CPU leaves one client actor unschedulable and the
federation waits forever. Inversion workers therefore never hold a CPU: on a cluster with GPUs
each holds a GPU (a share of one when there are fewer GPUs than workers); else a local cluster
gives each one an :data:`INVERSION_SLOT` (a custom resource that only counts them), and on a
cluster started without slots (plain ``ray start --head``) they ask for no resource at all and
share the CPUs with the client actors, as they do locally. What the plan needs and the cluster
cannot give (a node for a client actor, enough slots) is found before round 1
(:func:`check_cluster`) and reported in one line.

A cluster this module starts is watched by :mod:`fedsim.run.reaper`, which kills what is
left of it if the ``fedsim`` process is killed outright.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import socket
import sys
import threading
from typing import Any, Iterator

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

import psutil  # noqa: E402
import ray  # noqa: E402

from fedsim.scenario import AttackPlan, Scenario  # noqa: E402

#: custom Ray resource that reserves inversion workers apart from the CPUs Flower counts
INVERSION_SLOT = "inversion_slot"
#: seconds to wait for a TCP answer from a cluster address before refusing it
CONNECT_TIMEOUT_S = 5.0


class RayClusterError(Exception):
    """The Ray cluster asked for cannot be used (one line for the CLI)."""


def check_address(ray_address: str) -> None:
    """Refuse within seconds an address where no Ray cluster answers (``ray.init`` would retry
    for minutes). ``auto`` is left to Ray, which answers at once when it finds none."""
    if ray_address == "auto":
        return
    host_port = ray_address.split("://", 1)[-1]
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise RayClusterError(f"--ray-address {ray_address!r}: expected HOST:PORT (e.g. 127.0.0.1:6379) or 'auto'")
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        raise RayClusterError(f"--ray-address {ray_address}: no Ray cluster answers there "
                              f"({exc.strerror or type(exc).__name__}); start one with 'ray start --head' "
                              "or leave --ray-address out to run locally") from None


def start_ray(ray_address: str | None, inversion_workers: int, verbose: bool = False) -> None:
    """Join the cluster at ``ray_address`` or start a local Ray with one CPU per core for the
    client actors plus ``inversion_workers`` inversion slots. Ray's workers print to the
    terminal only when ``verbose`` (else to Ray's own log files)."""
    if ray.is_initialized():
        return
    with _keeping_sigterm_handler():
        _init_ray(ray_address, inversion_workers, verbose)


@contextlib.contextmanager
def _keeping_sigterm_handler() -> Iterator[None]:
    """Ray's driver installs its own SIGTERM handler, which aborts the process (core dump, exit
    -6) before Python can stop the run cleanly: put the caller's handler back."""
    main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if main and handler is not None:
            signal.signal(signal.SIGTERM, handler)


def _init_ray(ray_address: str | None, inversion_workers: int, verbose: bool) -> None:
    pythonpath = os.pathsep.join(sys.path)
    runtime_env = {"env_vars": {"PYTHONPATH": pythonpath, "FLWR_TELEMETRY_ENABLED": "0",
                                "RAY_USAGE_STATS_ENABLED": "0"}}
    if ray_address:
        check_address(ray_address)
        try:
            ray.init(address=ray_address, runtime_env=runtime_env, logging_level=logging.WARNING,
                     log_to_driver=verbose)
        except ConnectionError as exc:
            raise RayClusterError(f"--ray-address {ray_address}: {str(exc).splitlines()[0]}") from None
        return
    ray.init(num_cpus=os.cpu_count() or 1, resources={INVERSION_SLOT: inversion_workers},
             include_dashboard=False, runtime_env=runtime_env, logging_level=logging.WARNING,
             log_to_driver=verbose)
    _start_reaper()


def _start_reaper() -> None:
    """One reaper per process (``python -m fedsim.run.reaper PID``), in its own session so that
    a Ctrl-C in the terminal does not reach it, with its standard streams on /dev/null."""
    me = psutil.Process()
    for child in me.children():
        try:
            if "fedsim.run.reaper" in " ".join(child.cmdline()):
                return
        except psutil.Error:
            continue
    quiet = [(os.POSIX_SPAWN_OPEN, fd, os.devnull, os.O_RDWR, 0) for fd in (0, 1, 2)]
    os.posix_spawn(sys.executable, [sys.executable, "-m", "fedsim.run.reaper", str(me.pid)], os.environ,
                   file_actions=quiet, setsid=True)


def stop_ray() -> None:
    if ray.is_initialized():
        ray.shutdown()


def inversion_worker_options(plan: AttackPlan) -> dict[str, Any]:
    """Ray resources of one inversion worker on the running cluster (module docstring): a GPU
    (or a share) where the cluster has GPUs, else an inversion slot where it offers them, else
    nothing; never a CPU."""
    resources = ray.cluster_resources()
    gpus = resources.get("GPU", 0)
    if gpus > 0:
        return {"num_gpus": min(1.0, gpus / plan.pool_size), "num_cpus": 0}
    if resources.get(INVERSION_SLOT, 0) >= 1:
        return {"num_cpus": 0, "resources": {INVERSION_SLOT: 1}}
    return {"num_cpus": 0}


def check_cluster(scenario: Scenario) -> None:
    """Raise :class:`RayClusterError` (one line: what is needed, what the cluster has, what
    fixes it) when the running cluster cannot host the plan: no node with ``client_cpus`` CPUs
    for a client actor, or fewer inversion slots than ``attack.pool_size`` workers."""
    fed, plan = scenario.federation, scenario.attack
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive") and node.get("Resources")]
    largest = max((node.get("CPU", 0) for node in nodes), default=0)
    if largest < fed.client_cpus:
        raise RayClusterError(f"{scenario.source}: federation.client_cpus = {fed.client_cpus:g}, but the largest node of "
                              f"the Ray cluster has {largest:g} CPUs; lower federation.client_cpus or add a node "
                              f"with 'ray start --num-cpus {math.ceil(fed.client_cpus)}'")
    slots = ray.cluster_resources().get(INVERSION_SLOT, 0)
    if plan.attacks and ray.cluster_resources().get("GPU", 0) == 0 and 0 < slots < plan.pool_size:
        raise RayClusterError(f"{scenario.source}: attack.pool_size = {plan.pool_size} inversion workers, but the Ray "
                              f"cluster offers {slots:g} '{INVERSION_SLOT}'; lower attack.pool_size or start it with "
                              f"ray start --resources '{{\"{INVERSION_SLOT}\": {plan.pool_size}}}'")
