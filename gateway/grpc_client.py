"""The gateway's gRPC client: shared channels, deadlines, retries with backoff, round-robin targets.

Each attempt is counted by its code and, with tracing on, spanned, its context
sent on in `traceparent` metadata so the router's span joins the trace.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from embedding_service import tracing
from embedding_service.error_reasons import read_details
from embedding_service.tracing import Tracer
from embedding_service.v1 import embedding_pb2_grpc
from gateway.metrics import GatewayMetrics
from gateway.settings import GatewaySettings

_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}


class EmbedClient:
    def __init__(self, settings: GatewaySettings, metrics: GatewayMetrics, tracer: Tracer) -> None:
        self.settings = settings
        self.metrics = metrics
        self.tracer = tracer
        options = [
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
        ]
        # One channel per target, shared by every request (HTTP/2 multiplexes).
        self._channels = [grpc.aio.insecure_channel(t, options=options) for t in settings.targets]
        self._stubs = [embedding_pb2_grpc.EmbedServiceStub(c) for c in self._channels]
        self._health = [health_pb2_grpc.HealthStub(c) for c in self._channels]
        self._turn = itertools.count()
        key = settings.upstream_api_key
        self._metadata = (("authorization", f"Bearer {key.get_secret_value()}"),) if key else ()

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self._channels))

    async def call(self, method: str, request: Any, deadline: float | None = None) -> Any:
        """Calls EmbedService.<method>, retrying UNAVAILABLE and RESOURCE_EXHAUSTED within the deadline
        (event-loop time; by default request_timeout_s from now)."""
        s = self.settings
        loop = asyncio.get_running_loop()
        if deadline is None:
            deadline = loop.time() + s.request_timeout_s
        for attempt in itertools.count():
            stub = self._stubs[next(self._turn) % len(self._stubs)]
            remaining = deadline - loop.time()
            try:
                reply = await self._attempt(stub, method, request, max(0.001, min(s.call_timeout_s, remaining)))
                self.metrics.upstream_calls.labels(method, "OK").inc()
                return reply
            except grpc.aio.AioRpcError as err:
                code = err.code().name
                self.metrics.upstream_calls.labels(method, code).inc()
                if err.code() not in _RETRYABLE or attempt >= s.max_retries:
                    raise
                hinted = read_details(err.trailing_metadata()).retry_after_s
                backoff = min(s.backoff_max_s, s.backoff_initial_s * 2**attempt) * (0.5 + random.random() / 2)
                delay = hinted if hinted is not None else backoff
                if loop.time() + delay >= deadline:
                    raise
                self.metrics.upstream_retries.labels(method, code).inc()
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def _attempt(self, stub, method: str, request: Any, timeout: float) -> Any:
        if not self.tracer.enabled:
            return await getattr(stub, method)(request, timeout=timeout, metadata=self._metadata)
        with self.tracer.span(f"EmbedService/{method}", kind="CLIENT",
                              attributes={"rpc.system": "grpc", "rpc.method": method}) as span:
            metadata = self._metadata + tuple(self.tracer.inject().items())
            try:
                reply = await getattr(stub, method)(request, timeout=timeout, metadata=metadata)
            except grpc.aio.AioRpcError as err:
                tracing.set_error(span, err.code().name, err.details() or "")
                raise
            tracing.set_error(span, "OK")
            return reply

    async def serving(self) -> bool:
        """Whether some target's gRPC health says the whole service is SERVING."""
        for health in self._health:
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
            except grpc.aio.AioRpcError:
                continue
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return True
        return False
