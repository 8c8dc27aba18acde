"""What runs inside Ray Serve's gRPC proxy: the service's methods as the proxy registers them.

serve-config.yaml names `add_EmbedServiceServicer_to_server` and
`add_HealthServicer_to_server` from here in `grpc_options.grpc_servicer_functions`.
The health service is answered here, from the router's view that each proxy
follows over one stream (health_relay.py). The embedding service's handlers are
registered the way Serve does, with three changes at the edge, before a call
costs the service anything:

- Request bytes that do not parse get INVALID_ARGUMENT (MALFORMED_REQUEST) and a
  plain message. gRPC's own deserializer failure is UNKNOWN, with Python's
  exception in the message.
- The caller's deadline goes on to the router as `embedding-timeout-ms`
  metadata (Serve does not pass it), so work for a caller who has left stops.
- Serve's own failures (its queue full, no router replica, a router replica gone
  mid-call) get the service's reasons and a RetryInfo delay, as every other error.

Every call answered here without a router's answer is counted
(`embedding_proxy_refusals`, by method, code and reason).
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable

import grpc
from grpc_health.v1 import health_pb2_grpc
from ray.serve._private.proxy_request_response import gRPCStreamingType

from embedding_client.v1 import embedding_pb2_grpc
from embedding_service import errors
from embedding_service.error_reasons import Reason, ServiceError, read_details
from embedding_service.health_relay import HealthRelay
from embedding_service.metrics import ProxyMetrics

logger = logging.getLogger("ray.serve")

TIMEOUT_KEY = "embedding-timeout-ms"

# What a failure that Serve itself reports (no reason of ours attached) means to a caller.
_SERVE_FAILURES = {
    grpc.StatusCode.RESOURCE_EXHAUSTED: (Reason.OVERLOADED, "the service's queues are full; retry after the RetryInfo delay"),
    grpc.StatusCode.UNAVAILABLE: (Reason.SERVICE_UNAVAILABLE, "no router replica can take the call now; retry shortly"),
    # Serve reports a router replica that died mid-call as INTERNAL with Ray's error text.
    grpc.StatusCode.INTERNAL: (Reason.SERVICE_UNAVAILABLE, "the call's router replica stopped before answering; retry"),
    grpc.StatusCode.UNKNOWN: (Reason.SERVICE_UNAVAILABLE, "the service failed to complete the call; retry"),
}


_metrics: ProxyMetrics | None = None


def _refuse(error: ServiceError, context, stream: bool, method: str) -> None:
    """Answers the call with `error` here, in the proxy, and counts it."""
    global _metrics
    errors.apply(error, context, stream=stream)
    if _metrics is None:  # made in the proxy on first use (this module is imported outside Ray too)
        _metrics = ProxyMetrics()
    _metrics.refusals.inc(tags={"method": method, "code": error.code.name, "reason": error.reason.name})


def add_EmbedServiceServicer_to_server(servicer: Any, server: Any) -> None:  # noqa: N802 (gRPC's naming)
    _register(embedding_pb2_grpc.add_EmbedServiceServicer_to_server, servicer, server)


def add_HealthServicer_to_server(servicer: Any, server: Any) -> None:  # noqa: N802
    """grpc.health.v1 answered here, in the proxy, from the router's relayed view (health_relay.py)."""
    capture = _Capture()
    health_pb2_grpc.add_HealthServicer_to_server(HealthRelay(), capture)
    handlers = {name: _checked(name, h) for name, h in capture.handlers.items()}
    server.add_passthrough_service(capture.service)  # Serve runs these handlers as they are
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(capture.service, handlers),))
    server.add_registered_method_handlers(capture.service, handlers)


def _checked(method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler run here whose request bytes that do not parse get MALFORMED_REQUEST, as Serve-routed ones."""
    if handler.unary_stream:
        behaviour = handler.unary_stream

        async def server_stream(request, context):
            if not _refused_malformed(request, context, True, method):
                await behaviour(request, context)

        return handler._replace(request_deserializer=_lenient(handler.request_deserializer),
                                unary_stream=server_stream)
    behaviour = handler.unary_unary

    async def unary(request, context):
        return None if _refused_malformed(request, context, False, method) else await behaviour(request, context)

    return handler._replace(request_deserializer=_lenient(handler.request_deserializer), unary_unary=unary)


class _Capture:
    """Stands in for the server while the generated code lists its handlers."""

    def __init__(self) -> None:
        self.service = ""
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.service, self.handlers = service, handlers


def _register(generated_add: Callable, servicer: Any, server: Any) -> None:
    capture = _Capture()
    generated_add(servicer, capture)
    handlers = {name: h._replace(request_deserializer=_lenient(h.request_deserializer))
                for name, h in capture.handlers.items()}
    # Serve swaps each handler's behaviour for one made by its factory; ours wraps
    # that, for these services only.
    original = server.service_handler_factory
    server.service_handler_factory = functools.partial(_guarded, original)
    try:
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(capture.service, handlers),))
        server.add_registered_method_handlers(capture.service, handlers)
    finally:
        server.service_handler_factory = original


class _Malformed:
    """A request whose bytes did not parse; the proxy answers it itself."""

    def __init__(self, error: ServiceError) -> None:
        self.error = error


def _refused_malformed(request, context, stream: bool, method: str) -> bool:
    """Answers a request whose bytes did not parse (MALFORMED_REQUEST); False for a parsed one."""
    if isinstance(request, _Malformed):
        _refuse(request.error, context, stream, method)
        return True
    return False


def _lenient(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    message_type = getattr(getattr(deserialize, "__self__", None), "DESCRIPTOR", None)
    name = message_type.full_name if message_type is not None else "request message"

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception:  # DecodeError, or whatever a parser raises on bad bytes
            return _Malformed(ServiceError(Reason.MALFORMED_REQUEST, f"the request bytes are not a valid {name}"))

    return parse


class _CallContext:
    """The proxy's view of a call, with the caller's remaining time added to the metadata Serve forwards."""

    def __init__(self, context) -> None:
        self._context = context
        metadata = [(k, v) for k, v in context.invocation_metadata() if k != TIMEOUT_KEY]
        remaining = context.time_remaining()
        if remaining is not None:
            metadata.append((TIMEOUT_KEY, str(int(remaining * 1000))))
        self._metadata = tuple(metadata)

    def invocation_metadata(self):
        return self._metadata

    def __getattr__(self, name: str):
        return getattr(self._context, name)


def _serve_raised(context, stream: bool, method: str) -> None:
    """Serve's own handler raised (gRPC would answer UNKNOWN with the exception's class): our status instead."""
    logger.exception("Serve's proxy failed a call")
    reason, message = _SERVE_FAILURES[grpc.StatusCode.UNKNOWN]
    _refuse(ServiceError(reason, message), context, stream, method)


def _explain_serve_failure(context, stream: bool, method: str) -> None:
    """A failure Serve reported on its own gets the service's reason and retry hint."""
    code = context.code()
    if code is None or code not in _SERVE_FAILURES:
        return
    details = context.details() or ""
    if isinstance(details, bytes):
        details = details.decode(errors="replace")
    if read_details(context.trailing_metadata(), details).reason is not None:
        return  # the router said why (its status trailer, or a failed stream's leading reason)
    reason, message = _SERVE_FAILURES[code]
    _refuse(ServiceError(reason, message), context, stream, method)


def _guarded(original: Callable, service_method: str, streaming_type: gRPCStreamingType) -> Callable:
    inner = original(service_method=service_method, streaming_type=streaming_type)
    method = service_method.rsplit("/", 1)[-1]
    if streaming_type == gRPCStreamingType.UNARY_UNARY:

        async def unary(request, context) -> bytes:
            if _refused_malformed(request, context, False, method):
                return b""
            try:
                reply = await inner(request, _CallContext(context))
            except Exception:
                _serve_raised(context, False, method)
                return b""
            _explain_serve_failure(context, False, method)
            return reply

        return unary
    if streaming_type == gRPCStreamingType.UNARY_STREAM:

        async def server_stream(request, context):
            if _refused_malformed(request, context, True, method):
                return
            try:
                async for message in inner(request, _CallContext(context)):
                    yield message
            except Exception:
                _serve_raised(context, True, method)
                return
            _explain_serve_failure(context, True, method)

        return server_stream
    return inner  # client streaming: not in these services
