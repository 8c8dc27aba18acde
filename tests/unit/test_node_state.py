"""The recycler's state machine, step by step (no Ray)."""

from __future__ import annotations

from embedding_service.fleet.node_state import NodeBook
from embedding_service.wire.fleet import NodeState

A, B = "node-a", "node-b"
ALIVE = {A: "10.0.0.1", B: "10.0.0.2"}


def book(grace: int = 1) -> NodeBook:
    return NodeBook(grace_cycles=grace, retention_s=100, replica_ttl_s=10)


def test_report_quarantines_then_grace_then_drain_then_recycled():
    b = book(grace=1)
    b.tick(0, ALIVE)
    assert b.heartbeat("r1", "m", A, 0) == (False, "")
    assert b.report("r1", A, "CUDA error: illegal address", 1)
    assert b.is_quarantined(A) and not b.is_quarantined(B)
    quarantined, reason = b.heartbeat("r1", "m", A, 1)
    assert quarantined and "illegal address" in reason and "r1" in reason
    assert b.tick(2, ALIVE) == []  # the grace cycle
    (to_recycle,) = b.tick(3, ALIVE)
    assert to_recycle.node_id == A and to_recycle.state == NodeState.DRAINING
    assert [r.replica_id for r in to_recycle.replicas] == ["r1"]
    assert b.tick(4, ALIVE) == []  # acted on once only
    b.tick(5, {B: ALIVE[B]})
    assert b.snapshot().state_of(A) == NodeState.RECYCLED
    assert "illegal address" in next(n.reason for n in b.snapshot().nodes if n.node_id == A)


def test_second_report_does_not_restart_the_clock():
    b = book(grace=0)
    b.tick(0, ALIVE)
    assert b.report("r1", A, "x", 1)
    assert not b.report("r2", A, "y", 1.5)
    assert len(b.reports(A)) == 2
    assert [n.node_id for n in b.tick(2, ALIVE)] == [A]


def test_models_serve_only_from_healthy_nodes_and_stale_replicas_expire():
    b = book()
    b.tick(0, ALIVE)
    b.heartbeat("r1", "m1", A, 0)
    b.heartbeat("r2", "m2", B, 0)
    assert b.snapshot().serving_models() == {"m1", "m2"}
    b.report("r1", A, "fault", 1)
    assert b.snapshot().serving_models() == {"m2"}
    assert b.snapshot().unhealthy() == {A}
    b.heartbeat("r2", "m2", B, 5)
    b.tick(12, ALIVE)  # r1 unheard for more than 10 s
    replicas = {r.replica_id for n in b.snapshot().nodes for r in n.replicas}
    assert replicas == {"r2"}


def test_reports_expire_and_a_returning_node_is_tracked_afresh():
    b = book(grace=0)
    b.tick(0, ALIVE)
    b.report("r1", A, "fault", 0)
    b.tick(1, ALIVE)  # draining
    b.tick(2, {B: ALIVE[B]})  # gone
    assert b.snapshot().state_of(A) == NodeState.RECYCLED
    b.tick(50, ALIVE)  # the same id alive again
    assert b.snapshot().state_of(A) == NodeState.HEALTHY
    assert b.reports(A) == []
    b.report("r9", B, "old", 60)
    b.tick(200, ALIVE)  # past the 100 s retention
    assert b.reports(B) == []


def test_every_change_moves_the_version():
    b = book()
    v0 = b.version
    b.tick(0, ALIVE)
    v1 = b.version
    assert v1 > v0
    b.heartbeat("r1", "m", A, 0)
    v2 = b.version
    b.heartbeat("r1", "m", A, 1)  # nothing new
    assert b.version == v2 > v1
    b.report("r1", A, "fault", 2)
    assert b.version > v2


def test_a_failed_action_goes_back_to_quarantined_and_is_acted_on_again_when_due():
    b = NodeBook(grace_cycles=0, retention_s=100, replica_ttl_s=10, retry_s=5)
    b.tick(0, ALIVE)
    b.report("r1", A, "CUDA error: x", 1)
    (first,) = b.tick(2, ALIVE)
    assert first.state == NodeState.DRAINING and first.failed_actions == 0
    version = b.version
    assert b.action_failed(A, "drain failed: rejected", 2, again=True) == 1
    assert b.version > version  # followers hear of it
    node = next(n for n in b.snapshot().nodes if n.node_id == A)
    assert (node.state, node.action_error, node.failed_actions) == (NodeState.QUARANTINED, "drain failed: rejected", 1)
    assert "CUDA error: x" in node.reason
    assert b.tick(6, ALIVE) == []  # its retry is due at 7
    (again,) = b.tick(7, ALIVE)
    assert again.state == NodeState.DRAINING and again.failed_actions == 1
    b.action_failed(A, "gave up", 7, again=False)
    assert all(b.tick(t, ALIVE) == [] for t in (20, 200))  # not again; quarantined until the operator acts
    assert b.snapshot().state_of(A) == NodeState.QUARANTINED
