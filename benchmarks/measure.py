"""The measurements: each workload through each client, against the service or a peer server."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

from benchmarks.callers import aiohttp_callers, openai_callers
from benchmarks.clients import AsyncRestClient, GrpcClient, RestClient, concurrent, wait_answering
from benchmarks.workloads import W1_TEXT, Work, pct


def accuracy_of(client: GrpcClient, model: str) -> dict:
    """The served model's precision and its start-up figures against fp32 torch (GetModel)."""
    from google.protobuf.json_format import MessageToDict

    served = client.stub.GetModel(client.pb.GetModelRequest(name=model), timeout=60).model
    return {"precision": served.precision, "refused": served.refused,
            **MessageToDict(served.accuracy, preserving_proto_field_name=True)}


def _w1(lat: list[float], ip: dict, same: dict | None) -> dict:
    out = {"p50_ms": pct(lat, 50) * 1e3, "p99_ms": pct(lat, 99) * 1e3,
           "p50_over_in_process_ms": pct(lat, 50) * 1e3 - ip["w1_p50_ms"]}
    if same:
        out["p50_over_same_backend_ms"] = out["p50_ms"] - same["w1_p50_ms"]
    return out


def _rate(rate: float, lat: list[float], ip: dict, same: dict | None) -> dict:
    out = {"rate": rate, "ratio": rate / ip["limit"], "p99_ms": pct(lat, 99) * 1e3}
    if same:
        out["ratio_same_backend"] = rate / same["limit"]
    return out


def measure_client(name: str, client, work: Work, results: dict, batch_stats) -> dict:
    """W1-W4 through one blocking client (gRPC, or REST from 64 threads), as rows `W<n>_<name>`."""
    ip, same = results["in_process"], results.get("in_process_backend")
    w = {}
    lat = [client.embed([W1_TEXT]) for _ in range(work.sizes["w1_n"])]
    w[f"W1_{name}"] = _w1(lat, ip, same) | {"batches": batch_stats(work.sizes["w1_n"])}
    wall, lat = concurrent(client.embed, [work.w2] * work.sizes["w2_requests"], 2)
    w[f"W2_{name}"] = _rate(work.w2_inputs / wall, lat, ip, same) | {"batches": batch_stats(work.w2_inputs)}
    wall, lat = concurrent(lambda s: client.embed([s]), work.w3, 64)
    w[f"W3_{name}"] = _rate(len(work.w3) / wall, lat, ip, same) | {"batches": batch_stats(len(work.w3))}
    wall, lat = concurrent(client.embed, work.w4, 2)
    rate = work.w4_inputs / wall
    w[f"W4_{name}"] = {"rate": rate, "ratio": rate / ip["w4_rate"], "batches": batch_stats(work.w4_inputs)}
    return w


def measure_async_rest(rest: AsyncRestClient, work: Work, results: dict, batch_stats) -> dict:
    """W1-W3 over REST from an asyncio caller (one AsyncClient), as rows `W<n>_rest_async`; W3 also from the
    openai SDK (`W3_openai_sdk`) and from callers that keep their connections open (`W3_rest_keepalive`)."""
    ip, same = results["in_process"], results.get("in_process_backend")
    wall, lat = rest.run([[W1_TEXT]] * work.sizes["w1_n"], 1)
    w = {"W1_rest_async": _w1(lat, ip, same) | {"batches": batch_stats(work.sizes["w1_n"])}}
    wall, lat = rest.run([work.w2] * work.sizes["w2_requests"], 2)
    w["W2_rest_async"] = _rate(work.w2_inputs / wall, lat, ip, same) | {"batches": batch_stats(work.w2_inputs)}
    wall, lat = rest.run([[s] for s in work.w3], 64)
    w["W3_rest_async"] = _rate(len(work.w3) / wall, lat, ip, same) | {"batches": batch_stats(len(work.w3))}
    # The official SDK as 64 tasks on one AsyncOpenAI (its pool keeps up to 100 connections open), and
    # callers that keep their connections open (aiohttp's pool).
    wall, lat = openai_callers(rest.base, rest.model, [[s] for s in work.w3], 64)
    w["W3_openai_sdk"] = _rate(len(work.w3) / wall, lat, ip, same) | {"batches": batch_stats(len(work.w3))}
    wall, lat = aiohttp_callers(rest.base, rest.model, [[s] for s in work.w3], 64)
    w["W3_rest_keepalive"] = _rate(len(work.w3) / wall, lat, ip, same) | {"batches": batch_stats(len(work.w3))}
    return w


@contextlib.contextmanager
def peer_process(command: str, log: Path) -> Iterator[subprocess.Popen]:
    """A peer server started from `command` (a shell line, its output to `log`), stopped with its whole
    process group afterwards (SIGTERM, SIGKILL after 30 s)."""
    with open(log, "wb") as out:
        process = subprocess.Popen(command, shell=True, start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def measure_peer(command: str, base: str, model: str, work: Work, results: dict, log: Path) -> dict:
    """The REST workloads (threads and asyncio) against another OpenAI-compatible server started from
    `command` (a shell line), after the service has stopped: each system has the machine to itself."""
    with peer_process(command, log) as process:
        rest = RestClient(base, model)
        wait_answering(rest, 900, process)
        rest.embed(work.w2)  # warm

        def no_batches(inputs: int) -> dict:  # the peer's batches are not ours to read
            return {}

        w = measure_client("rest", rest, work, results, no_batches)
        w |= measure_async_rest(AsyncRestClient(base, model), work, results, no_batches)
        w["W3_rest"]["calls_resent"] = rest.resent  # over the whole threaded run
    return {"command": command, "url": base, "model": model, "workloads": w}


def measure_service(grpc_client: GrpcClient, rest: RestClient, work: Work, results: dict, batch_stats) -> dict:
    """W1-W5 against a running service and gateway; `batch_stats(inputs)` returns the batches run since its last
    call, once the replicas' metrics count the inputs sent since."""
    ip = results["in_process"]
    grpc_client.embed(work.w2)  # warm
    batch_stats(len(work.w2))
    w = measure_client("grpc", grpc_client, work, results, batch_stats)
    w |= measure_client("rest", rest, work, results, batch_stats)
    w["W3_rest"]["calls_resent"] = rest.resent  # over the whole threaded run
    w |= measure_async_rest(AsyncRestClient(rest.base, rest.model), work, results, batch_stats)
    tracemalloc.start()
    t = time.perf_counter()
    seen, held = grpc_client.stream(work.w5)
    wall = time.perf_counter() - t
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    w["W5_grpc_stream"] = {"rate": seen / wall, "ratio": seen / wall / ip["w5_rate_sample"], "inputs": seen,
                           "client_peak_mib": peak / 2**20, "result_mib": held / 2**20, "batches": batch_stats(seen)}
    calls = [work.w6[i : i + 256] for i in range(0, len(work.w6), 256)]
    wall, lat = concurrent(grpc_client.embed, calls, 2)
    w["W6_grpc_real_text"] = {"rate": len(work.w6) / wall, "ratio": len(work.w6) / wall / ip["w6_rate"],
                              "batches": batch_stats(len(work.w6))}
    return w
