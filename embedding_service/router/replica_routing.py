"""Keeps calls off quarantined nodes and refusing replicas, in the caller's process, at once.

A custom Ray Serve request router for the model deployments. It runs where a model's handle is used (the
router replicas) and skips replicas whose node the recycler has quarantined, and replicas that refuse to
serve (their start-up check failed) for every method but those about the model (`describe`,
`quantization_ranges`), which they answer to say why. It
learns both from the fleet's view itself: Serve hands it the fleet's deployment name through
`request_router_kwargs` (app.py), and it follows that deployment's `wait_for_change` from its first
routing decision on, in the process it routes in.

Serve's public request-router surface gives a pending request's `metadata` (a dataclass whose
`call_method` names the method called); that field is checked as this module is imported, so a Ray release
that renamed it stops the router at start instead of routing `describe` away from a refusing replica.

When no candidate is left the request waits for Serve's next try, after its backoff: a router that does not
use Serve's locality mixin must ask for the backoff itself (`routing_context.should_backoff`), or Serve tries
again at once, in a loop that never yields the event loop (seen: a router replica frozen, past its health
checks, while a model's only replicas refused).
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import typing

import ray
from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from embedding_service.observability.logs import service_logger
from embedding_service.wire.fleet import Snapshot
from embedding_service.wire.messages import FLEET_LONG_POLL_S

logger = service_logger(__name__)

# What a replica that refuses to serve still answers: what the model is, and its int8/uint8 ranges.
ANSWERED_WHEN_REFUSED = frozenset({"describe", "quantization_ranges"})
_METHOD_FIELD = "call_method"


def _check() -> None:
    hints = typing.get_type_hints(PendingRequest)
    metadata, context = hints.get("metadata"), hints.get("routing_context")
    if not dataclasses.is_dataclass(metadata) or _METHOD_FIELD not in {f.name for f in dataclasses.fields(metadata)}:
        raise RuntimeError(f"Ray {ray.__version__}: a PendingRequest's metadata has no {_METHOD_FIELD} field "
                           "(the model replicas' request router tells `describe` calls by it)")
    if not dataclasses.is_dataclass(context) or "should_backoff" not in {f.name for f in dataclasses.fields(context)}:
        raise RuntimeError(f"Ray {ray.__version__}: a PendingRequest's routing_context has no should_backoff field "
                           "(without it a request with no replica to go to spins the router's event loop)")


_check()


class FleetState:
    """The nodes and replicas calls are kept off, as the fleet's view last said."""

    def __init__(self) -> None:
        self.quarantined: frozenset[str] = frozenset()
        self.refused: frozenset[str] = frozenset()
        self.version = -1

    def update(self, snapshot: Snapshot) -> None:
        self.quarantined = frozenset(snapshot.unhealthy())
        self.refused = frozenset(snapshot.refused_replicas())
        self.version = snapshot.version


class HealthyNodeRequestRouter(FIFOMixin, RequestRouter):
    """Power of two choices among replicas on nodes that are not quarantined."""

    def initialize_state(self, fleet_deployment: str | None = None, **_: object) -> None:
        self.fleet_state = FleetState()
        self._fleet_deployment = fleet_deployment
        self._follower: asyncio.Task | None = None

    def _follow_fleet(self) -> None:
        if self._follower is None and self._fleet_deployment:
            self._follower = asyncio.get_running_loop().create_task(self._follow())

    async def _follow(self) -> None:
        from ray import serve
        from ray.serve.exceptions import RayServeException

        try:
            app = serve.get_replica_context().app_name
        except RayServeException:  # a handle used outside a replica (a test, the driver): nothing to follow
            return
        fleet = serve.get_deployment_handle(self._fleet_deployment, app)
        state = self.fleet_state
        while True:
            try:
                snapshot = await fleet.wait_for_change.remote(state.version, FLEET_LONG_POLL_S)
            except Exception:
                logger.exception("request router: the fleet's view is unreachable; retrying")
                await asyncio.sleep(1.0)
                continue
            if snapshot.version != state.version:
                state.update(snapshot)

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        self._follow_fleet()
        state = self.fleet_state
        method = pending_request.metadata.call_method if pending_request is not None else None
        refused = frozenset() if method in ANSWERED_WHEN_REFUSED else state.refused
        healthy = [r for r in candidate_replicas
                   if r.node_id not in state.quarantined and r.replica_id.unique_id not in refused]
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # every candidate was considered at once
        if not healthy:
            return []  # Serve tries again after its backoff, until a replica elsewhere is up
        return [random.sample(healthy, min(2, len(healthy)))]
