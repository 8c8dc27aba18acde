"""The fleet's view as it crosses processes: the recycler's snapshot of nodes and replicas, which routers
(and their request routers) follow.

HEALTHY --failure report--> QUARANTINED --grace cycles--> DRAINING --node gone--> RECYCLED
A node whose drain (or command) failed goes back to QUARANTINED with the failure, and is tried again.
A node that leaves the cluster while HEALTHY is RECYCLED too ("left the cluster").
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class NodeState(str, Enum):
    HEALTHY = "healthy"
    QUARANTINED = "quarantined"
    DRAINING = "draining"
    RECYCLED = "recycled"


@dataclass(frozen=True)
class ReplicaView:
    replica_id: str
    model: str
    node_id: str
    refused: str = ""  # why it refuses to serve (its backend failed its start-up check); "" while it serves


@dataclass(frozen=True)
class NodeView:
    node_id: str
    node_ip: str
    state: NodeState
    reason: str
    since: float
    replicas: tuple[ReplicaView, ...] = ()
    # Why the recycler's last action on the node (its drain, or the command) failed, and what comes next;
    # "" when none failed. failed_actions: how many failed since it was quarantined.
    action_error: str = ""
    failed_actions: int = 0


@dataclass(frozen=True)
class Snapshot:
    version: int
    nodes: tuple[NodeView, ...]
    # The service stops taking calls (health NOT_SERVING, new calls UNAVAILABLE).
    shutting_down: bool = False

    def unhealthy(self) -> set[str]:
        return {n.node_id for n in self.nodes if n.state != NodeState.HEALTHY}

    def serving_models(self) -> set[str]:
        return {r.model for n in self.nodes if n.state == NodeState.HEALTHY for r in n.replicas if not r.refused}

    def refused_replicas(self) -> dict[str, ReplicaView]:
        return {r.replica_id: r for n in self.nodes for r in n.replicas if r.refused}

    def state_of(self, node_id: str) -> NodeState | None:
        return next((n.state for n in self.nodes if n.node_id == node_id), None)
