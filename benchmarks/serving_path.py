"""The serving path's own cost: `python -m benchmarks --serving-path`.

With a near-zero model (near_zero.py) what a call costs is the serving path's: Serve's gRPC proxy, the
router, the model replica's handling, the gateway. Each workload runs over gRPC and REST against the
service as configured (only the model changed), then against a peer server (`--peer-command`) on the same
model, in the same run, one system after the other; every process's CPU time is read from /proc around each
workload (proc_cpu.py) and reported per call, by process.

Workloads (one sentence per call): W1 one call at a time; W3 64 asyncio callers over gRPC (one channel),
over REST with httpx's default pool (most calls reconnect), with httpx keeping every connection open, with
aiohttp (connections kept open) and through the official openai SDK's AsyncOpenAI (callers.py).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.callers import aiohttp_callers, grpc_callers, openai_callers, rest_callers
from benchmarks.clients import GrpcClient, RestClient, wait_answering
from benchmarks.measure import peer_process
from benchmarks.proc_cpu import CpuMeter
from benchmarks.workloads import W1_TEXT, pct, sentences

NAME = "near-zero"
CALLERS = 64
SIZES = {"full": {"w1_n": 300, "w3_requests": 2560}, "quick": {"w1_n": 40, "w3_requests": 256}}

Measure = Callable[[], tuple[float, list[float]]]


def _row(calls: int, wall: float, latencies: list[float], cpu: dict[str, float], client_s: float) -> dict:
    per_call = {role: seconds / calls * 1e3 for role, seconds in sorted(cpu.items())}
    return {"calls": calls, "rate": calls / wall, "p50_ms": pct(latencies, 50) * 1e3,
            "p99_ms": pct(latencies, 99) * 1e3, "cpu_ms_per_call": per_call,
            "server_cpu_ms_per_call": sum(per_call.values()), "client_cpu_ms_per_call": client_s / calls * 1e3}


def _sequential(call: Callable[[list[str]], float], n: int) -> Measure:
    def run() -> tuple[float, list[float]]:
        for _ in range(5):
            call([W1_TEXT])
        start = time.perf_counter()
        latencies = [call([W1_TEXT]) for _ in range(n)]
        return time.perf_counter() - start, latencies

    return run


def workloads(grpc_target: str | None, rest_base: str, model: str, sizes: dict) -> dict[str, tuple[int, Measure]]:
    """name -> (calls, measure) for one system; gRPC ones only with a target."""
    texts = [[s] for s in sentences(sizes["w3_requests"], 12, 3)]
    n3 = len(texts)
    w: dict[str, tuple[int, Measure]] = {}
    if grpc_target:
        w["W1_grpc"] = (sizes["w1_n"], _sequential(GrpcClient(grpc_target).embed, sizes["w1_n"]))
    w["W1_rest"] = (sizes["w1_n"], _sequential(RestClient(rest_base, model).embed, sizes["w1_n"]))
    if grpc_target:
        w["W3_grpc"] = (n3, lambda: grpc_callers(grpc_target, texts, CALLERS))
    w["W3_rest"] = (n3, lambda: rest_callers(rest_base, model, texts, CALLERS))
    w["W3_rest_workers"] = (n3, lambda: rest_callers(rest_base, model, texts, CALLERS, workers=True))
    w["W3_rest_keepalive"] = (n3, lambda: rest_callers(rest_base, model, texts, CALLERS, keep_alive=True))
    w["W3_rest_aiohttp"] = (n3, lambda: aiohttp_callers(rest_base, model, texts, CALLERS))
    w["W3_openai_sdk"] = (n3, lambda: openai_callers(rest_base, model, texts, CALLERS))
    return w


def run_workloads(chosen: dict[str, tuple[int, Measure]], meter: CpuMeter) -> dict:
    rows = {}
    for name, (calls, measure) in chosen.items():
        client = time.process_time()  # to the nanosecond; /proc and os.times() count in ticks of 10 ms
        with meter.measure() as cpu:
            wall, latencies = measure()
        client_s = time.process_time() - client
        rows[name] = _row(calls, wall, latencies, cpu.by_role, client_s)
        r = rows[name]
        print(f"  {name:<18} {r['rate']:7.0f} calls/s  p50 {r['p50_ms']:6.1f} ms  p99 {r['p99_ms']:7.1f} ms  "
              f"client {r['client_cpu_ms_per_call']:.2f} server CPU {r['server_cpu_ms_per_call']:5.2f} ms/call "
              + " ".join(f"{k} {v:.2f}" for k, v in r["cpu_ms_per_call"].items()), flush=True)
    return rows


def near_zero_config(config, model_dir: Path):
    """The config file with its default model replaced by the near-zero one (everything else as shipped)."""
    from embedding_service.ops.servefile import ServeFile

    raw = config.raw
    app = next(a for a in raw["applications"] if a["import_path"].endswith(":build_app"))
    model = app["args"]["models"][0]
    model.update(name=NAME, path=str(model_dir))
    app["args"]["default_model"] = NAME
    return ServeFile.parse(raw)


def through_the_service(config, opts, sizes: dict, metrics_report: dict) -> dict:
    from embedding_service.ops import launcher

    target = launcher.start(config, ray_init_kwargs={"include_dashboard": False, "log_to_driver": False,
                                                     **metrics_report})
    gateway = launcher.start_gateway(config, target, opts.gateway_port, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{opts.gateway_port}"
        wait_answering(RestClient(base, NAME), 60, gateway)
        only = set(opts.workload) if opts.workload else None
        chosen = {k: v for k, v in workloads(target, base, NAME, sizes).items() if only is None or k in only}
        print("ours:", flush=True)
        return run_workloads(chosen, CpuMeter())
    finally:
        gateway.terminate()
        gateway.wait(timeout=30)
        launcher.stop()


def against_the_peer(command: str, url: str, model_dir: Path, sizes: dict, log: Path, only,
                     model: str = NAME) -> dict:
    """The REST workloads against the peer started from `command`: {model} in it is the near-zero model's
    folder; it must answer to the model name `model`."""
    with peer_process(command.format(model=model_dir), log) as process:
        wait_answering(RestClient(url, model), 900, process)
        chosen = {k: v for k, v in workloads(None, url, model, sizes).items() if only is None or k in only}
        print(f"peer ({command}):", flush=True)
        return {"command": command, "url": url,
                "workloads": run_workloads(chosen, CpuMeter(process.pid, role=lambda cmdline: "peer", include_root=True))}


def main(opts, config, metrics_report: dict) -> dict:
    from benchmarks.near_zero import build_near_zero_model

    sizes = SIZES["quick" if opts.quick else "full"]
    folder = Path(opts.model_dir) if opts.model_dir else Path(tempfile.mkdtemp(prefix="near-zero-"))
    model_dir = build_near_zero_model(folder)
    config = near_zero_config(config, model_dir)
    config.export_app_env()
    results = {"mode": "serving-path", "model": "one BERT layer, hidden 32, all-MiniLM-L6-v2's tokenizer",
               "callers": CALLERS, "sizes": sizes, "cpus": os.cpu_count()}
    Path(opts.out).mkdir(parents=True, exist_ok=True)
    results["workloads"] = through_the_service(config, opts, sizes, metrics_report)
    if opts.peer_command:
        only = set(opts.workload) if opts.workload else None
        try:
            results["peer"] = against_the_peer(opts.peer_command, opts.peer_url, model_dir, sizes,
                                               Path(opts.out) / "peer.log", only)
        except Exception as exc:
            results["peer"] = {"command": opts.peer_command, "url": opts.peer_url, "error": repr(exc)}
            print(f"the peer failed: {exc!r}")
    return results
