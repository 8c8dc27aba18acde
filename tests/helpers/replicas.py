"""The session's Serve replicas, as Ray names them, and waiting for the application to be healthy again."""

from __future__ import annotations

import time

import ray
from ray import serve


def replica_actors(deployment: str) -> list[dict]:
    """Ray's named-actor entries of the deployment's replicas (name and namespace)."""
    return [
        a
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith("SERVE_REPLICA::") and f"#{deployment}#" in a["name"]
    ]


def wait_healthy(app: str = "embedding", timeout_s: float = 120) -> None:
    """Until Serve reports the application RUNNING with every deployment HEALTHY."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = serve.status().applications[app]
        if status.status == "RUNNING" and all(d.status == "HEALTHY" for d in status.deployments.values()):
            return
        time.sleep(0.5)
    raise TimeoutError(f"application {app} not healthy after {timeout_s}s")
