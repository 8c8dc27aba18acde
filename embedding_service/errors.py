"""Service errors and their mapping to gRPC statuses: the one place that does it.

Every failure leaves the router as a canonical gRPC code, a short message and a
google.rpc.Status with an ErrorInfo (reason, domain, metadata) in the
`grpc-status-details-bin` trailer, never as INTERNAL with a stack trace.
"""

from __future__ import annotations

import functools
import logging

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

logger = logging.getLogger(__name__)

DOMAIN = "embedding-service"
STATUS_DETAILS_KEY = "grpc-status-details-bin"


class ServiceError(Exception):
    """A failure with a precise gRPC code and an UPPER_SNAKE_CASE reason."""

    def __init__(
        self,
        code: grpc.StatusCode,
        reason: str,
        message: str,
        metadata: dict[str, object] | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.metadata = {k: str(v) for k, v in (metadata or {}).items()}
        self.retry_after_s = retry_after_s

    def __reduce__(self):  # keep it picklable across Ray processes
        return (type(self), (self.code, self.reason, self.message, self.metadata, self.retry_after_s))

    def to_status(self) -> status_pb2.Status:
        info = error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN, metadata=self.metadata)
        details = [info]
        if self.retry_after_s is not None:
            delay = error_details_pb2.RetryInfo()
            delay.retry_delay.FromNanoseconds(int(self.retry_after_s * 1e9))
            details.append(delay)
        packed = []
        for d in details:
            a = any_pb2.Any()
            a.Pack(d)
            packed.append(a)
        return status_pb2.Status(code=self.code.value[0], message=self.message, details=packed)


def invalid(reason: str, message: str, **metadata: object) -> ServiceError:
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, reason, message, metadata)


def not_found(reason: str, message: str, **metadata: object) -> ServiceError:
    return ServiceError(grpc.StatusCode.NOT_FOUND, reason, message, metadata)


def unavailable(reason: str, message: str, retry_after_s: float = 1.0, **metadata: object) -> ServiceError:
    return ServiceError(grpc.StatusCode.UNAVAILABLE, reason, message, metadata, retry_after_s=retry_after_s)


def from_exception(exc: BaseException) -> ServiceError:
    """Classify any exception that reached the edge of the router."""
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, BackPressureError):
        return ServiceError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "OVERLOADED",
            "the service is saturated; retry with backoff",
            retry_after_s=1.0,
        )
    if isinstance(exc, DeploymentUnavailableError):
        return unavailable("MODEL_UNAVAILABLE", "no model replica is available; retry shortly")
    if isinstance(exc, TimeoutError):
        return ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, "TIMEOUT", "the request timed out")
    logger.exception("unexpected error while serving a request")
    return ServiceError(grpc.StatusCode.INTERNAL, "INTERNAL", "internal error; see the service logs")


def unary(empty_response):
    """Decorates a unary gRPC method: any failure becomes its mapped status, with an empty reply."""

    def wrap(method):
        @functools.wraps(method)
        async def handler(self, request, grpc_context=None):
            try:
                return await method(self, request, grpc_context)
            except Exception as exc:  # mapped, never leaked as INTERNAL + stack trace
                apply_to_context(from_exception(exc), grpc_context)
                return empty_response()

        return handler

    return wrap


def apply_to_context(error: ServiceError, grpc_context) -> None:
    """Write the error onto Ray Serve's gRPC context (code, details, rich status)."""
    grpc_context.set_code(error.code)
    grpc_context.set_details(error.message)
    grpc_context.set_trailing_metadata([(STATUS_DETAILS_KEY, error.to_status().SerializeToString())])


class StreamAborted(Exception):
    """Raised to end a server stream whose status was set on the context."""


def abort_stream(error: ServiceError, grpc_context) -> StreamAborted:
    """Sets the status of a failed server stream; the caller raises what it returns.

    Ray's proxy ends a failed stream with the code and details alone (trailing
    metadata is lost), so the reason leads the details there.
    """
    details = f"{error.reason}: {error.message}"
    grpc_context.set_code(error.code)
    grpc_context.set_details(details)
    return StreamAborted(details)
