"""WatchNodes answered inside Ray Serve's gRPC proxy, from the router's node view relayed over one stream.

Served by the router, each WatchNodes held one of the router's call slots for as long as its caller watched
(300 watchers once starved a router of its 256). So, as for health (health_relay.py), each proxy follows the
router's view through ONE stream (`EmbedRouter.node_updates`) and serves its watchers from it. Watchers are
bounded per caller and in all (args.proxy.max_node_watchers*); a caller past either is refused OVERLOADED.

What a watcher sees depends on its key: node addresses, fault reasons and the recycler's action errors (its
command's output) go only to an admin key (args.auth.admin_keys_*); other callers see each node's id, state,
replicas and counts.

While the router's stream is broken the last view stands and the proxy follows again.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from collections.abc import AsyncIterator, Callable

from embedding_client.v1 import embedding_pb2 as pb
from embedding_service.config import ProxySettings
from embedding_service.observability.logs import service_logger
from embedding_service.proxy.health_relay import follow_router
from embedding_service.wire.reasons import Reason, ServiceError

logger = service_logger(__name__)

# The fields of a node only an admin key reads.
OPERATOR_FIELDS = ("node_ip", "reason", "action_error")


def follow_router_nodes() -> AsyncIterator[pb.WatchNodesResponse]:
    return follow_router("node_updates")


def caller_identity(key: bytes | None, peer_host: str) -> str:
    """Whom a watcher counts against: its key (hashed: a key is never kept), else its address."""
    return "key:" + hashlib.sha256(key).hexdigest()[:16] if key is not None else "host:" + peer_host


def public_view(view: pb.WatchNodesResponse) -> pb.WatchNodesResponse:
    """The view without what only an operator reads."""
    public = pb.WatchNodesResponse()
    public.CopyFrom(view)
    for node in public.nodes:
        for field in OPERATOR_FIELDS:
            node.ClearField(field)
    return public


class NodesRelay:
    def __init__(self, settings: ProxySettings, follow: Callable[[], AsyncIterator[pb.WatchNodesResponse]] | None = None,
                 retry_s: tuple[float, float] = (0.2, 5.0), on_count: Callable[[int], None] = lambda n: None) -> None:
        self.settings = settings
        self._follow = follow or follow_router_nodes
        self._retry_s = retry_s
        self._on_count = on_count
        self._view: pb.WatchNodesResponse | None = None
        self._public: pb.WatchNodesResponse | None = None
        self._changed = asyncio.Condition()
        self._watchers: Counter[str] = Counter()
        self._task: asyncio.Task | None = None

    @property
    def watchers(self) -> int:
        return sum(self._watchers.values())

    def admit(self, caller: str) -> None:
        """Counts a new watcher of `caller`'s; ServiceError OVERLOADED past either bound."""
        s = self.settings
        if self._watchers[caller] >= s.max_node_watchers_per_caller:
            raise ServiceError(Reason.OVERLOADED, f"this caller holds {s.max_node_watchers_per_caller} WatchNodes "
                               "streams open already (args.proxy.max_node_watchers_per_caller); close one first")
        if self.watchers >= s.max_node_watchers:
            raise ServiceError(Reason.OVERLOADED, f"this proxy serves {s.max_node_watchers} WatchNodes streams "
                               "already (args.proxy.max_node_watchers); retry after the RetryInfo delay")
        self._watchers[caller] += 1
        self._on_count(self.watchers)

    def leave(self, caller: str) -> None:
        self._watchers[caller] -= 1
        if self._watchers[caller] <= 0:
            del self._watchers[caller]
        self._on_count(self.watchers)

    async def watch(self, admin: bool) -> AsyncIterator[pb.WatchNodesResponse]:
        """The view now (once the router has sent one), then at each change."""
        if self._task is None:  # started on the first watcher: the proxy's loop runs by then
            self._task = asyncio.get_running_loop().create_task(self._relay())
        sent: pb.WatchNodesResponse | None = None
        while True:
            async with self._changed:
                await self._changed.wait_for(lambda: self._view is not None and self._view is not sent)
                sent = self._view
                message = sent if admin else self._public
            yield message

    async def _apply(self, view: pb.WatchNodesResponse) -> None:
        async with self._changed:
            self._view, self._public = view, public_view(view)
            self._changed.notify_all()

    async def _relay(self) -> None:
        delay = self._retry_s[0]
        while True:
            try:
                async for view in self._follow():
                    await self._apply(view)
                    delay = self._retry_s[0]
                raise ConnectionError("the router ended its node stream")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 (whatever broke the stream, follow again; the last view stands)
                logger.warning("node relay lost the router (%s); following again", exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._retry_s[1])
