"""The gateway's gRPC client: shared channels, deadlines, retries with backoff, round-robin targets."""

from __future__ import annotations

import asyncio
import itertools
import random
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from embedding_service.error_reasons import read_details
from embedding_service.v1 import embedding_pb2_grpc
from gateway.settings import GatewaySettings

_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}


class EmbedClient:
    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
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

    async def call(self, method: str, request: Any) -> Any:
        """Calls EmbedService.<method>, retrying UNAVAILABLE and RESOURCE_EXHAUSTED within the deadline."""
        s = self.settings
        loop = asyncio.get_running_loop()
        deadline = loop.time() + s.request_timeout_s
        for attempt in itertools.count():
            stub = self._stubs[next(self._turn) % len(self._stubs)]
            remaining = deadline - loop.time()
            try:
                return await getattr(stub, method)(request, timeout=max(0.001, min(s.call_timeout_s, remaining)),
                                                   metadata=self._metadata)
            except grpc.aio.AioRpcError as err:
                if err.code() not in _RETRYABLE or attempt >= s.max_retries:
                    raise
                hinted = read_details(err.trailing_metadata()).retry_after_s
                backoff = min(s.backoff_max_s, s.backoff_initial_s * 2**attempt) * (0.5 + random.random() / 2)
                delay = hinted if hinted is not None else backoff
                if loop.time() + delay >= deadline:
                    raise
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

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
