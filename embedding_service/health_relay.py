"""grpc.health.v1 answered inside Ray Serve's gRPC proxy, from the router's view relayed over one stream.

A Watch served by the router would hold one of its `max_ongoing_requests`
slots for as long as the caller watches, and every client keeps one Watch open
per target: 300 watchers starved a router of 256 slots (measured). So the proxy
answers Check, Watch and List itself (a passthrough service: Serve does not
route it), and each proxy follows the router through ONE stream
(`EmbedRouter.health_updates`), which sends the whole status table at once and
again at each change. The router stays the one source of truth: its statuses,
and whether any router answers at all.

While that stream is broken the last table stands for `stale_after_s` (a router
replaced in an upgrade is followed again within it); past that, every service
is NOT_SERVING until a router answers again.

One service is the proxy's own: LIVENESS is SERVING whenever this proxy answers
at all, whatever the router and the models say, for a Kubernetes liveness probe
(a pod restarted because a model is down would only make things worse).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

from grpc_health.v1 import health, health_pb2

from embedding_service import errors
from embedding_service.error_reasons import Reason, ServiceError

logger = logging.getLogger("ray.serve")

ROUTER_DEPLOYMENT = "EmbedRouter"
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING
LIVENESS = "liveness"
# A first table is awaited this long by the first calls after the proxy starts, instead of answering "unknown".
FIRST_TABLE_WAIT_S = 5.0


async def follow_router() -> AsyncIterator[dict[str, int]]:
    """The router's status tables, through a deployment handle found by asking Serve which app holds it."""
    from ray import serve  # only in the proxy: this module is imported outside Ray too

    status = await asyncio.to_thread(serve.status)  # a blocking call to Serve's controller
    apps = sorted(name for name, app in status.applications.items() if ROUTER_DEPLOYMENT in app.deployments)
    if not apps:
        raise LookupError(f"no application with a {ROUTER_DEPLOYMENT} deployment is running")
    if len(apps) > 1:
        logger.warning("several applications hold %s (%s); health follows %s", ROUTER_DEPLOYMENT, apps, apps[0])
    handle = serve.get_deployment_handle(ROUTER_DEPLOYMENT, apps[0]).options(stream=True)
    async for table in handle.health_updates.remote():
        yield table


class HealthRelay(health.aio.HealthServicer):
    """grpcio's asyncio health servicer (its Watch), fed by the router's tables; Check names the reason, List added."""

    def __init__(self, follow: Callable[[], AsyncIterator[dict[str, int]]] = follow_router,
                 stale_after_s: float = 3.0, retry_s: tuple[float, float] = (0.2, 5.0)) -> None:
        super().__init__()
        self._server_status.clear()  # nothing is known, "" included, until the router says
        self._server_status[LIVENESS] = SERVING
        self._follow = follow
        self._stale_after_s = stale_after_s
        self._retry_s = retry_s
        self._first = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._marking: asyncio.Task | None = None

    def _follow_router(self) -> None:
        """Starts following on the first call (the proxy's loop runs by then)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._relay())

    async def _known(self) -> None:
        """Follows the router; waits briefly for a first table."""
        self._follow_router()
        if not self._first.is_set():
            try:
                await asyncio.wait_for(self._first.wait(), FIRST_TABLE_WAIT_S)
            except TimeoutError:  # no router yet: answer NOT_SERVING now and from here on until one does
                if "" not in self._server_status:
                    await self.set("", NOT_SERVING)
                self._first.set()

    async def _apply(self, table: dict[str, int]) -> None:
        for service in set(self._server_status) - set(table) - {LIVENESS}:
            await self.set(service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
            del self._server_status[service]
        for service, status in table.items():
            if self._server_status.get(service) != status:
                await self.set(service, status)
        self._first.set()

    async def _relay(self) -> None:
        loop = asyncio.get_running_loop()
        delay = self._retry_s[0]
        stale: asyncio.TimerHandle | None = None  # set while the router is lost
        while True:
            try:
                async for table in self._follow():
                    if stale is not None:
                        stale.cancel()
                        stale = None
                    await self._apply(table)
                    delay = self._retry_s[0]
                raise ConnectionError("the router ended its health stream")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 (whatever broke the stream, follow again)
                if stale is None:
                    logger.warning("health relay lost the router (%s); following again", exc)
                    # A timer, not a check in this loop: following again may hang (a deployment with no
                    # replica holds a handle call until one starts).
                    stale = loop.call_later(self._stale_after_s, self._mark_not_serving)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._retry_s[1])

    def _mark_not_serving(self) -> None:
        table = {service: NOT_SERVING for service in self._server_status if service != LIVENESS} or {"": NOT_SERVING}
        self._marking = asyncio.get_running_loop().create_task(self._apply(table))

    async def Check(self, request: health_pb2.HealthCheckRequest, context) -> health_pb2.HealthCheckResponse:
        if request.service == LIVENESS:  # at once: a probe's timeout is short, and this needs no router
            self._follow_router()
            return health_pb2.HealthCheckResponse(status=SERVING)
        await self._known()
        status = self._server_status.get(request.service)
        if status is None:
            error = ServiceError(Reason.SERVICE_UNKNOWN, f"unknown health service {request.service!r}")
            errors.apply(error, context)
            return health_pb2.HealthCheckResponse()
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context) -> None:
        await self._known()
        await super().Watch(request, context)

    async def List(self, request: health_pb2.HealthListRequest, context) -> health_pb2.HealthListResponse:
        await self._known()
        response = health_pb2.HealthListResponse()
        for service, status in self._server_status.items():
            response.statuses[service].status = status
        return response
