"""`python -m embedding_service COMMAND`: the one command line of the service.

  run          start Ray, Serve's gRPC proxy, the service and the gateway; serve until interrupted
  node-env     the environment every Ray node needs for the config (for `ray start` on a cluster)
  render-k8s   a KubeRay RayService and the gateway's Kubernetes objects from the config
  calibrate    a model's fp32 torch reference vectors for its canary and accuracy gate

Each command reads the config file once (ops/servefile.py) and imports what it needs only when it runs.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from embedding_service.ops.servefile import DEFAULT_CONFIG, ServeFile

# After the routers report no call left, their last replies may still be on their way through the proxy.
SETTLE_S = 0.5
# Ray's own teardown after the drain (5-8 s measured) and the gateway's drain delay; part of the stated bound.
TEARDOWN_S = 15


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m embedding_service")
    sub = parser.add_subparsers(dest="command", required=True)
    _run_parser(sub.add_parser("run", help="start Ray, Serve's gRPC proxy and the service; serve until interrupted"))
    _node_env_parser(sub.add_parser("node-env", help="the environment every Ray node needs for the config"))
    _render_parser(sub.add_parser("render-k8s", help="a KubeRay RayService and the gateway's Kubernetes objects "
                                                     "from the config"))
    _calibrate_parser(sub.add_parser("calibrate", help="fp32 torch reference vectors for a model's canary and "
                                                       "accuracy gate"))
    opts = parser.parse_args(sys.argv[1:] if argv is None else argv)
    return opts.handler(opts)


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="Ray Serve config file (default: %(default)s)")


# ---- run -------------------------------------------------------------------

def _run_parser(run: argparse.ArgumentParser) -> None:
    _config_option(run)
    run.add_argument("--address", default=None, help="Ray cluster address; default starts a local Ray")
    run.add_argument("--node-ip-address", default=None,
                     help="the address other machines join this local Ray at; default: Ray listens on loopback only")
    run.add_argument("--gateway-port", type=int, default=8080, help="OpenAI REST gateway port (default: %(default)s)")
    run.add_argument("--gateway-drain-delay-s", type=float, default=1.0,
                     help="seconds the gateway keeps serving with /readyz 503 after a stop (default: %(default)s)")
    run.add_argument("--no-gateway", action="store_true", help="do not start the OpenAI REST gateway")
    run.set_defaults(handler=run_command)


def report_ray_auth() -> None:
    """Says whether the Ray this command started runs with token authentication (a WARNING when it does not)."""
    from embedding_service.wire import node_env

    if node_env.ray_token_auth():
        print("Ray's token authentication: on (its token: RAY_AUTH_TOKEN, or ~/.ray/auth_token)", flush=True)
    else:
        print(f"WARNING: Ray runs without token authentication ({node_env.AUTH_MODE_ENV}="
              f"{os.environ.get(node_env.AUTH_MODE_ENV, 'unset')}): anyone who reaches its ports can run code here; "
              "the router reports it in embedding_ray_token_auth", flush=True)


def run_command(opts: argparse.Namespace) -> int:
    from embedding_service.ops import launcher
    from embedding_service.wire.auth import Authenticator

    config = ServeFile.load(opts.config)
    target = launcher.start(config, address=opts.address, node_ip_address=opts.node_ip_address)
    print(f"embedding service ready: gRPC on {target} (embedding_service.v1.EmbedService)", flush=True)
    print(f"Prometheus metrics (service, Ray Serve): {', '.join(launcher.metrics_endpoints())}", flush=True)
    report_ray_auth()
    auth = config.args.auth
    if not Authenticator(auth).enabled:
        print(f"{auth.api_keys_env or 'no API key variable'} is not set and no key file is configured "
              "(args.auth): the gRPC API serves callers on loopback only", flush=True)
    gateway = None
    if not opts.no_gateway:
        try:
            gateway = launcher.start_gateway(config, target, opts.gateway_port, opts.gateway_drain_delay_s)
        except RuntimeError as refused:  # what it needs is missing here: nothing is left running
            print(f"the gateway was not started: {refused}", file=sys.stderr, flush=True)
            launcher.stop(graceful=opts.address is not None)
            return 2
        print(f"OpenAI gateway: http://127.0.0.1:{opts.gateway_port}/v1 (POST /v1/embeddings); "
              f"its metrics: http://127.0.0.1:{opts.gateway_port}/metrics", flush=True)
    signalled, drained = _serve_until_signalled(config, gateway)
    if gateway is not None:
        # It stops within its drain delay and the same grace, counted from the signal.
        left = signalled + opts.gateway_drain_delay_s + config.args.shutdown.grace_s + 2 - time.monotonic()
        try:
            gateway.wait(timeout=max(0.1, left))
        except subprocess.TimeoutExpired:
            gateway.kill()
    # Past the grace, a local Ray is stopped at once: Serve would wait out each replica's grace again.
    launcher.stop(graceful=drained or opts.address is not None)
    return 0


def _serve_until_signalled(config: ServeFile, gateway: subprocess.Popen | None) -> tuple[float, bool]:
    """Serves until SIGTERM or Ctrl-C, then drains (a second signal cuts the grace short); returns when the
    signal came and whether every call in flight finished."""
    from embedding_service.ops import launcher

    stopping, give_up = threading.Event(), threading.Event()

    def on_signal(signum, frame) -> None:
        (give_up if stopping.is_set() else stopping).set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    stopping.wait()
    signalled = time.monotonic()
    grace = config.args.shutdown.grace_s
    print(f"stopping: health NOT_SERVING, new calls refused (UNAVAILABLE); calls in flight get up to {grace:g} s "
          f"(exit within {grace + TEARDOWN_S:g} s)", flush=True)
    if gateway is not None:
        gateway.send_signal(signal.SIGTERM)  # /readyz 503, then it finishes its requests in flight
    try:
        drained = launcher.call_handles(launcher.drain(config.app_name, grace, give_up), timeout_s=grace + 5)
    except Exception as exc:  # the service is stopping anyway: say why the wait was cut, then stop
        print(f"could not wait for the calls in flight ({type(exc).__name__}: {exc})", flush=True)
        drained = False
    print("calls in flight finished" if drained else "grace over: cutting the calls still in flight", flush=True)
    if drained:
        time.sleep(SETTLE_S)
    return signalled, drained


# ---- node-env --------------------------------------------------------------

def _node_env_parser(parser: argparse.ArgumentParser) -> None:
    _config_option(parser)
    parser.set_defaults(handler=node_env_command)


def node_env_command(opts: argparse.Namespace) -> int:
    """`export` lines, for the shell that runs `ray start` on each node (or a container's environment)."""
    for key, value in sorted(ServeFile.load(opts.config).node_environment().items()):
        print(f"export {key}={shlex.quote(value)}")
    return 0


# ---- render-k8s ------------------------------------------------------------

def _bounds(text: str):
    from embedding_service.ops.kubernetes import Bounds

    low, _, high = text.partition(":")
    return Bounds(min=int(low), max=int(high or low))


def _render_parser(parser: argparse.ArgumentParser) -> None:
    from embedding_service.ops.kubernetes import DEFAULT_OUT, KubernetesOptions

    defaults = KubernetesOptions()
    parser.description = ("Render a KubeRay RayService and the gateway's Deployment, Service, PodDisruptionBudget "
                          "and HorizontalPodAutoscaler from the config.")
    _config_option(parser)
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="folder for the YAML files (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if --out differs from the render")
    parser.add_argument("--name", default=defaults.name, help="RayService name (default: %(default)s)")
    parser.add_argument("--namespace", default=defaults.namespace, help="(default: %(default)s)")
    parser.add_argument("--image", default=defaults.image, help="CPU image: head, CPU workers, gateway")
    parser.add_argument("--gpu-image", default=defaults.gpu_image, help="CUDA image: GPU workers")
    parser.add_argument("--cpu-workers", type=_bounds, default=None, metavar="MIN:MAX",
                        help="CPU worker pods (default: the CPU models' replica bounds)")
    parser.add_argument("--gpu-workers", type=_bounds, default=None, metavar="MIN:MAX",
                        help="GPU worker pods (default: the GPU models' replica bounds times their num_gpus)")
    parser.add_argument("--gpu-type", default=None, help="nvidia.com/gpu.product node label, e.g. NVIDIA-L4")
    parser.add_argument("--no-gpu-tolerations", action="store_true",
                        help="no toleration of the nvidia.com/gpu taint on GPU workers")
    parser.add_argument("--gateway-replicas", type=_bounds, default=defaults.gateway_replicas, metavar="MIN:MAX")
    parser.add_argument("--batch-workers", type=_bounds, default=None, metavar="MIN:MAX",
                        help="batch jobs' worker pods, one model actor each (default: 0 to the jobs' most actors)")
    parser.add_argument("--jobs-secret", default=defaults.jobs_secret,
                        help="Secret with the jobs' store URL (key store-url) and S3 keys (default: %(default)s)")
    parser.add_argument("--ray-token-secret", default=defaults.ray_token_secret,
                        help="Secret (key auth_token) with Ray's token; '' lets KubeRay make one (default: %(default)s)")
    parser.add_argument("--operator-namespace", default=defaults.operator_namespace,
                        help="KubeRay operator's namespace, the dashboard's one caller (default: %(default)s)")
    parser.add_argument("--monitoring-namespace", default=defaults.monitoring_namespace,
                        help="namespace that scrapes the metrics ports; '' for none (default: %(default)s)")
    parser.add_argument("--gateway-client-namespace", action="append", default=None, dest="gateway_clients",
                        help="a namespace whose pods may call the gateway (repeat it); unset: any source")
    parser.add_argument("--grpc-client-namespace", action="append", default=[], dest="grpc_clients",
                        help="a namespace whose pods may call the gRPC API directly besides the gateway (repeat it)")
    parser.set_defaults(handler=render_command)


def render_command(opts: argparse.Namespace) -> int:
    from embedding_service.ops import kubernetes

    options = kubernetes.KubernetesOptions(
        name=opts.name, namespace=opts.namespace, image=opts.image, gpu_image=opts.gpu_image,
        cpu_workers=opts.cpu_workers, gpu_workers=opts.gpu_workers, gpu_type=opts.gpu_type,
        gateway_replicas=opts.gateway_replicas, batch_workers=opts.batch_workers, jobs_secret=opts.jobs_secret,
        ray_token_secret=opts.ray_token_secret or None,
        operator_namespace=opts.operator_namespace, monitoring_namespace=opts.monitoring_namespace or None,
        gateway_client_namespaces=opts.gateway_clients, grpc_client_namespaces=opts.grpc_clients,
        **({"gpu_tolerations": []} if opts.no_gpu_tolerations else {}))
    try:
        rendered = kubernetes.render(ServeFile.load(opts.config), options)
    except kubernetes.Unrenderable as refused:
        print(f"{opts.config}: {refused}", file=sys.stderr)
        return 2
    out = Path(opts.out)
    if opts.check:
        stale = kubernetes.stale_files(rendered, out)
        for path in stale:
            print(f"{path} differs from the render of {opts.config}", file=sys.stderr)
        return 1 if stale else 0
    for path in kubernetes.write(rendered, out):
        print(path)
    return 0


# ---- calibrate -------------------------------------------------------------

def _calibrate_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = "fp32 torch vectors of the canary and gate sentences for a model"
    parser.add_argument("--model", required=True, help='a model folder, hub id or "package:<module>"')
    parser.add_argument("--out", help="the .npz to write (default: the shipped calibrations folder)")
    parser.add_argument("--max-seq-length", type=int, default=None)
    parser.set_defaults(handler=calibrate_command)


def calibrate_command(opts: argparse.Namespace) -> int:
    from sentence_transformers import SentenceTransformer

    from embedding_service.model import calibration
    from embedding_service.model.forward import model_source

    model = SentenceTransformer(model_source(opts.model), device="cpu")
    if opts.max_seq_length:
        model.max_seq_length = opts.max_seq_length
    made = calibration.compute(model)
    out = Path(opts.out) if opts.out else Path(calibration.__file__).parent / "calibrations" / f"{made.fingerprint[:16]}.npz"
    calibration.save(made, out)
    print(f"{out}: {len(made.canary)} canary and {len(made.gate)} gate vectors of model {made.fingerprint[:16]}")
    return 0
