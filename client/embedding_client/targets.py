"""The service's targets: one channel each, their health followed through grpc.health.v1 Watch, round-robin.

A target whose health says NOT_SERVING gets no calls. One that has not answered yet, or whose Watch
stream broke (its health unknown), is tried only while no target says SERVING.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from embedding_client.v1 import embedding_pb2_grpc

logger = logging.getLogger("embedding_client")

SERVING = health_pb2.HealthCheckResponse.SERVING
UNKNOWN = health_pb2.HealthCheckResponse.UNKNOWN


class Target:
    def __init__(self, address: str, channel: grpc.aio.Channel) -> None:
        self.address = address
        self.channel = channel
        self.stub = embedding_pb2_grpc.EmbedServiceStub(channel)
        self.health = health_pb2_grpc.HealthStub(channel)
        self.status = UNKNOWN  # health of the whole service ("") as the target last said


class TargetPool:
    """Channels to every target (made on the running event loop), each one's health watched."""

    def __init__(self, addresses: Sequence[str], options: Sequence[tuple[str, object]],
                 credentials: grpc.ChannelCredentials | None = None,
                 interceptors: Sequence[grpc.aio.ClientInterceptor] = (), watch_health: bool = True,
                 watch_retry_max_s: float = 5.0) -> None:
        if not addresses:
            raise ValueError("at least one target (host:port) is needed")

        def channel(address: str) -> grpc.aio.Channel:
            if credentials is not None:
                return grpc.aio.secure_channel(address, credentials, options=options, interceptors=interceptors)
            return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)

        self.targets = [Target(a, channel(a)) for a in addresses]
        self._turn = itertools.count()
        self._watch_retry_max_s = watch_retry_max_s
        self._watchers = [asyncio.ensure_future(self._watch(t)) for t in self.targets] if watch_health else []
        self.changed = asyncio.Event()  # set at every health change (tests and callers may wait on it)

    def pick(self, avoid: Target | None = None) -> Target | None:
        """The next target round-robin: those saying SERVING, else those of unknown health; never NOT_SERVING.
        `avoid` (the target that just failed) is skipped when another qualifies."""
        serving = [t for t in self.targets if t.status == SERVING]
        pool = serving or [t for t in self.targets if t.status == UNKNOWN]
        if avoid is not None and len(pool) > 1:
            pool = [t for t in pool if t is not avoid]
        if not pool:
            return None
        return pool[next(self._turn) % len(pool)]

    def serving(self) -> bool:
        return any(t.status == SERVING for t in self.targets)

    async def _watch(self, target: Target) -> None:
        delay = 0.1
        while True:
            try:
                async for reply in target.health.Watch(health_pb2.HealthCheckRequest(service="")):
                    if reply.status != target.status:
                        logger.info("target %s: %s", target.address,
                                    health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
                    target.status = reply.status
                    delay = 0.1
                    self._changed()
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as err:
                if err.code() == grpc.StatusCode.UNIMPLEMENTED:  # no health service there: calls decide
                    target.status = UNKNOWN
                    self._changed()
                    return
            except Exception:
                logger.exception("watching %s's health", target.address)
            if target.status != UNKNOWN:
                target.status = UNKNOWN
                self._changed()
            await asyncio.sleep(delay)
            delay = min(self._watch_retry_max_s, delay * 2)

    def _changed(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    async def close(self) -> None:
        for w in self._watchers:
            w.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        await asyncio.gather(*(t.channel.close() for t in self.targets))
