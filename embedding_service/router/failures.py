"""Which failures of a call to a model replica mean "the replica went away or its device failed" (send the
shard again, to a live replica), rather than "the request is bad"."""

from __future__ import annotations

import ray

from embedding_service.wire.messages import ReplicaFaulted, ReplicaRefused

_GONE = (
    ray.exceptions.RayActorError,
    ray.exceptions.ActorUnavailableError,
    ray.exceptions.WorkerCrashedError,
    ray.exceptions.NodeDiedError,
    ReplicaFaulted,
    ReplicaRefused,
)
_REPLICA_OWN = (ReplicaFaulted, ReplicaRefused)


def replica_gone(exc: BaseException) -> bool:
    # A replica's own ReplicaFaulted / ReplicaRefused reaches the caller wrapped in a RayTaskError.
    return isinstance(exc, _GONE) or isinstance(getattr(exc, "cause", None), _REPLICA_OWN)


def cause_label(exc: BaseException) -> str:
    """A bounded label: the class of the failure (ReplicaFaulted inside Ray's wrapper)."""
    cause = getattr(exc, "cause", None)
    return type(cause if isinstance(cause, _REPLICA_OWN) else exc).__name__
