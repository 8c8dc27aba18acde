"""Every touch of Ray's non-public API, exercised against the installed Ray (docs/architecture.md lists them):

- the proxy's (proxy/serve_internals.py): the gRPC server options Serve builds its server from, the wrapper
  around Serve's handler factory, the passthrough health service, and the proxy's report of the options;
- the fleet's (fleet/ray_internals.py): Ray's node drain;
- the driver's (ops/ray_internals.py): the preload setting, Serve's message-size variable, `_system_config`;
- the jobs manager's (batch/ray_data_internals.py): Ray Data's resource requests, released for a killed runner
  (exercised on the session's cluster by tests/cluster/test_batch_jobs.py);
- the router's request router: a pending request's `call_method`.

The proxy-side ones run in fresh interpreters, as in a Ray worker, on Ray's own gRPC server class.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tests.helpers.paths import ROOT

OPTIONS = [["grpc.server.max_pending_requests", 7], ["grpc.max_receive_message_length", 1024]]


def _run(code: str, env: dict[str, str] | None = None) -> str:
    import os

    environ = {k: v for k, v in os.environ.items() if k != "EMBEDDING_SERVE_GRPC_OPTIONS"}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, check=False, text=True,
                          timeout=180, cwd=ROOT, env={**environ, **(env or {})})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done.stdout + done.stderr


def test_the_preloaded_options_are_the_ones_serve_builds_its_grpc_server_with():
    _run("""
        import asyncio
        import grpc.aio._server as aio_server
        import embedding_service.proxy.grpc_options  # as the raylet preloads it
        from embedding_service.proxy import serve_internals
        from ray.serve._private import grpc_util

        seen = {}
        build = aio_server.Server.__init__
        def recording(self, *args, **kwargs):
            seen.update(kwargs["options"] if "options" in kwargs else args[4])
            build(self, *args, **kwargs)
        aio_server.Server.__init__ = recording

        async def main():
            grpc_util.gRPCGenericServer(lambda **keywords: None)  # Serve's own server class
        asyncio.run(main())
        assert seen["grpc.server.max_pending_requests"] == 7, seen
        assert seen["grpc.max_receive_message_length"] == 1024, seen  # Serve's own replaced, not doubled
        assert sum(1 for o in grpc_util.DEFAULT_GRPC_SERVER_OPTIONS if o[0] == "grpc.max_receive_message_length") == 1
        assert serve_internals.server_options_in_force([("grpc.server.max_pending_requests", 7)])
    """, {"EMBEDDING_SERVE_GRPC_OPTIONS": json.dumps(OPTIONS)})


# Ray's gRPC server built as Serve's proxy builds it, with our servicer functions, and a stand-in for Serve's
# handler factory (Serve's needs a running Serve): its handlers answer with the metadata they were given.
_SERVER = """
    import asyncio, logging, os, socket
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from ray.serve._private import grpc_util
    from ray.serve.config import gRPCOptions
    from embedding_client.errors import read_details
    from embedding_client.v1 import embedding_pb2 as pb, embedding_pb2_grpc
    from embedding_service.proxy import health_relay, state

    logging.basicConfig(level=logging.WARNING)

    async def no_router():  # the relay follows none here (it would start a Ray of its own to look for one)
        await asyncio.Event().wait()
        yield {}

    health_relay.follow_router = no_router

    def serve_factory(service_method, streaming_type):
        async def unary(request, context):
            seen = ",".join(f"{k}={v}" for k, v in context.invocation_metadata() if k.startswith("embedding"))
            return pb.EmbedResponse(model=seen).SerializeToString()
        return unary if streaming_type.name == "UNARY_UNARY" else None

    async def main():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        options = gRPCOptions(port=port, grpc_servicer_functions=[
            "embedding_service.proxy.ingress.add_EmbedServiceServicer_to_server",
            "embedding_service.proxy.ingress.add_HealthServicer_to_server"])
        task, server = await grpc_util.start_grpc_server(serve_factory, options, event_loop=asyncio.get_running_loop())
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            embed = channel.unary_unary("/embedding_service.v1.EmbedService/Embed")
            try:
                await embed(b"\\xff\\xff\\xff not a request", timeout=10)
                raise AssertionError("malformed bytes were answered")
            except grpc.aio.AioRpcError as err:
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
                assert read_details(err.trailing_metadata(), err.details()).reason == "MALFORMED_REQUEST"
            stub = embedding_pb2_grpc.EmbedServiceStub(channel)
            reply = await stub.Embed(pb.EmbedRequest(inputs=[pb.EmbedInput(text="x")]), timeout=10)
            assert reply.model.startswith("embedding-timeout-ms="), reply.model  # the caller's deadline went on
            assert 9000 < int(reply.model.split("=")[1]) <= 10500, reply.model  # gRPC's timeout header rounds up
            health = health_pb2_grpc.HealthStub(channel)
            answer = await health.Check(health_pb2.HealthCheckRequest(service="liveness"), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING  # the proxy's own, not routed
        await server.stop(0)
        await task
        print("OPTIONS IN FORCE:", state._proxy.options_in_force, flush=True)
        os._exit(0)  # the relay's first look for a router (there is no Ray here) would hold the exit

    asyncio.run(main())
"""


def test_the_wrapper_and_the_passthrough_health_service_run_on_serves_own_grpc_server():
    output = _run(_SERVER, {"EMBEDDING_SERVE_GRPC_OPTIONS": json.dumps(OPTIONS),
                            "RAY_preload_python_modules": "embedding_service.proxy.grpc_options"})
    assert "OPTIONS IN FORCE: False" in output  # asked for, but this interpreter never preloaded the module
    assert "was not preloaded" in output


def test_a_proxy_on_a_node_started_without_the_services_environment_says_so_once():
    output = _run(_SERVER)
    assert "OPTIONS IN FORCE: False" in output
    warnings = [line for line in output.splitlines() if "gRPC's default server options" in line]
    assert len(warnings) == 1 and "args.limits.proxy_max_pending_calls" in warnings[0], output[-3000:]
    assert "python -m embedding_service node-env" in warnings[0]


def test_with_the_options_preloaded_the_proxy_finds_them_in_force():
    code = "import embedding_service.proxy.grpc_options\n" + textwrap.dedent(_SERVER)
    output = _run(code, {"EMBEDDING_SERVE_GRPC_OPTIONS": json.dumps(OPTIONS)})
    assert "OPTIONS IN FORCE: True" in output and "gRPC's default server options" not in output


def test_the_drivers_settings_are_where_ray_reads_them():
    from embedding_service.ops import ray_internals

    ray_internals._check()  # also run at import
    assert ray_internals.with_preloaded("a,b", "b,c") == "a,b,c"
    assert ray_internals.metrics_report_interval(500) == {"_system_config": {"metrics_report_interval_ms": 500}}


def test_the_request_router_tells_methods_apart_and_backs_off_when_no_replica_fits():
    """Serve's own request router base and pending request, our router's choice. With no candidate left it asks
    for Serve's backoff: without it Serve tries again at once, never yielding the event loop."""
    import asyncio
    from types import SimpleNamespace

    from ray.serve._private.common import DeploymentHandleSource, DeploymentID, RequestMetadata
    from ray.serve.request_router import PendingRequest

    from embedding_service.router import replica_routing
    from embedding_service.wire.fleet import NodeState, NodeView, ReplicaView, Snapshot

    replica_routing._check()  # also run at import; the live routing is every other test of the session
    router = replica_routing.HealthyNodeRequestRouter(deployment_id=DeploymentID(name="m", app_name="a"),
                                                      handle_source=DeploymentHandleSource.UNKNOWN)
    router.initialize_state()  # no fleet to follow outside a replica
    router.fleet_state.update(Snapshot(3, (
        NodeView("sick", "10.0.0.1", NodeState.QUARANTINED, "fault", 0.0, (ReplicaView("r1", "m", "sick"),)),
        NodeView("well", "10.0.0.2", NodeState.HEALTHY, "", 0.0, (ReplicaView("r2", "m", "well", "refuses"),)))))

    def replica(node: str, rid: str):
        return SimpleNamespace(node_id=node, replica_id=SimpleNamespace(unique_id=rid))

    def pending(method: str) -> PendingRequest:
        return PendingRequest(args=[], kwargs={}, metadata=RequestMetadata(request_id="x", internal_request_id="y",
                                                                           call_method=method))

    async def main():  # a pending request has a future: made on a running loop
        sick, refusing = replica("sick", "r1"), replica("well", "r2")
        embed = pending("embed")
        assert await router.choose_replicas([sick, refusing], embed) == []
        assert embed.routing_context.should_backoff  # Serve sleeps its backoff before the next try
        for about_the_model in ("describe", "quantization_ranges"):  # a refusing replica says why
            assert await router.choose_replicas([sick, refusing], pending(about_the_model)) == [[refusing]]

    asyncio.run(main())


@pytest.mark.parametrize("fence", ["embedding_service.proxy.serve_internals", "embedding_service.fleet.ray_internals",
                                   "embedding_service.ops.ray_internals", "embedding_service.batch.ray_data_internals"])
def test_a_fence_that_finds_ray_changed_stops_loudly_with_rays_version(fence):
    """Each fence's check fails when what it checks is gone (here: removed on purpose before the import)."""
    breaks = {
        "embedding_service.proxy.serve_internals":
            "from ray.serve._private import grpc_util; del grpc_util.gRPCGenericServer.add_passthrough_service",
        "embedding_service.fleet.ray_internals": "import ray._raylet; del ray._raylet.InnerGcsClient",
        "embedding_service.ops.ray_internals":
            "import pathlib; real = pathlib.Path.read_text; "
            "pathlib.Path.read_text = lambda p, *a, **k: '' if p.name == 'default_worker.py' else real(p, *a, **k)",
        "embedding_service.batch.ray_data_internals":
            "from ray.data._internal.cluster_autoscaler import default_autoscaling_coordinator as c; "
            "c._AutoscalingCoordinatorActor.cancel_request = lambda self, requester_id, force: None",
    }
    done = subprocess.run([sys.executable, "-c", f"{breaks[fence]}\nimport {fence}"], capture_output=True, check=False,
                          text=True, timeout=180, cwd=ROOT)
    assert done.returncode != 0
    assert "InternalsChanged" in done.stderr and "Ray 2." in done.stderr, done.stderr[-2000:]


def test_replicas_inter_deployment_servers_bind_loopback_on_a_loopback_ray(monkeypatch):
    """The run command's Ray listens on loopback only; Serve binds each replica's inter-deployment server on every
    interface ("[::]:0"), so on such a node the preloaded module binds it on 127.0.0.1 (its shape checked)."""
    from ray.serve._private import replica

    from embedding_service.proxy import serve_internals

    monkeypatch.setattr(replica, "add_port_to_grpc_server", replica.add_port_to_grpc_server)
    serve_internals.bind_replica_servers_to_loopback()

    class Server:
        def __init__(self) -> None:
            self.bound: list[str] = []

        def add_insecure_port(self, address: str) -> int:
            self.bound.append(address)
            return 1234

    server = Server()
    assert replica.add_port_to_grpc_server(server, serve_internals.REPLICA_ADDRESS) == 1234
    replica.add_port_to_grpc_server(server, "10.0.0.1:5")
    assert server.bound == ["127.0.0.1:0", "10.0.0.1:5"]
