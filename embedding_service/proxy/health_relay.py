"""grpc.health.v1 answered inside Ray Serve's gRPC proxy, from the router's view relayed over one stream.

A Watch served by the router would hold one of its `max_ongoing_requests` slots for as long as the caller
watches, and every client keeps one Watch open per target: 300 watchers starved a router of 256 slots. So
the proxy answers Check, Watch and List itself (a passthrough service: Serve does not route it), and each
proxy follows the router through ONE stream (`EmbedRouter.health_updates`), which sends the whole status
table at once and again at each change. The router stays the one source of truth: its statuses, and whether
any router answers at all.

While that stream is broken the last table stands for `stale_after_s` (a router replaced in an upgrade is
followed again within it); past that, every service is NOT_SERVING until a router answers again.

One service is the proxy's own: LIVENESS is SERVING whenever this proxy answers at all, whatever the router
and the models say, for a Kubernetes liveness probe (a pod restarted because a model is down would only make
things worse).

The servicer is the standard one's shape (grpcio-health-checking's asyncio servicer): one status table, one
condition its watchers wait on, a message to a watcher only when its service's status changed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from grpc_health.v1 import health_pb2, health_pb2_grpc

from embedding_service.observability.logs import service_logger
from embedding_service.wire import status
from embedding_service.wire.messages import LIVENESS, ROUTER_DEPLOYMENT
from embedding_service.wire.reasons import Reason, ServiceError

logger = service_logger(__name__)

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
# A first table is awaited this long by the first calls after the proxy starts, instead of answering "unknown".
FIRST_TABLE_WAIT_S = 5.0


async def follow_router(method: str = "health_updates") -> AsyncIterator:
    """What the router's streaming `method` sends (its status tables by default), through a deployment handle
    found by asking Serve which app holds it."""
    from ray import serve  # only in the proxy: this module is imported outside Ray too

    found = await asyncio.to_thread(serve.status)  # a blocking call to Serve's controller
    apps = sorted(name for name, app in found.applications.items() if ROUTER_DEPLOYMENT in app.deployments)
    if not apps:
        raise LookupError(f"no application with a {ROUTER_DEPLOYMENT} deployment is running")
    if len(apps) > 1:
        logger.warning("several applications hold %s (%s); the proxy follows %s", ROUTER_DEPLOYMENT, apps, apps[0])
    handle = serve.get_deployment_handle(ROUTER_DEPLOYMENT, apps[0]).options(stream=True)
    async for update in getattr(handle, method).remote():
        yield update


class HealthRelay(health_pb2_grpc.HealthServicer):
    def __init__(self, follow: Callable[[], AsyncIterator[dict[str, int]]] | None = None,
                 stale_after_s: float = 3.0, retry_s: tuple[float, float] = (0.2, 5.0)) -> None:
        """`follow`: the router's tables (default: follow_router)."""
        self._statuses: dict[str, int] = {LIVENESS: SERVING}  # nothing else is known until the router says
        self._changed = asyncio.Condition()
        self._follow = follow or follow_router
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
                if "" not in self._statuses:
                    await self._apply({"": NOT_SERVING})
                self._first.set()

    async def _apply(self, table: dict[str, int]) -> None:
        """The router's table becomes the proxy's (its own LIVENESS kept); watchers learn of what changed."""
        statuses = {**table, LIVENESS: SERVING}
        if statuses != self._statuses:
            self._statuses = statuses
            async with self._changed:
                self._changed.notify_all()
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
        table = {service: NOT_SERVING for service in self._statuses if service != LIVENESS} or {"": NOT_SERVING}
        self._marking = asyncio.get_running_loop().create_task(self._apply(table))

    async def Check(self, request: health_pb2.HealthCheckRequest, context) -> health_pb2.HealthCheckResponse:
        if request.service == LIVENESS:  # at once: a probe's timeout is short, and this needs no router
            self._follow_router()
            return health_pb2.HealthCheckResponse(status=SERVING)
        await self._known()
        found = self._statuses.get(request.service)
        if found is None:
            status.apply(ServiceError(Reason.SERVICE_UNKNOWN, f"unknown health service {request.service!r}"), context)
            return health_pb2.HealthCheckResponse()
        return health_pb2.HealthCheckResponse(status=found)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context) -> None:
        """The service's status now, then each time it changes; SERVICE_UNKNOWN while the router knows none
        by that name (the call stays open)."""
        await self._known()
        last = None
        while True:
            current = self._statuses.get(request.service, SERVICE_UNKNOWN)
            if current != last:
                await context.write(health_pb2.HealthCheckResponse(status=current))
                last = current
            async with self._changed:
                await self._changed.wait()

    async def List(self, request: health_pb2.HealthListRequest, context) -> health_pb2.HealthListResponse:
        await self._known()
        response = health_pb2.HealthListResponse()
        for service, found in self._statuses.items():
            response.statuses[service].status = found
        return response
