"""The fleet as a router sees it: grpc.health.v1 statuses (relayed by the proxies) and the node list.

The router follows the recycler (one long-poll at a time) into one view: a status table recomputed when the
view changes, and one wait-for-change that WatchNodes and the proxies' health stream share (grpcio's
asyncio HealthServicer has the same shape). Once the service is shutting down it also tells the recycler
how many calls it still has in flight, until none is left (ops/launcher.drain).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable
from typing import TypeVar

from grpc_health.v1 import health_pb2
from ray.serve.handle import DeploymentHandle

from embedding_client.v1 import embedding_pb2 as pb
from embedding_service.observability.logs import service_logger
from embedding_service.wire.fleet import NodeState, Snapshot
from embedding_service.wire.messages import FLEET_LONG_POLL_S
from embedding_service.wire.reasons import Reason, ServiceError

logger = service_logger(__name__)

T = TypeVar("T")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
EMBED_SERVICE = pb.DESCRIPTOR.services_by_name["EmbedService"].full_name
_NODE_STATES = {
    NodeState.HEALTHY: pb.NODE_STATE_HEALTHY,
    NodeState.QUARANTINED: pb.NODE_STATE_QUARANTINED,
    NodeState.DRAINING: pb.NODE_STATE_DRAINING,
    NodeState.RECYCLED: pb.NODE_STATE_RECYCLED,
}


class ServiceView:
    def __init__(self, models: Iterable[str], node_id: str) -> None:
        self.models = list(models)
        self.node_id = node_id  # the router's own node
        self.snapshot: Snapshot | None = None
        self.statuses: dict[str, int] = self._statuses()
        self.refusals: dict[str, str] = {}
        self._changed = asyncio.Condition()

    async def update(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self.statuses = self._statuses()
        self.refusals = self._refusals()
        async with self._changed:
            self._changed.notify_all()

    @property
    def shutting_down(self) -> bool:
        return self.snapshot is not None and self.snapshot.shutting_down

    def refusal(self, model: str) -> str | None:
        """Why a model is not serving when every replica it has refuses to (its start-up check failed), else None."""
        return self.refusals.get(model)

    def _refusals(self) -> dict[str, str]:
        serving = self.snapshot.serving_models()
        by_model: dict[str, list] = {}
        for replica in self.snapshot.refused_replicas().values():
            if replica.model not in serving:
                by_model.setdefault(replica.model, []).append(replica)
        refusals = {}
        for model, refused in by_model.items():
            first = min(refused, key=lambda r: r.replica_id)
            refusals[model] = (f"its {len(refused)} replica(s) refuse to serve; "
                               f"replica {first.replica_id}: {first.refused}")
        return refusals

    def unavailable(self, model: str) -> ServiceError | None:
        """What a call to `model` that ran out of time means while the model has no serving replica (its replicas
        moving off a faulty node, or starting): the model was unavailable, which a retry can outlast; else None."""
        # The replicas themselves, not the health statuses (which say NOT_SERVING for all once shutting down).
        if self.snapshot is None or model not in self.models or model in self.snapshot.serving_models():
            return None
        return ServiceError(Reason.MODEL_UNAVAILABLE,
                            f"model {model!r} had no serving replica within the call's deadline; retry shortly")

    def own_node_quarantined(self) -> bool:
        return self.snapshot is not None and self.snapshot.state_of(self.node_id) not in (None, NodeState.HEALTHY)

    def _statuses(self) -> dict[str, int]:
        """A model is SERVING while it has a replica on a healthy node; "" also needs the router's node
        healthy; nothing is SERVING once the service is shutting down."""
        serving = self.snapshot.serving_models() if self.snapshot and not self.shutting_down else set()
        per_model = {name: SERVING if name in serving else NOT_SERVING for name in self.models}
        whole = SERVING if serving & set(self.models) and not self.own_node_quarantined() else NOT_SERVING
        return {"": whole, EMBED_SERVICE: whole, **per_model}

    async def changes(self, render: Callable[[], T]) -> AsyncIterator[T]:
        """render() now, then again after each change of the view, whenever it differs."""
        last = None
        while True:
            message = render()
            if message != last:
                last = message
                yield message
            async with self._changed:
                await self._changed.wait()

    def nodes_message(self) -> pb.WatchNodesResponse:
        snapshot = self.snapshot
        response = pb.WatchNodesResponse(version=snapshot.version if snapshot else 0)
        for node in snapshot.nodes if snapshot else ():
            response.nodes.add(
                node_id=node.node_id,
                node_ip=node.node_ip,
                state=_NODE_STATES[node.state],
                reason=node.reason,
                since_unix_ms=int(node.since * 1000),
                replicas=[pb.NodeReplica(replica_id=r.replica_id, model=r.model, refused=r.refused)
                          for r in node.replicas],
                action_error=node.action_error,
                failed_actions=node.failed_actions,
            )
        return response

    async def follow(self, fleet: DeploymentHandle, router_id: str, on_change: Callable[[], None]) -> None:
        """Long-polls the recycler for the life of the router; `on_change` after each new snapshot."""
        version = -1
        while True:
            try:
                snapshot = await fleet.wait_for_change.remote(version, FLEET_LONG_POLL_S, router_id)
            except Exception:
                logger.exception("router: recycler unreachable; retrying")
                await asyncio.sleep(1.0)
                continue
            if snapshot.version != version:
                version = snapshot.version
                await self.update(snapshot)
                on_change()
