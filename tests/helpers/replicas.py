"""The session's Serve replicas, as Ray names them and as processes on this machine, and waiting for the application
to be healthy again."""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import psutil
import ray
from ray import serve


def replica_actors(deployment: str) -> list[dict]:
    """Ray's named-actor entries of the deployment's replicas (name and namespace)."""
    return [
        a
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith("SERVE_REPLICA::") and f"#{deployment}#" in a["name"]
    ]


def replica_processes(deployment: str, app: str = "embedding") -> list[psutil.Process]:
    """The worker processes of the deployment's replicas on this machine, found by the title Ray gives an actor's
    process: `ray::ServeReplica:<app>:<deployment>`, then `.<method>` while it runs one."""
    title = re.compile(rf"ray::ServeReplica:{re.escape(app)}:{re.escape(deployment)}(?:\.|\s|$)")
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if title.match(" ".join(process.info["cmdline"] or ())):
            found.append(process)
    return found


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def first_working(processes: list[psutil.Process], until: Callable[[], bool], timeout_s: float,
                  window_s: float = 0.1, share: float = 0.6) -> psutil.Process | None:
    """The first of `processes` seen computing: `share` of a core or more over a `window_s` window. An idle replica
    uses about 1% of one (its heartbeats); one that does more is running a shard, so killing it then loses the shard.
    None once `until()` holds or after `timeout_s`."""
    last = {p.pid: cpu_seconds(p) for p in processes}
    deadline = time.monotonic() + timeout_s
    while not until() and time.monotonic() < deadline:
        time.sleep(window_s)
        for p in processes:
            now = cpu_seconds(p)
            if now - last[p.pid] >= share * window_s:
                return p
            last[p.pid] = now
    return None


def wait_healthy(app: str = "embedding", timeout_s: float = 120) -> None:
    """Until Serve reports the application RUNNING with every deployment HEALTHY."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = serve.status().applications[app]
        if status.status == "RUNNING" and all(d.status == "HEALTHY" for d in status.deployments.values()):
            return
        time.sleep(0.5)
    raise TimeoutError(f"application {app} not healthy after {timeout_s}s")
