"""Fault paths that the cluster test does not reach, on the real classes without Ray:
an inference error that turns out to be a device fault, and the router's own node quarantined."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from grpc_health.v1 import health_pb2

from embedding_service.config import ModelSettings
from embedding_service.model_deployment import EmbeddingModel, ReplicaFaulted
from embedding_service.node_state import NodeState, NodeView, ReplicaView, Snapshot
from embedding_service.router import EMBED_SERVICE, EmbedRouter
from embedding_service.runtimes import TorchRuntime
from embedding_service.shards import EmbedOptions, ModelInfo, ShardRequest

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class _Remote:
    """Stands in for the recycler's handle (another deployment): records calls."""

    def __init__(self, calls: list, name: str) -> None:
        self.calls, self.name = calls, name

    async def remote(self, *args):
        self.calls.append((self.name, args))
        return (False, "")


class _RecyclerHandle:
    def __init__(self) -> None:
        self.calls: list = []
        self.report_failure = _Remote(self.calls, "report_failure")
        self.heartbeat = _Remote(self.calls, "heartbeat")


class _BrokenGpuModel:
    """The device failing mid-forward, as a CUDA fault does."""

    def __call__(self, features):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


def _replica(tmp_path, tiny_model_dir, fault: bool) -> tuple[EmbeddingModel, _RecyclerHandle]:
    from sentence_transformers import SentenceTransformer

    from embedding_service.tokenization import InputEncoder

    settings = ModelSettings(
        name="tiny", path=str(tiny_model_dir), device="cpu",
        gpu_check="embedding_service.gpu_health:fault_file_check", gpu_check_args={"directory": str(tmp_path)},
    )
    replica = EmbeddingModel.__new__(EmbeddingModel)
    replica.settings = settings
    replica.device = "cpu"
    replica.encoder = InputEncoder(SentenceTransformer(str(tiny_model_dir), device="cpu"))
    replica.runtime = TorchRuntime(_BrokenGpuModel())
    replica.info = ModelInfo("tiny", 48, 32, {}, "cpu", "torch", 30522, "x")
    replica.batch_sizes = __import__("collections").Counter()
    replica.node_id, replica.replica_id = "node-1", "replica-1"
    replica.recycler = _RecyclerHandle()
    from embedding_service.gpu_health import load_check

    replica._check = load_check(settings.gpu_check)
    replica._quarantine_reason = None
    replica._batcher = replica._new_batcher()
    if fault:
        (tmp_path / "node-1").write_text("CUDA error: illegal memory access (injected)")
    return replica, replica.recycler


def test_inference_error_that_is_a_device_fault_is_reported_and_retryable(tmp_path, tiny_model_dir):
    replica, recycler = _replica(tmp_path, tiny_model_dir, fault=True)
    request = ShardRequest(["a sentence"], EmbedOptions())
    with pytest.raises(ReplicaFaulted):
        asyncio.run(replica.embed(request))
    assert ("report_failure", ("replica-1", "node-1", "CUDA error: illegal memory access (injected)")) in recycler.calls


def test_inference_error_without_a_device_fault_is_not_reported(tmp_path, tiny_model_dir):
    replica, recycler = _replica(tmp_path, tiny_model_dir, fault=False)
    with pytest.raises(RuntimeError, match="illegal memory access") as caught:
        asyncio.run(replica.embed(ShardRequest(["a sentence"], EmbedOptions())))
    assert not isinstance(caught.value, ReplicaFaulted)
    assert recycler.calls == []


def _router(own_node: str, states: dict[str, NodeState]) -> EmbedRouter:
    router = EmbedRouter.__new__(EmbedRouter)
    router.models = {"m1": None, "m2": None}
    router.node_id = own_node
    router._follower = SimpleNamespace(done=lambda: False)  # the follower task is alive
    nodes = tuple(
        NodeView(node, "10.0.0.1", state, "fault" if state != NodeState.HEALTHY else "", 0.0,
                 (ReplicaView(f"r-{node}", "m1" if node == "B" else "m2", node),))
        for node, state in states.items()
    )
    router._snapshot = Snapshot(1, nodes)
    return router


def test_models_serve_only_with_a_replica_on_a_healthy_node():
    statuses = _router("A", {"A": NodeState.HEALTHY, "B": NodeState.HEALTHY, "C": NodeState.QUARANTINED})._statuses()
    assert statuses == {"": SERVING, EMBED_SERVICE: SERVING, "m1": SERVING, "m2": SERVING}
    statuses = _router("A", {"A": NodeState.HEALTHY, "B": NodeState.DRAINING})._statuses()
    assert statuses["m1"] == NOT_SERVING and statuses["m2"] == SERVING and statuses[""] == SERVING


def test_routers_own_node_quarantined_is_not_serving_and_fails_its_health_check():
    router = _router("A", {"A": NodeState.QUARANTINED, "B": NodeState.HEALTHY})
    statuses = router._statuses()
    assert statuses[""] == NOT_SERVING and statuses[EMBED_SERVICE] == NOT_SERVING
    assert statuses["m1"] == SERVING  # the model itself still has a healthy replica elsewhere
    with pytest.raises(RuntimeError, match="quarantined"):
        asyncio.run(router.check_health())
    # No model with a replica on a healthy node: nothing is serving.
    nothing = _router("Z", {"B": NodeState.DRAINING})._statuses()
    assert set(nothing.values()) == {NOT_SERVING}
