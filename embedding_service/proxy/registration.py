"""The service's gRPC services registered on Serve's proxy server: what `grpc_servicer_functions` runs
(serve-config.yaml names them through ingress.py).

The generated registration lists each service's handlers on a stand-in server (_Capture); they are then
registered on Serve's with two changes:

- Request-streaming: every EmbedService method is registered as request-streaming (its behaviour is Serve's
  handler, wrapped by handlers.py), so gRPC reads a request's bytes only when the handler asks for them,
  after the caller's key was checked: a caller without a key costs the proxy its headers.
- Lenient parsing (parsing.py): request bytes that do not parse reach the handler as a Malformed, which it
  answers MALFORMED_REQUEST.

grpc.health.v1 is answered here, in the proxy, from the router's view that each proxy follows over one
stream (health_relay.py): a passthrough service, which Serve runs as registered.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2_grpc

from embedding_client.v1 import embedding_pb2_grpc
from embedding_service.proxy import serve_internals
from embedding_service.proxy.handlers import guarded
from embedding_service.proxy.health_relay import HealthRelay
from embedding_service.proxy.parsing import lenient, refused_malformed
from embedding_service.proxy.state import this_proxy


def add_EmbedServiceServicer_to_server(servicer: Any, server: Any) -> None:  # noqa: N802 (gRPC's naming)
    proxy = this_proxy()
    proxy.check_options()
    capture = _Capture()
    embedding_pb2_grpc.add_EmbedServiceServicer_to_server(servicer, capture)
    # Request-streaming: gRPC reads a request only when its handler asks, after the caller's key was checked.
    handlers = {name: _read_on_demand(h) for name, h in capture.handlers.items()}
    # Serve swaps each handler's behaviour for one made by its factory; ours wraps that, for these services only.
    with serve_internals.wrapped_handler_factory(server, guarded):
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(capture.service, handlers),))
        server.add_registered_method_handlers(capture.service, handlers)


def add_HealthServicer_to_server(servicer: Any, server: Any) -> None:  # noqa: N802
    """grpc.health.v1 answered here, in the proxy, from the router's relayed view (health_relay.py)."""
    capture = _Capture()
    health_pb2_grpc.add_HealthServicer_to_server(HealthRelay(), capture)
    handlers = {name: _checked(name, h) for name, h in capture.handlers.items()}
    serve_internals.add_passthrough(server, capture.service)  # Serve runs these handlers as they are
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(capture.service, handlers),))
    server.add_registered_method_handlers(capture.service, handlers)


class _Capture:
    """Stands in for the server while the generated code lists its handlers."""

    def __init__(self) -> None:
        self.service = ""
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.service, self.handlers = service, handlers


def _read_on_demand(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """The handler registered as request-streaming (its behaviour is Serve's to set), with a lenient parser."""
    make = grpc.stream_stream_rpc_method_handler if handler.response_streaming else grpc.stream_unary_rpc_method_handler
    return make(handler.unary_stream or handler.unary_unary, request_deserializer=lenient(handler.request_deserializer),
                response_serializer=handler.response_serializer)


def _rebuilt(handler: grpc.RpcMethodHandler, behaviour: Callable) -> grpc.RpcMethodHandler:
    """The handler with a lenient request parser and `behaviour`, built by grpc's own constructors."""
    make = grpc.unary_stream_rpc_method_handler if handler.response_streaming else grpc.unary_unary_rpc_method_handler
    return make(behaviour, request_deserializer=lenient(handler.request_deserializer),
                response_serializer=handler.response_serializer)


def _checked(method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler run here whose request bytes that do not parse get MALFORMED_REQUEST, as Serve-routed ones."""
    if handler.response_streaming:
        behaviour = handler.unary_stream

        async def server_stream(request, context):
            if not refused_malformed(request, context, True, method):
                await behaviour(request, context)

        return _rebuilt(handler, server_stream)
    behaviour = handler.unary_unary

    async def unary(request, context):
        return None if refused_malformed(request, context, False, method) else await behaviour(request, context)

    return _rebuilt(handler, unary)
