"""Exceptions to gRPC statuses: the one place that decides what a caller sees.

Every failure leaves the service as a canonical code, a plain message and a
google.rpc.Status (ErrorInfo; RetryInfo when retryable) in the
`grpc-status-details-bin` trailer, never as INTERNAL or UNKNOWN with a stack
trace. The reasons and their codes come from the proto (wire/reasons.py).
"""

from __future__ import annotations

import asyncio
import functools
import inspect

from google.protobuf import message_factory

from embedding_client.errors import STATUS_DETAILS_KEY
from embedding_client.v1 import embedding_pb2
from embedding_service.observability.logs import service_logger
from embedding_service.wire.reasons import Reason, ServiceError
from embedding_service.wire.serve_failures import serve_exception_error

logger = service_logger(__name__)

# Ray's proxy routes by method name alone, so a name identifies the reply type.
_REPLY_TYPES = {
    method.name: message_factory.GetMessageClass(method.output_type)
    for method in embedding_pb2.DESCRIPTOR.services_by_name["EmbedService"].methods
}


def classify(exc: BaseException) -> ServiceError:
    """What any exception that reached the edge of the service means to its caller."""
    if isinstance(exc, ServiceError):
        return exc
    serve_error = serve_exception_error(exc)  # Serve's own (a full queue, no replica)
    if serve_error is not None:
        return serve_error
    if isinstance(exc, TimeoutError):
        return ServiceError(Reason.TIMEOUT, "the call did not finish within its deadline")
    return ServiceError(Reason.INTERNAL, "internal error; see the service logs")


def code_name(exc: BaseException) -> str:
    """The gRPC code name a call ending with `exc` gets (CANCELLED when its caller left)."""
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return "CANCELLED"
    return classify(exc).code.name


def from_exception(exc: BaseException) -> ServiceError:
    """classify(), logging what was not expected."""
    error = classify(exc)
    if error is not exc and error.reason == Reason.INTERNAL:
        logger.error("unexpected error while serving a call", exc_info=exc)
    return error


def apply(error: ServiceError, grpc_context, stream: bool = False) -> None:
    """Writes the error onto a gRPC context: Serve's (in a replica) or the real one (in the proxy).

    Ray's proxy ends a failed stream with the code and message alone, so a
    stream's message starts with the reason.
    """
    grpc_context.set_code(error.code)
    grpc_context.set_details(error.stream_details() if stream else error.message)
    grpc_context.set_trailing_metadata([(STATUS_DETAILS_KEY, error.status_bytes())])


class StreamAborted(Exception):
    """Raised to end a server stream whose status is already set on the context."""


def grpc_method(method):
    """Wraps a gRPC method of the router (unary or server-streaming): every failure becomes its mapped status."""
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(self, request, grpc_context=None):
            try:
                async for item in method(self, request, grpc_context):
                    yield item
            except Exception as exc:  # a stream ends with an error only by raising; Ray keeps the code set first
                error = from_exception(exc)
                apply(error, grpc_context, stream=True)
                raise StreamAborted(error.stream_details()) from None

        return stream

    reply_type = _REPLY_TYPES[method.__name__]

    @functools.wraps(method)
    async def unary(self, request, grpc_context=None):
        try:
            return await method(self, request, grpc_context)
        except Exception as exc:
            apply(from_exception(exc), grpc_context)
            return reply_type()

    return unary
