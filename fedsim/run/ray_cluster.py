"""The one place Ray is started (or joined), and where inversion workers are placed.

Flower sizes its client-actor pool from the cluster's *total* CPUs, so an inversion worker
that holds a CPU can leave a client actor unschedulable and the federation stuck. A local
cluster therefore gets a custom resource, :data:`INVERSION_SLOT`, one per worker, and the
workers hold a slot instead of CPUs; on a GPU machine they hold a GPU each.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Any

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

import ray  # noqa: E402
import torch  # noqa: E402

from fedsim.scenario import AttackPlan  # noqa: E402

#: custom Ray resource that reserves inversion workers apart from the CPUs Flower counts
INVERSION_SLOT = "inversion_slot"


def start_ray(ray_address: str | None, inversion_workers: int) -> None:
    """Join the cluster at ``ray_address`` or start a local Ray with one CPU per core for
    the client actors plus ``inversion_workers`` inversion slots."""
    if ray.is_initialized():
        return
    pythonpath = os.pathsep.join(sys.path)
    runtime_env = {"env_vars": {"PYTHONPATH": pythonpath, "FLWR_TELEMETRY_ENABLED": "0",
                                "RAY_USAGE_STATS_ENABLED": "0"}}
    if ray_address:
        ray.init(address=ray_address, runtime_env=runtime_env, logging_level=logging.WARNING)
    else:
        ray.init(num_cpus=os.cpu_count() or 1, resources={INVERSION_SLOT: inversion_workers},
                 include_dashboard=False, runtime_env=runtime_env, logging_level=logging.WARNING)


def stop_ray() -> None:
    if ray.is_initialized():
        ray.shutdown()


def inversion_worker_options(plan: AttackPlan) -> dict[str, Any]:
    """Ray resources of one inversion worker on the running cluster: a GPU where CUDA exists,
    else an inversion slot, else (a cluster started without slots) ``attack.worker_cpus`` CPUs."""
    if torch.cuda.is_available():
        return {"num_gpus": 1, "num_cpus": 0}
    if ray.cluster_resources().get(INVERSION_SLOT, 0) >= 1:
        return {"num_cpus": 0, "resources": {INVERSION_SLOT: 1}}
    return {"num_cpus": plan.worker_cpus}
