"""Where one small call's time goes, stage by stage: `python -m benchmarks.stages [--calls N] [--out FILE]`.

One-sentence Embed calls, one at a time over gRPC (W1), each with a trace of its own (the client sends a
`traceparent`), against the service on the near-zero model (near_zero.py) with its tracing sent to a
collector in this process (otlp_sink.py). From each call's spans (the router's `EmbedService/Embed`, its
`shard`, the replica's `model.embed` and its `tokenize`, `queue` and `forward`) and the client's own
latency, the medians of:

- outside the router: the client's latency less the router's span (the client, Serve's proxy with what the
  service runs there, the hop to the router and back, Serve's handling in the router before our code runs);
- the router's own code before and after the shard call;
- the hop to the model replica and back (Serve's handle call: routing, transport, the replica's handling);
- the replica: before tokenizing, tokenizing, to the batcher, queued, the forward pass, after it.

Tracing costs each process some time per span, so traced calls are slower than untraced ones; the stages say
where the time goes, `python -m benchmarks --serving-path` how much a call takes, and
`python -m benchmarks.serve_floor` what Serve itself takes for one and two trivial hops.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import tempfile
import time
from pathlib import Path

ROUTER, SHARD, MODEL = "EmbedService/Embed", "shard", "model.embed"
TOKENIZE, QUEUE, FORWARD = "tokenize", "queue", "forward"
NEEDED = (ROUTER, SHARD, MODEL, TOKENIZE, QUEUE, FORWARD)

# stage -> (start, end), each a (span, "start" | "end"); OUTSIDE, below, comes from the client's latency.
STAGES: dict[str, tuple[tuple[str, str], tuple[str, str]]] = {
    "router: its code before the shard call": ((ROUTER, "start"), (SHARD, "start")),
    "hop router -> model replica": ((SHARD, "start"), (MODEL, "start")),
    "replica: before tokenizing": ((MODEL, "start"), (TOKENIZE, "start")),
    "replica: tokenizing": ((TOKENIZE, "start"), (TOKENIZE, "end")),
    "replica: to the batcher": ((TOKENIZE, "end"), (QUEUE, "start")),
    "replica: queued": ((QUEUE, "start"), (QUEUE, "end")),
    "replica: forward pass": ((FORWARD, "start"), (FORWARD, "end")),
    "replica: after the forward pass": ((FORWARD, "end"), (MODEL, "end")),
    "hop model replica -> router": ((MODEL, "end"), (SHARD, "end")),
    "router: its code after the shard call": ((SHARD, "end"), (ROUTER, "end")),
}
OUTSIDE = "outside the router: client, Serve's proxy, the hops to the router and back"


def call_stages(spans, latency_s: float) -> dict[str, float] | None:
    """One call's stages in ms from its trace's spans (objects with name, start_ns, end_ns); None when a span
    is missing (a call that was not traced whole)."""
    first: dict[str, tuple[int, int]] = {}
    for s in spans:
        first.setdefault(s.name, (s.start_ns, s.end_ns))
    if any(name not in first for name in NEEDED):
        return None

    def at(point: tuple[str, str]) -> int:
        start, end = first[point[0]]
        return start if point[1] == "start" else end

    stages = {OUTSIDE: latency_s * 1e3 - (first[ROUTER][1] - first[ROUTER][0]) / 1e6}
    stages.update({name: (at(b) - at(a)) / 1e6 for name, (a, b) in STAGES.items()})
    return stages


def summarize(per_call: list[dict[str, float]], latencies_s: list[float]) -> dict:
    """Median of each stage over the calls, with the median latency and how many calls were traced whole."""
    return {"calls": len(latencies_s), "traced_whole": len(per_call),
            "latency_p50_ms": statistics.median(latencies_s) * 1e3,
            "stages_p50_ms": {name: statistics.median(c[name] for c in per_call) for name in per_call[0]}}


def measure(target: str, sink, calls: int, wait_s: float = 30.0) -> dict:
    """`calls` sequential one-sentence Embed calls to `target`, each its own trace, read back from `sink`."""
    from benchmarks.clients import GrpcClient
    from benchmarks.workloads import W1_TEXT

    client = GrpcClient(target)
    request = client.request([W1_TEXT])
    for _ in range(10):
        client.stub.Embed(request, timeout=60)
    traced: list[tuple[str, float]] = []
    for _ in range(calls):
        trace_id = secrets.token_hex(16)
        metadata = [("traceparent", f"00-{trace_id}-{secrets.token_hex(8)}-01")]
        started = time.perf_counter()
        client.stub.Embed(request, timeout=60, metadata=metadata)
        traced.append((trace_id, time.perf_counter() - started))
    client.channel.close()
    # Spans leave each process in batches: wait until every call's trace is whole, or until wait_s.
    deadline = time.monotonic() + wait_s
    while True:
        by_trace: dict[str, list] = {}
        for s in sink.spans():
            by_trace.setdefault(s.trace_id, []).append(s)
        per_call = [call_stages(by_trace.get(t, []), latency) for t, latency in traced]
        if all(per_call) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    whole = [c for c in per_call if c]
    if not whole:
        raise RuntimeError("no call's trace arrived whole: is the service's tracing on, and sent to this sink?")
    return summarize(whole, [latency for _, latency in traced])


def print_stages(result: dict) -> None:
    print(f"{result['traced_whole']} of {result['calls']} calls traced whole; latency p50 "
          f"{result['latency_p50_ms']:.2f} ms (traced)")
    for name, ms in result["stages_p50_ms"].items():
        print(f"  {ms:7.3f} ms  {name}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="the service's config file (default: serve-config.yaml)")
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--model-dir", help="where the near-zero model is built (kept; default a temp folder)")
    parser.add_argument("--out", help="write the result as JSON here")
    args = parser.parse_args(argv)

    from benchmarks.near_zero import build_near_zero_model
    from benchmarks.otlp_sink import OtlpSink
    from benchmarks.serving_path import near_zero_config
    from embedding_service.ops.servefile import ServeFile

    folder = Path(args.model_dir) if args.model_dir else Path(tempfile.mkdtemp(prefix="near-zero-"))
    with OtlpSink() as sink:
        raw = ServeFile.load(args.config).raw
        app = next(a for a in raw["applications"] if a["import_path"].endswith(":build_app"))
        app["args"]["tracing"] = {**app["args"].get("tracing", {}), "otlp_endpoint": sink.endpoint}
        config = near_zero_config(ServeFile.parse(raw), build_near_zero_model(folder))
        config.export_app_env()

        from embedding_service.ops import launcher

        target = launcher.start(config, ray_init_kwargs={"include_dashboard": False, "log_to_driver": False})
        try:
            result = measure(target, sink, args.calls)
        finally:
            launcher.stop()
    result["cpus"] = os.cpu_count()
    print_stages(result)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
