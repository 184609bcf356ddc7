"""Cleans up after a killed ``fedsim`` process.

A local Ray cluster is a tree of processes under the process that started it (GCS, raylet,
agents, workers). When that process ends normally it shuts Ray down; when it is killed
(SIGKILL, the OOM killer) some of them (the dashboard and runtime-env agents) outlive it and
ignore SIGTERM. The reaper is a small separate process: while the watched process lives it
keeps the list of its descendants; once it is gone, it kills those still running.

Started by :func:`fedsim.run.ray_cluster.start_ray` for a cluster it starts itself (never for
a cluster the user runs): ``python -m fedsim.run.reaper PID``.
"""
from __future__ import annotations

import sys
import time

import psutil

POLL_S = 1.0


def watch(pid: int, poll_s: float = POLL_S) -> list[int]:
    """Follow process ``pid`` until it ends, then kill its last known descendants (except this
    process). Returns the pids it killed."""
    me = psutil.Process()
    known: dict[int, psutil.Process] = {}
    try:
        watched = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return []
    while watched.is_running() and watched.status() != psutil.STATUS_ZOMBIE:
        try:
            for child in watched.children(recursive=True):
                if child.pid != me.pid:
                    known.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            break
        time.sleep(poll_s)
    killed = []
    for process in known.values():
        try:
            if process.is_running():  # is_running() also rules out a reused pid
                process.kill()
                killed.append(process.pid)
        except psutil.NoSuchProcess:
            pass
    return killed


if __name__ == "__main__":
    watch(int(sys.argv[1]))
