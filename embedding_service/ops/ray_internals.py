"""The driver side's touches of Ray's non-public settings, fenced in one place.

The run command and the Kubernetes manifests give every Ray node settings Ray reads but does not document:

- PRELOAD_ENV, a Ray system setting (`RAY_<setting>` in the raylet's environment): the modules the raylet
  imports into each worker before it runs anything; the proxy's gRPC options arrive that way.
- PROXY_MESSAGE_SIZE_ENV: the message size bound of Serve's gRPC servers (Serve's constants read it).
- `_system_config` of `ray.init`, for a faster metrics report in the tests and the benchmark.

Each is checked as this module is imported, in Ray's installed sources (read, not imported, nor their
packages: Serve reads its settings as it is first imported, which must come after the application's
environment is exported, or the handles the driver builds miss Serve's gRPC transport). A Ray
release that dropped one fails here, with the Ray version and what moved. Whether the preload took effect
is only known in the proxy, which reports it (proxy/state.py). Tested against the installed Ray
(tests/unit/test_ray_internals.py); pyproject pins Ray's minor release.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

PRELOAD_ENV = "RAY_preload_python_modules"
PROXY_MESSAGE_SIZE_ENV = "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"
# Documented in Serve's gRPC-transport guide; set beside the one above.
REPLICA_MESSAGE_LENGTH_ENV = "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"


class RayInternalsChanged(RuntimeError):
    """A non-public Ray setting the service relies on is not where, or not what, it was."""


def _source(module: str) -> str:
    """A module of Ray's as text, found under Ray's folder (find_spec of a submodule would import its parents)."""
    ray = importlib.util.find_spec("ray")
    if ray is None or not ray.submodule_search_locations:
        raise RayInternalsChanged("Ray is not installed")
    path = Path(next(iter(ray.submodule_search_locations)), *module.split(".")[1:]).with_suffix(".py")
    if not path.is_file():
        raise RayInternalsChanged(f"Ray {_version()}: {module} is gone")
    return path.read_text()


def _version() -> str:
    return importlib.metadata.version("ray")


def _check() -> None:
    where = f"Ray {_version()}"
    if "--worker-preload-modules" not in _source("ray._private.workers.default_worker"):
        raise RayInternalsChanged(f"{where}: Ray's workers take no --worker-preload-modules ({PRELOAD_ENV})")
    constants = _source("ray.serve._private.constants")
    for name in (PROXY_MESSAGE_SIZE_ENV, REPLICA_MESSAGE_LENGTH_ENV):
        if f'"{name}"' not in constants:
            raise RayInternalsChanged(f"{where}: Serve reads no {name}")
    if '"_system_config"' not in _source("ray._private.worker"):
        raise RayInternalsChanged(f"{where}: ray.init takes no _system_config")


_check()


def metrics_report_interval(milliseconds: int) -> dict:
    """ray.init's keywords for metrics reported every `milliseconds` (Ray's default: 10 s)."""
    return {"_system_config": {"metrics_report_interval_ms": milliseconds}}


def with_preloaded(existing: str, modules: str) -> str:
    """PRELOAD_ENV's value naming `modules` after what `existing` already names (kept, not repeated)."""
    preload = [m for m in existing.split(",") if m]
    return ",".join(preload + [m for m in modules.split(",") if m and m not in preload])
