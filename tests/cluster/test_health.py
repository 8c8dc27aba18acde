"""grpc.health.v1 through Ray's proxy, with no metadata, as Kubernetes probes call it."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from embedding_service.config import HEAD_RESOURCE
from embedding_service.ops import launcher
from tests.helpers.classifiers import CLASSIFIER
from tests.helpers.models import MINILM, RERANKER, SPLADE, TINY
from tests.helpers.session import REFUSING

SERVING = health_pb2.HealthCheckResponse.SERVING


def test_check_with_no_service_name_is_serving(service):
    stub = health_pb2_grpc.HealthStub(service.channel)
    assert stub.Check(health_pb2.HealthCheckRequest(), timeout=30).status == SERVING
    for name in ("embedding_service.v1.EmbedService", MINILM, TINY):
        assert stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=30).status == SERVING


def test_unknown_service_is_not_found(service):
    with pytest.raises(grpc.RpcError) as caught:
        health_pb2_grpc.HealthStub(service.channel).Check(health_pb2.HealthCheckRequest(service="nope"), timeout=30)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_list_names_every_service(service):
    listing = health_pb2_grpc.HealthStub(service.channel).List(health_pb2.HealthListRequest(), timeout=30)
    assert set(listing.statuses) == {"", "embedding_service.v1.EmbedService", MINILM, TINY, REFUSING, RERANKER, SPLADE,
                                     CLASSIFIER, "liveness"}
    # Its replica refuses to serve (test_precision.py); every other service serves.
    assert {k for k, s in listing.statuses.items() if s.status != SERVING} == {REFUSING}


def test_recycler_is_one_replica_on_the_head_node(service):
    import ray
    from ray import serve

    head = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get(HEAD_RESOURCE))
    assert head == ray.get_runtime_context().get_node_id()  # the driver's, the cluster's head

    async def recycler_node() -> str:
        return await serve.get_deployment_handle("NodeRecycler", app_name="embedding").node_id.remote()

    assert launcher.call_handles(recycler_node(), timeout_s=30) == head
    deployments = serve.status().applications["embedding"].deployments
    assert deployments["NodeRecycler"].replica_states == {"RUNNING": 1}


def test_watchers_take_none_of_the_routers_call_slots(service):
    """Every client keeps a health Watch open per target, and operators keep WatchNodes open: twice the router's call
    slots in health watchers and 400 node watchers (both served by the proxy), and calls keep their latency."""
    import asyncio
    import statistics
    import time

    from embedding_client.v1 import embedding_pb2 as pb
    from embedding_client.v1 import embedding_pb2_grpc
    from tests.helpers.session import ROUTER_ONGOING, ROUTER_QUEUED

    watchers, node_watchers = 2 * (ROUTER_ONGOING + ROUTER_QUEUED), 400

    async def latencies(stub, n: int) -> list[float]:
        async def one(i: int) -> float:
            started = time.perf_counter()
            reply = await stub.Embed(pb.EmbedRequest(inputs=[pb.EmbedInput(text=f"while watched {i}")]), timeout=60)
            assert len(reply.embeddings) == 1
            return time.perf_counter() - started
        return [await one(i) for i in range(n)]

    async def run() -> tuple[list, list, list, list]:
        async with grpc.aio.insecure_channel(service.target) as channel:
            stub = embedding_pb2_grpc.EmbedServiceStub(channel)
            await latencies(stub, 5)  # warm
            before = await latencies(stub, 20)
            health = health_pb2_grpc.HealthStub(channel)
            streams = [health.Watch(health_pb2.HealthCheckRequest(service="")) for _ in range(watchers)]
            nodes = [stub.WatchNodes(pb.WatchNodesRequest()) for _ in range(node_watchers)]
            try:
                first = await asyncio.wait_for(asyncio.gather(*(s.read() for s in streams)), 60)
                views = await asyncio.wait_for(asyncio.gather(*(s.read() for s in nodes)), 60)
                replies = await asyncio.gather(*(
                    stub.Embed(pb.EmbedRequest(inputs=[pb.EmbedInput(text=f"while watched {i}")]), timeout=60)
                    for i in range(ROUTER_ONGOING)))
                during = await latencies(stub, 20)
                assert all(not s.done() for s in streams + nodes), "every watcher is still open"
            finally:
                for s in streams + nodes:
                    s.cancel()
            assert all(len(r.embeddings) == 1 for r in replies)
            return first, views, before, during

    first, views, before, during = asyncio.run(run())
    assert [m.status for m in first] == [SERVING] * watchers
    assert all(v.nodes for v in views)
    assert statistics.median(during) < 2 * statistics.median(before) + 0.05, (before, during)
