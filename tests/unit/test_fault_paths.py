"""Fault paths that the cluster test does not reach, on the real classes without Ray, built through
their constructors: an inference error that turns out to be a device fault, and health from the
recycler's view (the router's own node quarantined, the service shutting down)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from embedding_service.config import ModelSettings
from embedding_service.model.deployment import EmbeddingModel
from embedding_service.model.forward import LoadedModel
from embedding_service.model.runtimes import TorchRuntime
from embedding_service.model.tokenization import InputEncoder
from embedding_service.model.watchdog import Placement
from embedding_service.router.fleet_view import EMBED_SERVICE, NOT_SERVING, SERVING, ServiceView
from embedding_service.wire.fleet import NodeState, NodeView, ReplicaView, Snapshot
from embedding_service.wire.messages import EmbedOptions, ReplicaError, ReplicaFaulted, ShardRequest
from embedding_service.wire.reasons import Reason
from tests.helpers.recycler import RecyclerHandle


class _BrokenGpuModel:
    """The device failing mid-forward, as a CUDA fault does."""

    def __call__(self, features):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


def _embed_once(tmp_path, tiny_model_dir, fault: bool) -> tuple[BaseException, RecyclerHandle]:
    """Builds a replica whose device fails mid-forward, embeds one sentence, and closes it."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(tiny_model_dir), device="cpu")
    settings = ModelSettings(
        name="tiny", path=str(tiny_model_dir), device="cpu",
        gpu_check="embedding_service.fleet.gpu_checks:fault_file_check", gpu_check_args={"directory": str(tmp_path)},
    )
    if fault:
        (tmp_path / "node-1").write_text("CUDA error: illegal memory access (injected)")
    recycler = RecyclerHandle()

    async def main() -> BaseException:
        replica = EmbeddingModel(
            settings, recycler, heartbeat_s=3600,
            loaded=LoadedModel(model, "cpu", "torch", TorchRuntime(_BrokenGpuModel()), InputEncoder(model)),
            placement=Placement("node-1", "replica-1"),
        )
        try:
            with pytest.raises(Exception) as caught:
                await replica.compute(ShardRequest(["a sentence"], EmbedOptions()))
            return caught.value
        finally:
            await replica.close()

    return asyncio.run(main()), recycler


def test_inference_error_that_is_a_device_fault_is_reported_and_retryable(tmp_path, tiny_model_dir):
    error, recycler = _embed_once(tmp_path, tiny_model_dir, fault=True)
    assert isinstance(error, ReplicaFaulted)
    assert recycler.named("report_failure") == [("replica-1", "node-1", "CUDA error: illegal memory access (injected)")]
    # It heartbeat before serving, and left the recycler's view when closed (as Serve's stop does).
    assert recycler.named("heartbeat") == [("replica-1", "tiny", "node-1", "")]  # "": not refusing
    assert recycler.named("forget_replica") == [("replica-1",)]


def test_inference_error_without_a_device_fault_is_not_reported(tmp_path, tiny_model_dir):
    error, recycler = _embed_once(tmp_path, tiny_model_dir, fault=False)
    # Told by class and message in the service's own exception: the router loads none of the model's libraries.
    assert isinstance(error, ReplicaError) and str(error).startswith("RuntimeError: ")
    assert "illegal memory access" in str(error)
    assert not isinstance(error, ReplicaFaulted)
    assert recycler.named("report_failure") == []


@pytest.mark.parametrize("kind", ["rerank", "sparse"])
def test_a_device_fault_in_a_rerank_or_sparse_replica_is_reported_as_one(tmp_path, scoring_model_dirs, kind):
    from embedding_service.model.scoring import RerankModel, SparseModel
    from embedding_service.wire.messages import RerankOptions, SparseOptions
    from tests.helpers.models import RERANKER, SPLADE

    name = RERANKER if kind == "rerank" else SPLADE
    settings = ModelSettings(name=name, kind=kind, path=str(scoring_model_dirs[name]), device="cpu",
                             gpu_check="embedding_service.fleet.gpu_checks:fault_file_check",
                             gpu_check_args={"directory": str(tmp_path)})
    (tmp_path / "node-1").write_text("CUDA error: illegal memory access (injected)")
    recycler = RecyclerHandle()

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    async def main() -> BaseException:
        cls = RerankModel if kind == "rerank" else SparseModel
        replica = cls(settings, recycler, heartbeat_s=3600, placement=Placement("node-1", "replica-1"))
        if kind == "rerank":
            replica.scorer.model.forward = broken  # the model itself: its pairs come joined from token ids (model/pairs.py)
            request = ShardRequest(["a document"], RerankOptions("a query"))
            call = replica.compute
        else:
            replica.model.encode = broken
            request = ShardRequest(["a sentence"], SparseOptions(top_k=8))
            call = replica.compute
        try:
            with pytest.raises(Exception) as caught:
                await call(request)
            return caught.value
        finally:
            await replica.close()

    error = asyncio.run(main())
    assert isinstance(error, ReplicaFaulted), error
    assert recycler.named("report_failure") == [("replica-1", "node-1", "CUDA error: illegal memory access (injected)")]
    assert recycler.named("heartbeat") == [("replica-1", name, "node-1", "")]
    assert recycler.named("forget_replica") == [("replica-1",)]


def _view(own_node: str, states: dict[str, NodeState], shutting_down: bool = False) -> ServiceView:
    nodes = tuple(
        NodeView(node, "10.0.0.1", state, "fault" if state != NodeState.HEALTHY else "", 0.0,
                 (ReplicaView(f"r-{node}", "m1" if node == "B" else "m2", node),))
        for node, state in states.items()
    )
    view = ServiceView(["m1", "m2"], own_node)
    asyncio.run(view.update(Snapshot(1, nodes, shutting_down)))
    return view


def test_models_serve_only_with_a_replica_on_a_healthy_node():
    statuses = _view("A", {"A": NodeState.HEALTHY, "B": NodeState.HEALTHY, "C": NodeState.QUARANTINED}).statuses
    assert statuses == {"": SERVING, EMBED_SERVICE: SERVING, "m1": SERVING, "m2": SERVING}
    statuses = _view("A", {"A": NodeState.HEALTHY, "B": NodeState.DRAINING}).statuses
    assert statuses["m1"] == NOT_SERVING and statuses["m2"] == SERVING and statuses[""] == SERVING


def test_routers_own_node_quarantined_is_not_serving():
    view = _view("A", {"A": NodeState.QUARANTINED, "B": NodeState.HEALTHY})
    assert view.statuses[""] == NOT_SERVING and view.statuses[EMBED_SERVICE] == NOT_SERVING
    assert view.statuses["m1"] == SERVING  # the model itself still has a healthy replica elsewhere
    assert view.own_node_quarantined()  # the router's Serve health check fails on it
    # No model with a replica on a healthy node: nothing is serving.
    assert set(_view("Z", {"B": NodeState.DRAINING}).statuses.values()) == {NOT_SERVING}


def test_nothing_is_serving_once_the_service_is_shutting_down():
    view = _view("A", {"A": NodeState.HEALTHY, "B": NodeState.HEALTHY}, shutting_down=True)
    assert view.shutting_down and set(view.statuses.values()) == {NOT_SERVING}


def test_a_call_out_of_time_while_its_model_has_no_serving_replica_is_unavailable_and_retryable():
    view = _view("A", {"A": NodeState.HEALTHY, "B": NodeState.DRAINING})  # m1's one replica moving off B
    error = view.unavailable("m1")
    assert error.reason == Reason.MODEL_UNAVAILABLE and error.code == grpc.StatusCode.UNAVAILABLE
    assert error.retry_after_s > 0 and "model 'm1' had no serving replica within the call's deadline" in error.message
    assert view.unavailable("m2") is None  # served, only slow: its timeout stays DEADLINE_EXCEEDED
    # Shutting down, every status says NOT_SERVING, but a model whose replicas are there was slow, not missing.
    assert _view("A", {"A": NodeState.HEALTHY, "B": NodeState.HEALTHY}, shutting_down=True).unavailable("m1") is None
    assert ServiceView(["m1"], "A").unavailable("m1") is None  # no view yet: nothing known


def test_a_retried_shard_and_a_fault_are_counted_under_bounded_labels():
    import ray

    from embedding_service.fleet.recycler import fault_kind
    from embedding_service.wire.serve_failures import cause_label, replica_gone

    wrapped = ray.exceptions.RayTaskError("embed", "traceback", ReplicaFaulted("device fault")).as_instanceof_cause()
    assert replica_gone(wrapped) and cause_label(wrapped) == "ReplicaFaulted"  # not Ray's wrapper's name
    assert cause_label(ray.exceptions.ActorUnavailableError("gone", b"\x00" * 16)) == "ActorUnavailableError"
    assert fault_kind("CUDA error: an illegal memory access was encountered") == "CUDA error"
    assert fault_kind("CUDA device not available") == "CUDA device not available"
    # Free text never becomes a label.
    assert fault_kind("x" * 200) == fault_kind("bad\nlabel: y") == fault_kind("") == "other"
