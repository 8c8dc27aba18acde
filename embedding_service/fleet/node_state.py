"""The recycler's book of nodes and replicas: a plain state machine, no Ray (its states: wire/fleet.py).

A quarantined node is acted on once `grace_cycles` ticks have passed; an action that fails sends the node
back to QUARANTINED with the failure (shown in WatchNodes) and it is acted on again after `retry_s`, for as
long as the recycler has attempts left for it (it says when it has none).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from embedding_service.wire.fleet import NodeState, NodeView, ReplicaView, Snapshot


@dataclass
class _Node:
    node_id: str
    node_ip: str = ""
    state: NodeState = NodeState.HEALTHY
    reason: str = ""
    since: float = 0.0
    cycles: int = 0
    reports: list[tuple[float, str, str]] = field(default_factory=list)  # (time, replica, reason)
    action_error: str = ""
    failed_actions: int = 0
    retry_at: float | None = None  # when a node whose action failed is acted on again; None: not again


class NodeBook:
    def __init__(self, grace_cycles: int, retention_s: float, replica_ttl_s: float, retry_s: float = 30.0) -> None:
        self.grace_cycles = grace_cycles
        self.retention_s = retention_s
        self.replica_ttl_s = replica_ttl_s
        self.retry_s = retry_s
        self.version = 0
        self.shutting_down = False
        self._nodes: dict[str, _Node] = {}
        self._replicas: dict[str, tuple[ReplicaView, float]] = {}

    def _node(self, node_id: str, now: float) -> _Node:
        if node_id not in self._nodes:
            self._nodes[node_id] = _Node(node_id, since=now)
            self.version += 1
        return self._nodes[node_id]

    def _set(self, node: _Node, state: NodeState, reason: str, now: float) -> None:
        node.state, node.reason, node.since, node.cycles = state, reason, now, 0
        self.version += 1

    def heartbeat(self, replica_id: str, model: str, node_id: str, now: float,
                  refused: str = "") -> tuple[bool, str]:
        """Records a live replica (and why it refuses to serve, if it does); answers whether its node is
        quarantined (and why)."""
        node = self._node(node_id, now)
        known = self._replicas.get(replica_id)
        view = ReplicaView(replica_id, model, node_id, refused)
        if known is None or known[0] != view:
            self.version += 1
        self._replicas[replica_id] = (view, now)
        return node.state != NodeState.HEALTHY, node.reason

    def begin_shutdown(self) -> None:
        if not self.shutting_down:
            self.shutting_down = True
            self.version += 1

    def forget_replica(self, replica_id: str) -> None:
        if self._replicas.pop(replica_id, None) is not None:
            self.version += 1

    def report(self, replica_id: str, node_id: str, reason: str, now: float) -> bool:
        """A replica's failure report; returns True when it quarantined the node."""
        node = self._node(node_id, now)
        node.reports.append((now, replica_id, reason))
        if node.state == NodeState.HEALTHY:
            self._set(node, NodeState.QUARANTINED, f"{reason} (reported by replica {replica_id})", now)
            return True
        return False

    def action_failed(self, node_id: str, error: str, now: float, again: bool) -> int:
        """The action on a DRAINING node failed: back to QUARANTINED with `error`, acted on again after
        retry_s when `again`. Returns the node's failed actions so far."""
        node = self._nodes[node_id]
        node.failed_actions += 1
        node.action_error = error
        node.retry_at = now + self.retry_s if again else None
        self._set(node, NodeState.QUARANTINED, node.reason, now)
        return node.failed_actions

    def is_quarantined(self, node_id: str) -> bool:
        node = self._nodes.get(node_id)
        return node is not None and node.state != NodeState.HEALTHY

    def tick(self, now: float, alive: dict[str, str]) -> list[NodeView]:
        """Advances time given the alive nodes (id -> ip); returns the nodes to act on now (DRAINING)."""
        to_act = []
        for node_id, ip in alive.items():
            node = self._nodes.get(node_id)
            if node is None or node.state == NodeState.RECYCLED:
                # New, or back after being recycled: tracked afresh.
                self._nodes[node_id] = _Node(node_id, ip, since=now)
                self.version += 1
            elif node.node_ip != ip:
                node.node_ip = ip
                self.version += 1
        for node in self._nodes.values():
            node.reports = [r for r in node.reports if now - r[0] <= self.retention_s]
            if node.state == NodeState.RECYCLED:
                continue
            if node.node_id not in alive:
                reason = node.reason if node.state != NodeState.HEALTHY else "left the cluster"
                self._set(node, NodeState.RECYCLED, reason, now)
            elif node.state == NodeState.QUARANTINED and self._due(node, now):
                self._set(node, NodeState.DRAINING, node.reason, now)
                to_act.append(self._view(node))
        stale = [rid for rid, (view, seen) in self._replicas.items()
                 if now - seen > self.replica_ttl_s or self._nodes[view.node_id].state == NodeState.RECYCLED]
        for rid in stale:
            self.forget_replica(rid)
        expired = [nid for nid, n in self._nodes.items()
                   if n.state == NodeState.RECYCLED and now - n.since > self.retention_s]
        for nid in expired:
            del self._nodes[nid]
            self.version += 1
        return to_act

    def _due(self, node: _Node, now: float) -> bool:
        """A quarantined node is acted on after its grace cycles, and again once a failed action's retry is due."""
        if node.failed_actions:
            return node.retry_at is not None and now >= node.retry_at
        node.cycles += 1
        return node.cycles > self.grace_cycles

    def _view(self, node: _Node) -> NodeView:
        replicas = tuple(sorted((v for v, _ in self._replicas.values() if v.node_id == node.node_id),
                                key=lambda v: v.replica_id))
        return NodeView(node.node_id, node.node_ip, node.state, node.reason, node.since, replicas,
                        node.action_error, node.failed_actions)

    def snapshot(self) -> Snapshot:
        nodes = tuple(self._view(n) for n in sorted(self._nodes.values(), key=lambda n: n.node_id))
        return Snapshot(self.version, nodes, self.shutting_down)

    def reports(self, node_id: str) -> list[tuple[float, str, str]]:
        node = self._nodes.get(node_id)
        return list(node.reports) if node else []
