"""The fleet's one touch of Ray's non-public API, fenced: asking Ray's GCS to drain a node.

Ray has no public Python call for a node drain (`ray drain-node` is a hidden CLI over the same call). Its
shape is checked when this module is imported, in the recycler's process, so a Ray release that moved it
stops the recycler at start with the Ray version and what moved, instead of quarantining nodes it then
never drains. Tested against the installed Ray (tests/unit/test_ray_internals.py); pyproject pins Ray's minor
release.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass

import ray
import ray._raylet  # noqa: F401  (the GCS client, below)
from ray.core.generated import autoscaler_pb2

# Non-rejectable: the raylet accepts it whatever runs there (IDLE_TERMINATION it may refuse).
_REASON_NAME = "DRAIN_NODE_REASON_PREEMPTION"
_PARAMETERS = ("node_id", "reason", "reason_message", "deadline_timestamp_ms", "timeout")


class RayInternalsChanged(RuntimeError):
    """A non-public Ray API the service relies on is not where, or not what, it was."""


def _check() -> int:
    where = f"Ray {ray.__version__}"
    inner = getattr(ray._raylet, "InnerGcsClient", None)
    drain = getattr(inner, "drain_node", None)
    if not hasattr(ray._raylet, "GcsClient") or drain is None:
        raise RayInternalsChanged(f"{where}: ray._raylet.GcsClient / InnerGcsClient.drain_node is gone "
                                  "(the recycler's node drain)")
    try:
        names = tuple(inspect.signature(drain).parameters)
    except (TypeError, ValueError) as exc:
        raise RayInternalsChanged(f"{where}: the signature of InnerGcsClient.drain_node is unreadable: {exc}") from None
    if names[1:6] != _PARAMETERS:
        raise RayInternalsChanged(f"{where}: InnerGcsClient.drain_node takes {names[1:]}, not {_PARAMETERS}")
    try:
        return autoscaler_pb2.DrainNodeReason.Value(_REASON_NAME)
    except ValueError:
        raise RayInternalsChanged(f"{where}: DrainNodeReason has no {_REASON_NAME}") from None


_REASON = _check()


@dataclass(frozen=True)
class DrainAnswer:
    accepted: bool
    message: str  # Ray's reason when it rejected the drain


def drain_node(node_id: str, message: str, deadline_s: float, timeout_s: float = 30.0) -> DrainAnswer:
    """Asks Ray to drain the node (hex id): no new work there, Serve moves its replicas, the work in flight
    finishes; `deadline_s` tells Ray when the node will be killed. Raises what the call raises."""
    gcs = ray._raylet.GcsClient(address=ray.get_runtime_context().gcs_address)
    deadline_ms = int((time.time() + deadline_s) * 1000)
    answer = gcs.drain_node(node_id, _REASON, message, deadline_ms, timeout=timeout_s)
    if not (isinstance(answer, tuple) and len(answer) == 2):
        raise RayInternalsChanged(f"Ray {ray.__version__}: drain_node answered {answer!r}, not (accepted, reason)")
    accepted, why = answer
    return DrainAnswer(bool(accepted), why.decode(errors="replace") if isinstance(why, bytes) else str(why))
