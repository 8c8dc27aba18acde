"""The proxies' health relay, fed by a scripted router stream: what probes and watchers see when the router goes."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from embedding_client.errors import read_details
from embedding_service.proxy.health_relay import HealthRelay
from embedding_service.wire.messages import LIVENESS

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


def test_the_relay_keeps_the_last_table_briefly_then_says_not_serving_until_the_router_is_back():
    async def run() -> None:
        router_up = asyncio.Event()
        router_up.set()
        streams = 0

        async def follow():
            nonlocal streams
            await router_up.wait()
            streams += 1
            yield {"": SERVING, "m": SERVING, "old": SERVING}
            if streams == 1:
                yield {"": SERVING, "m": SERVING}  # "old" leaves the table
                router_up.clear()
                raise ConnectionError("router replica stopped")
            await asyncio.Event().wait()  # the second router stays

        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(HealthRelay(follow, stale_after_s=0.6, retry_s=(0.05, 0.1)), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                watch = stub.Watch(health_pb2.HealthCheckRequest(service="m"))
                assert (await watch.read()).status == SERVING
                gone = stub.Watch(health_pb2.HealthCheckRequest(service="old"))
                assert (await gone.read()).status == SERVICE_UNKNOWN  # already out of the table
                # The router's stream broke: the last table stands within stale_after_s ...
                assert (await stub.Check(health_pb2.HealthCheckRequest(service="m"))).status == SERVING
                # ... then every service is NOT_SERVING, told to watchers as it happens.
                assert (await asyncio.wait_for(watch.read(), 5)).status == NOT_SERVING
                listing = await stub.List(health_pb2.HealthListRequest())
                assert {k: v.status for k, v in listing.statuses.items()} == {"": NOT_SERVING, "m": NOT_SERVING,
                                                                              LIVENESS: SERVING}
                # The liveness service (Kubernetes' liveness probe) answers SERVING while the proxy answers at all.
                assert (await stub.Check(health_pb2.HealthCheckRequest(service=LIVENESS))).status == SERVING
                router_up.set()  # a router answers again
                assert (await asyncio.wait_for(watch.read(), 5)).status == SERVING
                assert (await stub.Check(health_pb2.HealthCheckRequest(service=""))).status == SERVING
                try:
                    await stub.Check(health_pb2.HealthCheckRequest(service="nope"))
                    raise AssertionError("an unknown service was answered")
                except grpc.aio.AioRpcError as err:
                    assert err.code() == grpc.StatusCode.NOT_FOUND
                    assert read_details(err.trailing_metadata(), err.details()).reason == "SERVICE_UNKNOWN"
                watch.cancel()
                gone.cancel()
        finally:
            await server.stop(0)

    asyncio.run(run())


def test_watchnodes_is_relayed_from_one_router_stream_bounded_per_caller_and_detail_only_for_admins():
    from embedding_client.v1 import embedding_pb2 as pb
    from embedding_service.config import ProxySettings
    from embedding_service.proxy.nodes_relay import NodesRelay
    from embedding_service.wire.reasons import Reason, ServiceError

    views: asyncio.Queue = asyncio.Queue()
    follows = []

    async def router():
        follows.append(1)
        while True:
            yield await views.get()

    def view(version: int, state=pb.NODE_STATE_HEALTHY) -> pb.WatchNodesResponse:
        return pb.WatchNodesResponse(version=version, nodes=[pb.Node(
            node_id="n1", node_ip="10.0.0.7", state=state, reason="Xid 79 on GPU 0", action_error="ssh: refused",
            failed_actions=1, replicas=[pb.NodeReplica(replica_id="r", model="m")])])

    async def main():
        relay = NodesRelay(ProxySettings(max_node_watchers=5, max_node_watchers_per_caller=2), follow=router)
        for _ in range(2):
            relay.admit("key:a")
        with pytest.raises(ServiceError) as caught:
            relay.admit("key:a")
        assert caught.value.reason == Reason.OVERLOADED
        for caller in ("key:b", "key:b", "host:c"):
            relay.admit(caller)
        with pytest.raises(ServiceError):
            relay.admit("host:d")  # five in all
        relay.leave("key:b")
        relay.admit("host:d")
        assert relay.watchers == 5

        admin, public = relay.watch(admin=True), relay.watch(admin=False)
        first = asyncio.ensure_future(anext(admin))
        await asyncio.sleep(0.05)
        await views.put(view(1))
        seen = await first
        assert seen.nodes[0].node_ip == "10.0.0.7" and seen.nodes[0].action_error == "ssh: refused"
        shown = (await anext(public)).nodes[0]
        assert (shown.node_ip, shown.reason, shown.action_error) == ("", "", "")
        assert (shown.node_id, shown.failed_actions, shown.replicas[0].model) == ("n1", 1, "m")
        await views.put(view(2, pb.NODE_STATE_QUARANTINED))
        assert (await anext(admin)).version == 2 and (await anext(public)).nodes[0].state == pb.NODE_STATE_QUARANTINED
        assert follows == [1], "every watcher is served from one stream"

    asyncio.run(main())
