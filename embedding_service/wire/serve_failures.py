"""Serve's and Ray's own failures, read as the service's: one module for the proxy and the router both.

Serve and Ray report some failures with no reason of the service attached, and each process that meets them
must read them alike:

- In Serve's gRPC proxy, a status Serve set itself: its queue full (RESOURCE_EXHAUSTED), no router replica
  (UNAVAILABLE), a router replica lost mid-call (INTERNAL with Ray's text), its own handler raising (gRPC
  would answer UNKNOWN with the exception's class). Each gets the service's reason and a RetryInfo delay;
  a lost router is also what the proxy sends again (`router_lost`).
- In the router, what a handle call to a deployment raises: Serve's exceptions (a full queue, no replica)
  get the service's reasons (wire/status.py asks here); Ray's (the replica's actor or node died) and a
  replica's own refusal or device fault mean "the replica is gone": the shard goes again to a live one
  (`replica_gone`).
"""

from __future__ import annotations

import grpc
import ray
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from embedding_client.errors import read_details
from embedding_service.wire.messages import ReplicaFaulted, ReplicaRefused
from embedding_service.wire.reasons import Reason, ServiceError

# What a status that Serve's proxy set itself (no reason of ours attached) means to a caller.
_SERVE_STATUSES = {
    grpc.StatusCode.RESOURCE_EXHAUSTED: (Reason.OVERLOADED,
                                         "the service's queues are full; retry after the RetryInfo delay"),
    grpc.StatusCode.UNAVAILABLE: (Reason.SERVICE_UNAVAILABLE, "no router replica can take the call now; retry shortly"),
    # Serve reports a router replica that died mid-call as INTERNAL with Ray's error text.
    grpc.StatusCode.INTERNAL: (Reason.SERVICE_UNAVAILABLE, "the call's router replica stopped before answering; retry"),
    grpc.StatusCode.UNKNOWN: (Reason.SERVICE_UNAVAILABLE, "the service failed to complete the call; retry"),
}


def _text(details) -> str:
    details = details or ""
    return details.decode(errors="replace") if isinstance(details, bytes) else details


def _has_reason(details, trailers) -> bool:
    """Whether a status carries a reason of the service (the router's): in its trailers, or leading a stream's
    message (Serve drops a failed stream's trailers)."""
    return read_details(trailers, _text(details)).reason is not None


def serve_status_error(code: grpc.StatusCode | None, details, trailers) -> ServiceError | None:
    """The service's error for a status Serve's proxy set on its own; None for any other (OK, the router's)."""
    if code not in _SERVE_STATUSES or _has_reason(details, trailers):
        return None
    return ServiceError(*_SERVE_STATUSES[code])


def serve_raised_error() -> ServiceError:
    """The service's error for a call whose Serve handler raised."""
    return ServiceError(*_SERVE_STATUSES[grpc.StatusCode.UNKNOWN])


def router_lost(code: grpc.StatusCode | None, details, trailers) -> bool:
    """Whether Serve's status says the call's router replica was lost mid-call (INTERNAL, no reason of the
    router's): the call may go again to another."""
    return code == grpc.StatusCode.INTERNAL and not _has_reason(details, trailers)


def serve_exception_error(exc: BaseException) -> ServiceError | None:
    """The service's error for an exception Serve raised from a handle call; None for any other."""
    if isinstance(exc, BackPressureError):
        return ServiceError(Reason.OVERLOADED, "the service is saturated; retry after the RetryInfo delay")
    if isinstance(exc, DeploymentUnavailableError):
        return ServiceError(Reason.MODEL_UNAVAILABLE, "no model replica is available; retry shortly")
    return None


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
    """Whether a call to a model replica failed because the replica went away or its device failed (send the
    shard again, to a live replica), rather than because the request is bad."""
    # A replica's own ReplicaFaulted / ReplicaRefused reaches the caller wrapped in a RayTaskError.
    return isinstance(exc, _GONE) or isinstance(getattr(exc, "cause", None), _REPLICA_OWN)


def cause_label(exc: BaseException) -> str:
    """A bounded label: the class of the failure (ReplicaFaulted inside Ray's wrapper)."""
    cause = getattr(exc, "cause", None)
    return type(cause if isinstance(cause, _REPLICA_OWN) else exc).__name__
