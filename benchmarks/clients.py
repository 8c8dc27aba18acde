"""The benchmark's own clients of the service: gRPC stubs, REST from threads, REST from asyncio."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np


class GrpcClient:
    def __init__(self, target: str) -> None:
        import grpc

        from embedding_client.v1 import embedding_pb2 as pb
        from embedding_client.v1 import embedding_pb2_grpc

        self.pb = pb
        self.channel = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", 256 << 20)])
        self.stub = embedding_pb2_grpc.EmbedServiceStub(self.channel)

    def request(self, texts: list[str]):
        pb = self.pb
        return pb.EmbedRequest(inputs=[pb.EmbedInput(text=t) for t in texts], encoding=pb.VECTOR_ENCODING_FLOAT32_LE)

    def embed(self, texts: list[str]) -> float:
        t = time.perf_counter()
        self.stub.Embed(self.request(texts), timeout=600)
        return time.perf_counter() - t

    def stream(self, texts: list[str]) -> tuple[int, float]:
        pb = self.pb
        request = pb.EmbedStreamRequest(inputs=[pb.EmbedInput(text=t) for t in texts], encoding=pb.VECTOR_ENCODING_FLOAT32_LE)
        out = np.empty((len(texts), 0), dtype=np.float32)
        seen = 0
        for chunk in self.stub.EmbedStream(request, timeout=3600):
            if out.shape[1] == 0:
                out = np.empty((len(texts), chunk.dimensions), dtype=np.float32)
            for e in chunk.embeddings:
                out[e.index] = np.frombuffer(e.float32_le, "<f4")
                seen += 1
        return seen, float(out.nbytes)


class RestClient:
    """One httpx.Client shared by the threads. A call whose connection breaks (a server closing a kept-alive
    connection as it is reused) is sent once more, as OpenAI's SDK does, and counted in `resent`."""

    def __init__(self, base: str, model: str) -> None:
        import httpx

        self.base = base
        self.model = model
        self.client = httpx.Client(timeout=600)
        self.resent = 0

    def embed(self, texts: list[str]) -> float:
        import httpx

        body = {"model": self.model, "input": texts, "encoding_format": "base64"}
        t = time.perf_counter()
        try:
            r = self.client.post(f"{self.base}/v1/embeddings", json=body)
        except httpx.TransportError:
            self.resent += 1
            r = self.client.post(f"{self.base}/v1/embeddings", json=body)
        r.raise_for_status()
        return time.perf_counter() - t


class AsyncRestClient:
    """REST as asyncio services call it: one httpx.AsyncClient, every call a task on one event loop."""

    def __init__(self, base: str, model: str) -> None:
        self.base = base
        self.model = model

    def run(self, payloads: list[list[str]], in_flight: int) -> tuple[float, list[float]]:
        """Posts every payload with `in_flight` at once (httpx's default pool, as callers leave it; one call
        first, unmeasured); returns (wall seconds, latencies)."""
        from benchmarks.callers import rest_callers

        return rest_callers(self.base, self.model, payloads, in_flight, warm=1)


def concurrent(call, payloads: list, in_flight: int) -> tuple[float, list[float]]:
    """Runs `call(payload)` for every payload with `in_flight` at once; returns (wall seconds, latencies)."""
    start = time.perf_counter()
    with ThreadPoolExecutor(in_flight) as pool:
        latencies = list(pool.map(call, payloads))
    return time.perf_counter() - start, latencies


def wait_answering(rest: RestClient, timeout_s: float, process=None) -> None:
    """Until a REST server answers an embedding call (or its process exits, or the time is up)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            rest.embed(["warm up"])
            rest.resent = 0  # the probes of a server not yet listening are not broken calls
            return
        except Exception as exc:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"the server exited ({process.returncode}) before it answered") from exc
            if time.monotonic() > deadline:
                raise RuntimeError(f"{rest.base} did not answer within {timeout_s:g} s: {exc}") from exc
            time.sleep(0.5)
