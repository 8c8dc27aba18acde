"""Starts the service from a Ray Serve config file on local Ray (or a given cluster).

`python -m embedding_service run` reads serve-config.yaml (the same file
`serve deploy` and KubeRay take), starts Ray, Serve's gRPC proxy and the
application, prints where it listens and serves until interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "serve-config.yaml"
# The proxy's transport cap, as a multiple of the router's own request bound:
# requests between the two get a precise REQUEST_TOO_LARGE from the router.
TRANSPORT_CAP_FACTOR = 4


def load_config(path: str | Path | None = None) -> dict[str, Any]:
    with open(path or DEFAULT_CONFIG) as f:
        return yaml.safe_load(f)


def _service_apps(config: dict[str, Any]) -> list[dict[str, Any]]:
    return [a for a in config["applications"] if a["import_path"].endswith(":build_app")]


def export_app_env(config: dict[str, Any]) -> None:
    """Gives this process (and the Ray processes it starts) the application's runtime_env env_vars.

    Serve hands them to the replicas itself; exported here they also reach the
    controller and proxies, and this process: Ray Serve reads its settings when
    `ray.serve` is first imported, and deployment handles built here (by
    `build_app`) carry them. Call before importing ray.serve.
    """
    for app in _service_apps(config):
        for key, value in ((app.get("runtime_env") or {}).get("env_vars") or {}).items():
            os.environ.setdefault(key, str(value))


def prepare_environment(config: dict[str, Any]) -> None:
    """Environment for the Ray processes this launcher starts; call before Ray starts.

    Ray's gRPC transport cap comes from the router's request bound (on a cluster,
    set it in the Ray nodes' environment, as the app's Serve settings).
    """
    from embedding_service.config import AppArgs

    export_app_env(config)
    bounds = [AppArgs.parse(a.get("args")).limits.max_request_bytes for a in _service_apps(config)]
    if bounds:
        os.environ.setdefault("RAY_SERVE_GRPC_MAX_MESSAGE_SIZE", str(max(bounds) * TRANSPORT_CAP_FACTOR))


def start(config: dict[str, Any], address: str | None = None, ray_init_kwargs: dict | None = None) -> str:
    """Deploys every application of `config`; returns the gRPC target (host:port)."""
    prepare_environment(config)  # before ray.serve is imported (see export_app_env)
    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    apps = schema.applications
    if not ray.is_initialized():
        runtime_env = apps[0].runtime_env if len(apps) == 1 else {}
        ray.init(address=address, namespace="serve", runtime_env=runtime_env or None, **(ray_init_kwargs or {}))
    serve.start(
        proxy_location=schema.proxy_location,
        http_options=schema.http_options.model_dump(),
        grpc_options=gRPCOptions(**schema.grpc_options.model_dump()),
    )
    for app in apps:
        module, _, attr = app.import_path.replace(":", ".").rpartition(".")
        builder = getattr(__import__(module, fromlist=[attr]), attr)
        serve.run(builder(app.args), name=app.name, route_prefix=app.route_prefix, blocking=False)
    return f"127.0.0.1:{schema.grpc_options.port}"


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
        serve.shutdown()
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m embedding_service")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="start Ray, Serve's gRPC proxy and the service; serve until interrupted")
    run.add_argument("--config", default=str(DEFAULT_CONFIG), help="Ray Serve config file (default: %(default)s)")
    run.add_argument("--address", default=None, help="Ray cluster address; default starts a local Ray")
    run.add_argument("--gateway-port", type=int, default=8080, help="OpenAI REST gateway port (default: %(default)s)")
    run.add_argument("--no-gateway", action="store_true", help="do not start the OpenAI REST gateway")
    opts = parser.parse_args(argv)

    config = load_config(opts.config)
    target = start(config, address=opts.address)
    print(f"embedding service ready: gRPC on {target} (embedding_service.v1.EmbedService)", flush=True)
    gateway = None
    if not opts.no_gateway:
        gateway = start_gateway(config, target, opts.gateway_port)
        print(f"OpenAI gateway: http://127.0.0.1:{opts.gateway_port}/v1 (POST /v1/embeddings)", flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    print("shutting down", flush=True)
    if gateway is not None:
        gateway.terminate()
        gateway.wait(timeout=30)
    stop()
    return 0


def start_gateway(config: dict[str, Any], target: str, port: int) -> subprocess.Popen:
    """The gateway runs as its own process (it scales apart from Ray), with the service's limits."""
    from embedding_service.config import AppArgs

    limits = AppArgs.parse(config["applications"][0].get("args")).limits
    command = [
        sys.executable, "-m", "gateway",
        "--targets", target,
        "--port", str(port),
        "--max-inputs", str(limits.max_inputs_per_request),
        "--max-body-bytes", str(limits.max_request_bytes),
    ]
    return subprocess.Popen(command)


if __name__ == "__main__":
    sys.exit(main())
