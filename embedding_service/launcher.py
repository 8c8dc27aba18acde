"""Starts the service from a Ray Serve config file on local Ray (or a given cluster).

`python -m embedding_service run` reads serve-config.yaml (the same file
`serve deploy` and KubeRay take), starts Ray, Serve's gRPC proxy and the
application, prints where it listens and serves until interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import yaml

from embedding_service.config import AppArgs  # imports no Ray

T = TypeVar("T")

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "serve-config.yaml"
# The proxy's transport cap, as a multiple of the router's own request bound:
# requests between the two get a precise REQUEST_TOO_LARGE from the router.
TRANSPORT_CAP_FACTOR = 4
# Ray's raylet imports these modules into every worker it starts (a Ray system setting).
PRELOAD_ENV = "RAY_preload_python_modules"


def load_config(path: str | Path | None = None) -> dict[str, Any]:
    with open(path or DEFAULT_CONFIG) as f:
        return yaml.safe_load(f)


def _service_apps(config: dict[str, Any]) -> list[dict[str, Any]]:
    return [a for a in config["applications"] if a["import_path"].endswith(":build_app")]


def service_app(config: dict[str, Any]) -> tuple[str, AppArgs]:
    """The service's application in a Serve config: its name and its validated args."""
    app = _service_apps(config)[0]
    return app["name"], AppArgs.parse(app.get("args"))


def export_app_env(config: dict[str, Any]) -> None:
    """Gives this process (and the Ray processes it starts) the application's runtime_env env_vars.

    Serve hands them to the replicas itself; exported here they also reach the
    controller and proxies, and this process: Ray Serve reads its settings when
    `ray.serve` is first imported, and deployment handles built here (by
    `build_app`) carry them. Call before importing ray.serve.
    """
    for key, value in _app_env(config).items():
        os.environ.setdefault(key, value)


def _app_env(config: dict[str, Any]) -> dict[str, str]:
    """The service application's runtime_env env_vars."""
    return {key: str(value) for app in _service_apps(config)
            for key, value in ((app.get("runtime_env") or {}).get("env_vars") or {}).items()}


def node_environment(config: dict[str, Any]) -> dict[str, str]:
    """What every Ray node's environment needs for the service (the Kubernetes manifest sets it on each pod).

    The application's runtime_env env_vars (Serve reads its settings there in the controller and proxies
    too, which runtime_env does not reach) and, from the application's limits, Ray's gRPC transport caps (the
    router's request bound) and the proxy's gRPC server options, which Ray's workers apply as they start
    (serve_grpc_options.py).
    """
    env = _app_env(config)
    if not _service_apps(config):
        return env
    from embedding_service import serve_grpc_options  # may import ray.serve: callers export the app's env first

    limits = service_app(config)[1].limits
    cap = str(limits.max_request_bytes * TRANSPORT_CAP_FACTOR)
    env["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"] = cap
    # The gRPC transport between Serve's proxy and deployments caps what a replica receives at
    # 4 MiB by default: a request under our bound but over that would fail in transit.
    env["RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"] = cap
    env[serve_grpc_options.OPTIONS_ENV] = json.dumps(serve_grpc_options.grpc_server_options(limits))
    env[PRELOAD_ENV] = serve_grpc_options.MODULE
    return env


def prepare_environment(config: dict[str, Any]) -> None:
    """Environment for the Ray processes this launcher starts (node_environment); call before Ray starts.
    What this process's environment already sets wins; preloaded modules add up."""
    export_app_env(config)
    for key, value in node_environment(config).items():
        if key == PRELOAD_ENV:
            preload = [m for m in os.environ.get(PRELOAD_ENV, "").split(",") if m]
            os.environ[PRELOAD_ENV] = ",".join(preload + [m for m in value.split(",") if m not in preload])
        else:
            os.environ.setdefault(key, value)


def start(config: dict[str, Any], address: str | None = None, ray_init_kwargs: dict | None = None,
          metrics_port: int | None = None) -> str:
    """Deploys every application of `config`; returns the gRPC target (host:port).

    `metrics_port`: where a local Ray started here serves Prometheus metrics (None: a port Ray picks).
    """
    prepare_environment(config)  # before ray.serve is imported (see export_app_env)
    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    apps = schema.applications
    if not ray.is_initialized():
        runtime_env = apps[0].runtime_env if len(apps) == 1 else {}
        # No address: a Ray of our own. (ray.init's default joins the last cluster started on this
        # machine, which this command would then deploy into and shut down on exit.)
        kwargs = dict(ray_init_kwargs or {})
        if metrics_port is not None and not address:
            kwargs.setdefault("_metrics_export_port", metrics_port)
        ray.init(address=address or "local", namespace="serve", runtime_env=runtime_env or None, **kwargs)
    serve.start(
        proxy_location=schema.proxy_location,
        http_options=schema.http_options.model_dump(),
        grpc_options=gRPCOptions(**schema.grpc_options.model_dump()),
        logging_config=schema.logging_config,  # the controller's and proxies', as `serve deploy` applies it
    )
    for app in apps:
        module, _, attr = app.import_path.replace(":", ".").rpartition(".")
        builder = getattr(__import__(module, fromlist=[attr]), attr)
        serve.run(builder(app.args), name=app.name, route_prefix=app.route_prefix, blocking=False,
                  logging_config=app.logging_config)
    return f"127.0.0.1:{schema.grpc_options.port}"


def metrics_endpoints() -> list[str]:
    """Every live Ray node's Prometheus endpoint (the service's `embedding_*` and Serve's `ray_serve_*`)."""
    import ray

    return [f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics"
            for n in ray.nodes() if n["Alive"] and n.get("MetricsExportPort")]


_handle_loop: asyncio.AbstractEventLoop | None = None


def call_handles(coroutine: Coroutine[Any, Any, T], timeout_s: float = 60) -> T:
    """Runs a coroutine that calls deployment handles from this (driver) process.

    With the app's Serve settings a handle's router runs on its caller's event
    loop, which must outlive the handle (Serve shuts cached handles down at
    exit): one long-lived loop serves every such call, whatever the settings.
    """
    global _handle_loop
    if _handle_loop is None:
        _handle_loop = asyncio.new_event_loop()
        threading.Thread(target=_handle_loop.run_forever, name="serve-handles", daemon=True).start()
    return asyncio.run_coroutine_threadsafe(coroutine, _handle_loop).result(timeout=timeout_s)


def stop() -> None:
    import ray
    from ray import serve

    try:
        if _handle_loop is not None:  # handles were used from this process: they shut down on their own loop
            call_handles(serve.shutdown_async(), timeout_s=120)
        else:
            serve.shutdown()
    finally:
        ray.shutdown()


async def drain(app_name: str, grace_s: float, give_up: threading.Event | None = None) -> bool:
    """Stops the service taking calls, then waits for the calls in flight to finish.

    At once every router answers health NOT_SERVING and new calls UNAVAILABLE
    (SHUTTING_DOWN, retryable); then this waits until every router reports no
    call left, at most `grace_s` (or until `give_up` is set). True when drained.
    """
    from ray import serve

    from embedding_service.app import RECYCLER

    recycler = serve.get_deployment_handle(RECYCLER, app_name=app_name)
    await recycler.begin_shutdown.remote()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace_s
    while loop.time() < deadline and not (give_up is not None and give_up.is_set()):
        calls = await recycler.calls_in_flight.remote()
        if calls and all(n == 0 for n in calls.values()):
            return True
        await asyncio.sleep(0.1)
    return False


# Where the run command's local Ray serves Prometheus metrics (beside the gateway's 8080).
DEFAULT_METRICS_PORT = 8090
# After the routers report no call left, their last replies may still be on their way through the proxy.
SETTLE_S = 0.5
# Ray's own teardown after the drain (measured here: 5-8 s) and the gateway's drain delay; part of the stated bound.
TEARDOWN_S = 15


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["calibrate"]:
        from embedding_service import calibration

        return calibration.main(argv[1:])
    if argv[:1] == ["render-k8s"]:
        from embedding_service import kubernetes

        return kubernetes.main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m embedding_service")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("calibrate", help="fp32 torch reference vectors for a model's canary and accuracy gate "
                                     "(calibration.py; --help for its options)")
    sub.add_parser("render-k8s", help="a KubeRay RayService and the gateway's Kubernetes objects from the config "
                                      "(kubernetes.py; --help for its options)")
    run = sub.add_parser("run", help="start Ray, Serve's gRPC proxy and the service; serve until interrupted")
    run.add_argument("--config", default=str(DEFAULT_CONFIG), help="Ray Serve config file (default: %(default)s)")
    run.add_argument("--address", default=None, help="Ray cluster address; default starts a local Ray")
    run.add_argument("--gateway-port", type=int, default=8080, help="OpenAI REST gateway port (default: %(default)s)")
    run.add_argument("--gateway-drain-delay-s", type=float, default=1.0,
                     help="seconds the gateway keeps serving with /readyz 503 after a stop (default: %(default)s)")
    run.add_argument("--no-gateway", action="store_true", help="do not start the OpenAI REST gateway")
    run.add_argument("--metrics-port", type=int, default=DEFAULT_METRICS_PORT,
                     help="Prometheus metrics port of the local Ray (service and Serve metrics; default: %(default)s)")
    opts = parser.parse_args(argv)

    config = load_config(opts.config)
    app_name, args = service_app(config)
    target = start(config, address=opts.address, metrics_port=opts.metrics_port)
    print(f"embedding service ready: gRPC on {target} (embedding_service.v1.EmbedService)", flush=True)
    print(f"Prometheus metrics (service, Ray Serve): {', '.join(metrics_endpoints())}", flush=True)
    from embedding_service.auth import Authenticator

    if not Authenticator(args.auth).enabled:
        print(f"{args.auth.api_keys_env or 'no API key variable'} is not set and no key file is configured "
              "(args.auth): the gRPC API serves callers on loopback only", flush=True)
    gateway = None
    if not opts.no_gateway:
        gateway = start_gateway(config, target, opts.gateway_port, opts.gateway_drain_delay_s)
        print(f"OpenAI gateway: http://127.0.0.1:{opts.gateway_port}/v1 (POST /v1/embeddings); "
              f"its metrics: http://127.0.0.1:{opts.gateway_port}/metrics", flush=True)

    stopping, give_up = threading.Event(), threading.Event()

    def on_signal(signum, frame) -> None:
        (give_up if stopping.is_set() else stopping).set()  # a second signal cuts the drain short

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    stopping.wait()
    signalled = time.monotonic()
    grace = args.shutdown.grace_s
    print(f"stopping: health NOT_SERVING, new calls refused (UNAVAILABLE); calls in flight get up to {grace:g} s "
          f"(exit within {grace + TEARDOWN_S:g} s)", flush=True)
    if gateway is not None:
        gateway.send_signal(signal.SIGTERM)  # /readyz 503, then it finishes its requests in flight
    try:
        drained = call_handles(drain(app_name, grace, give_up), timeout_s=grace + 5)
    except Exception as exc:  # the service is stopping anyway: say why the wait was cut, then stop
        print(f"could not wait for the calls in flight ({type(exc).__name__}: {exc})", flush=True)
        drained = False
    print("calls in flight finished" if drained else "grace over: cutting the calls still in flight", flush=True)
    if drained:
        time.sleep(SETTLE_S)
    if gateway is not None:
        # It stops within its drain delay and the same grace, counted from the signal.
        left = signalled + opts.gateway_drain_delay_s + grace + 2 - time.monotonic()
        try:
            gateway.wait(timeout=max(0.1, left))
        except subprocess.TimeoutExpired:
            gateway.kill()
    stop()
    return 0


def start_gateway(config: dict[str, Any], target: str, port: int, drain_delay_s: float = 1.0) -> subprocess.Popen:
    """The gateway runs as its own process (it scales apart from Ray), with the service's limits.

    With the service's API keys configured, it calls the service with one of them
    (in its environment, not its command line, which `ps` shows).
    """
    from embedding_service.auth import Authenticator

    _, args = service_app(config)
    command = [
        sys.executable, "-m", "gateway",
        "--targets", target,
        "--port", str(port),
        "--max-inputs", str(args.limits.max_inputs_per_request),
        "--max-body-bytes", str(args.limits.max_request_bytes),
        "--drain-delay-s", str(drain_delay_s),
        "--shutdown-timeout-s", str(args.shutdown.grace_s),
    ]
    env = dict(os.environ)
    auth = Authenticator(args.auth)
    if auth.enabled:
        env["GATEWAY_UPSTREAM_API_KEY"] = auth.keys()[0].decode()
    return subprocess.Popen(command, env=env)


if __name__ == "__main__":
    sys.exit(main())
