"""Callers as asyncio services are written: many tasks on one event loop, one client shared by them, either a
task per call behind a semaphore (`_run`) or long-lived workers each taking the next call (`_run_workers`).

gRPC through the generated stubs on one grpc.aio channel; REST through one httpx.AsyncClient, either with
httpx's default pool (20 connections kept alive: with 64 callers most calls open a new connection) or
keeping every caller's connection open (httpcore's pool then checks every open connection on each call: the
client's own CPU per call grows with the connections, see client_cpu_ms_per_call); through one
aiohttp.ClientSession, whose pool keeps up to 100 connections open; and the official `openai` SDK's
AsyncOpenAI with its own defaults (its pool keeps up to 100 connections open).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

Call = Callable[[list[str]], Awaitable[None]]


async def _run(call: Call, payloads: list[list[str]], in_flight: int,
               warm: int | None = None) -> tuple[float, list[float]]:
    """`warm` calls first (default: one per caller), unmeasured."""
    gate = asyncio.Semaphore(in_flight)

    async def one(texts: list[str]) -> float:
        async with gate:
            t = time.perf_counter()
            await call(texts)
            return time.perf_counter() - t

    await asyncio.gather(*(one(["warm up"]) for _ in range(in_flight if warm is None else warm)))
    start = time.perf_counter()
    latencies = await asyncio.gather(*(one(p) for p in payloads))
    return time.perf_counter() - start, list(latencies)


async def _run_workers(call: Call, payloads: list[list[str]], in_flight: int,
                       warm: int | None = None) -> tuple[float, list[float]]:
    """The other common shape: `in_flight` worker tasks, each taking the next payload as soon as its call is
    done (no task per call, no semaphore). `warm` calls first (default: one per worker), unmeasured."""
    latencies: list[float] = []

    async def worker(queue) -> None:
        for texts in queue:
            t = time.perf_counter()
            await call(texts)
            latencies.append(time.perf_counter() - t)

    warming = iter([["warm up"]] * (in_flight if warm is None else warm))
    await asyncio.gather(*(worker(warming) for _ in range(in_flight)))
    latencies.clear()
    start = time.perf_counter()
    queue = iter(payloads)  # shared: each worker takes the next
    await asyncio.gather(*(worker(queue) for _ in range(in_flight)))
    return time.perf_counter() - start, latencies


def grpc_callers(target: str, payloads: list[list[str]], in_flight: int) -> tuple[float, list[float]]:
    """(wall seconds, latencies) of Embed calls from `in_flight` tasks on one channel."""
    import grpc

    from embedding_client.v1 import embedding_pb2 as pb
    from embedding_client.v1 import embedding_pb2_grpc

    async def main():
        async with grpc.aio.insecure_channel(target) as channel:
            stub = embedding_pb2_grpc.EmbedServiceStub(channel)

            async def call(texts: list[str]) -> None:
                await stub.Embed(pb.EmbedRequest(inputs=[pb.EmbedInput(text=t) for t in texts],
                                                 encoding=pb.VECTOR_ENCODING_FLOAT32_LE), timeout=600)

            return await _run(call, payloads, in_flight)

    return asyncio.run(main())


def rest_callers(base: str, model: str, payloads: list[list[str]], in_flight: int,
                 keep_alive: bool = False, warm: int | None = None,
                 workers: bool = False) -> tuple[float, list[float]]:
    """POST /v1/embeddings (base64) from `in_flight` tasks on one httpx.AsyncClient; `keep_alive`: a pool that
    keeps every caller's connection open (else httpx's default, 20 kept alive); `warm`: calls first; `workers`:
    `in_flight` long-lived worker tasks instead of a task per call behind a semaphore."""
    import httpx

    limits = httpx.Limits(max_connections=100, max_keepalive_connections=100) if keep_alive else httpx.Limits(
        max_connections=100, max_keepalive_connections=20)

    async def main():
        async with httpx.AsyncClient(timeout=600, limits=limits) as client:
            async def call(texts: list[str]) -> None:
                r = await client.post(f"{base}/v1/embeddings",
                                      json={"model": model, "input": texts, "encoding_format": "base64"})
                r.raise_for_status()

            return await (_run_workers if workers else _run)(call, payloads, in_flight, warm)

    return asyncio.run(main())


def aiohttp_callers(base: str, model: str, payloads: list[list[str]], in_flight: int) -> tuple[float, list[float]]:
    """POST /v1/embeddings (base64) from `in_flight` tasks on one aiohttp.ClientSession (100 connections kept
    open, aiohttp's default)."""
    import aiohttp

    async def main():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
            async def call(texts: list[str]) -> None:
                async with session.post(f"{base}/v1/embeddings", json={
                        "model": model, "input": texts, "encoding_format": "base64"}) as r:
                    r.raise_for_status()
                    await r.read()

            return await _run(call, payloads, in_flight)

    return asyncio.run(main())


def openai_callers(base: str, model: str, payloads: list[list[str]], in_flight: int) -> tuple[float, list[float]]:
    """client.embeddings.create from `in_flight` tasks on one AsyncOpenAI, the SDK's defaults (base64 on the
    wire, decoded by the SDK)."""
    from openai import AsyncOpenAI

    async def main():
        client = AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=600)
        try:
            async def call(texts: list[str]) -> None:
                await client.embeddings.create(model=model, input=texts)

            return await _run(call, payloads, in_flight)
        finally:
            await client.close()

    return asyncio.run(main())
