"""The gateway's connection to the service: the client library's AsyncEmbedClient, observed.

Each attempt is counted by method and code and, with tracing on, spanned, its context sent on in
`traceparent` metadata so the router's span joins the trace (a gRPC client interceptor); each
retry is counted too.
"""

from __future__ import annotations

import asyncio

import grpc

from embedding_client import AsyncEmbedClient, RetryPolicy
from embedding_service.observability import tracing
from embedding_service.observability.tracing import Tracer
from embedding_service.wire.deadline import Deadline
from gateway.metrics import GatewayMetrics
from gateway.settings import GatewaySettings


class _ObserveAttempts(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, metrics: GatewayMetrics, tracer: Tracer) -> None:
        self.metrics = metrics
        self.tracer = tracer

    async def intercept_unary_unary(self, continuation, details: grpc.aio.ClientCallDetails, request):
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        method = method.rsplit("/", 1)[-1]
        if not self.tracer.enabled:
            return await self._counted(method, continuation, details, request)
        with self.tracer.span(f"EmbedService/{method}", kind="CLIENT",
                              attributes={"rpc.system": "grpc", "rpc.method": method}) as span:
            metadata = grpc.aio.Metadata(*(details.metadata or ()), *self.tracer.inject().items())
            details = grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials,
                                                 details.wait_for_ready)
            try:
                call = await self._counted(method, continuation, details, request)
            except grpc.aio.AioRpcError as err:
                tracing.set_error(span, err.code().name, err.details() or "")
                raise
            tracing.set_error(span, "OK")
            return call

    async def _counted(self, method: str, continuation, details, request):
        call = await continuation(details, request)
        try:
            await call
        except grpc.aio.AioRpcError as err:
            self.metrics.upstream_calls.labels(method, err.code().name).inc()
            raise
        self.metrics.upstream_calls.labels(method, "OK").inc()
        return call


def upstream_client(settings: GatewaySettings, metrics: GatewayMetrics, tracer: Tracer) -> AsyncEmbedClient:
    """The client of settings.targets (round-robin, health watched), with the gateway's retries and deadlines."""
    key = settings.upstream_api_key
    return AsyncEmbedClient(
        settings.targets,
        api_key=key.get_secret_value() if key else "",
        timeout_s=settings.request_timeout_s,
        call_timeout_s=settings.call_timeout_s,
        retry=RetryPolicy(settings.max_retries, settings.backoff_initial_s, settings.backoff_max_s),
        interceptors=[_ObserveAttempts(metrics, tracer)],
        max_message_bytes=settings.max_message_bytes,
        on_retry=lambda method, error, delay: metrics.upstream_retries.labels(method, error.code.name).inc(),
    )


def loop_deadline(deadline: Deadline) -> float | None:
    """The client's form of a deadline: event-loop time (None: unbounded)."""
    left = deadline.remaining()
    return None if left is None else asyncio.get_running_loop().time() + left
