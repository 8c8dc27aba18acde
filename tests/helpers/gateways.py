"""Runs gateways (real uvicorn on real ports) and scripted gRPC peers for the tests: stand-ins for the service where
the component under test is the gateway or the client."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from concurrent import futures
from contextlib import contextmanager

import grpc
import httpx
import numpy as np
import uvicorn
from google.protobuf import duration_pb2  # noqa: F401  (RetryInfo's field type)
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from embedding_client.v1 import embedding_pb2 as pb
from embedding_client.v1 import embedding_pb2_grpc
from embedding_service.wire.reasons import ServiceError
from gateway.app import create_app
from gateway.settings import GatewaySettings
from tests.helpers.models import TINY_DIM
from tests.helpers.observe import wait_until
from tests.helpers.ports import free_port


@contextmanager
def running_gateway(tracer=None, root_path: str = "", **settings):
    """The gateway app under uvicorn in a thread; `root_path`: uvicorn's, as behind a proxy that strips a prefix."""
    port = free_port()
    app = create_app(GatewaySettings(port=port, **settings), tracer=tracer)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", root_path=root_path)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline:
            raise TimeoutError("gateway did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextmanager
def gateway_process(*options: str):
    """`python -m gateway` as its own process, as it runs in production; yields (base URL, process)."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "gateway", "--port", str(port), *options])
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: readiness(base) == 200 or process.poll() is not None, 60, "the gateway ready")
        assert process.poll() is None, f"the gateway exited with {process.returncode}"
        yield base, process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


def readiness(base: str) -> int:
    """/readyz's status, or 0 while nothing listens."""
    try:
        return httpx.get(f"{base}/readyz", timeout=5).status_code
    except httpx.TransportError:
        return 0


class ScriptedEmbed(embedding_pb2_grpc.EmbedServiceServicer):
    """Answers Embed with RESOURCE_EXHAUSTED (and a retry hint) `failures` times, then succeeds."""

    def __init__(self, failures: int, retry_delay_s: float | None) -> None:
        self.failures = failures
        self.retry_delay_s = retry_delay_s
        self.calls: list[float] = []

    def Embed(self, request, context):
        self.calls.append(time.monotonic())
        if len(self.calls) <= self.failures:
            status = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message="saturated")
            if self.retry_delay_s is not None:
                info = error_details_pb2.RetryInfo()
                info.retry_delay.FromNanoseconds(int(self.retry_delay_s * 1e9))
                status.details.add().Pack(info)
            context.abort_with_status(rpc_status.to_status(status))
        response = pb.EmbedResponse(model=request.model, dimensions=2)
        for i, _ in enumerate(request.inputs):
            response.embeddings.add(index=i, float32_le=b"\x00\x00\x80?\x00\x00\x00\x00", tokens=1)
        response.usage.prompt_tokens = response.usage.total_tokens = len(request.inputs)
        return response


@contextmanager
def scripted_grpc_peer(servicer: embedding_pb2_grpc.EmbedServiceServicer, health=None):
    """Serves `servicer` (and a grpc_health HealthServicer when given) on a free port; yields its target."""
    server = grpc.server(futures.ThreadPoolExecutor(4))
    embedding_pb2_grpc.add_EmbedServiceServicer_to_server(servicer, server)
    if health is not None:
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0)


def post(base: str, body, headers: dict | None = None, **kw) -> httpx.Response:
    return httpx.post(f"{base}/v1/embeddings", json=body, headers=headers or {}, timeout=60, **kw)


class ScriptedPeer(embedding_pb2_grpc.EmbedServiceServicer):
    """A stand-in target (served by scripted_grpc_peer): its health is set by the test; Embed fails as
    scripted, then answers zeros."""

    def __init__(self, failures: list[ServiceError] | None = None) -> None:
        self.failures = list(failures or [])
        self.calls: list[float] = []
        self.health = health.HealthServicer()
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)

    def Embed(self, request, context):
        self.calls.append(time.monotonic())
        if self.failures:
            error = self.failures.pop(0)
            context.set_trailing_metadata([("grpc-status-details-bin", error.status_bytes())])
            context.abort(error.code, error.message)
        zero = np.zeros(TINY_DIM, dtype="<f4").tobytes()
        return pb.EmbedResponse(model="peer", dimensions=TINY_DIM,
                                embeddings=[pb.Embedding(index=i, float32_le=zero) for i in range(len(request.inputs))])

    def ListModels(self, request, context):
        return pb.ListModelsResponse(limits=pb.ServiceLimits(max_inputs_per_request=2048, max_inputs_per_stream=10_000,
                                                             max_request_bytes=1 << 20))
