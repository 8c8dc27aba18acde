"""Typed exceptions for failed calls, carrying the service's ErrorInfo reason and RetryInfo delay.

The service puts a google.rpc.Status in the `grpc-status-details-bin` trailer: an ErrorInfo whose
reason names an `ErrorReason` value (protos/embedding_service/v1/error_reason.proto, without its
prefix), and a RetryInfo on retryable failures. Ray Serve's proxy drops a failed stream's
trailers; there the status message leads with the reason and a colon.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import grpc
from google.rpc import error_details_pb2, status_pb2

from embedding_client.v1 import error_reason_pb2

STATUS_DETAILS_KEY = "grpc-status-details-bin"
# Every reason the service names (INPUT_TOO_LONG, OVERLOADED, ...).
REASONS = frozenset(v.name.removeprefix("ERROR_REASON_") for v in error_reason_pb2.ErrorReason.DESCRIPTOR.values
                    if v.number)
RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})


@dataclass(frozen=True)
class ErrorDetails:
    """What a failed call says about itself."""

    reason: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    retry_after_s: float | None = None


def read_details(trailing_metadata: Iterable[tuple[str, str | bytes]] | None, message: str = "") -> ErrorDetails:
    """The ErrorInfo and RetryInfo of a failed call; a failed stream's reason from its message."""
    raw = next((v for k, v in trailing_metadata or () if k == STATUS_DETAILS_KEY), None)
    if raw is None:
        head = message.split(":", 1)[0]
        return ErrorDetails(reason=head if ":" in message and head in REASONS else None)
    reason, metadata, delay = None, {}, None
    for detail in status_pb2.Status.FromString(raw).details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, metadata = info.reason, dict(info.metadata)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            delay = retry.retry_delay.ToNanoseconds() / 1e9
    return ErrorDetails(reason, metadata, delay)


class EmbeddingError(Exception):
    """A call the service (or the transport) failed. `reason` is the service's ErrorInfo reason, when it sent one."""

    def __init__(self, code: grpc.StatusCode, message: str, details: ErrorDetails | None = None,
                 target: str | None = None) -> None:
        details = details or ErrorDetails()
        super().__init__(f"{code.name}{f' {details.reason}' if details.reason else ''}: {message}")
        self.code = code
        self.message = message
        self.reason = details.reason
        self.metadata = details.metadata
        self.retry_after_s = details.retry_after_s
        self.target = target

    @property
    def retryable(self) -> bool:
        return self.code in RETRYABLE_CODES


class InvalidArgument(EmbeddingError):
    """The request is wrong (the reason and metadata say which input and why); do not retry."""


class NotFound(EmbeddingError):
    """No such model."""


class FailedPrecondition(EmbeddingError):
    """The model cannot serve (for example MODEL_REFUSED: its replicas missed their accuracy check)."""


class ResourceExhausted(EmbeddingError):
    """The service is overloaded; retried by the client within its deadline."""


class Unavailable(EmbeddingError):
    """No target could take the call; retried by the client within its deadline."""


class DeadlineExceeded(EmbeddingError):
    """The call's deadline passed."""


class Unauthenticated(EmbeddingError):
    """No API key, or one the service does not know."""


class PermissionDenied(EmbeddingError):
    """The API key may not make this call."""


class AlreadyExists(EmbeddingError):
    """What the call would create exists already (a job's request_id spent on another request)."""


_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
}


def error_of(code: grpc.StatusCode, message: str, details: ErrorDetails | None = None,
             target: str | None = None) -> EmbeddingError:
    return _BY_CODE.get(code, EmbeddingError)(code, message, details, target)


def from_rpc_error(err: grpc.RpcError, target: str | None = None) -> EmbeddingError:
    """The typed exception of a failed gRPC call (sync or asyncio)."""
    code = err.code() or grpc.StatusCode.UNKNOWN
    message = err.details() or code.name.lower()
    return error_of(code, message, read_details(err.trailing_metadata(), message), target)
