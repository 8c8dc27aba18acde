"""The proxies' health relay, fed by a scripted router stream: what probes and watchers see when the router goes."""

from __future__ import annotations

import asyncio

import grpc
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
