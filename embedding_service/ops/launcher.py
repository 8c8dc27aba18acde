"""The service's life on Ray from the driver: start Ray and Serve with the config file's applications,
drain the calls in flight, stop; and the gateway as its own process beside them.

`python -m embedding_service run` (cli.py) drives these; the tests and the benchmark call them directly.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from embedding_service.config import HEAD_RESOURCE
from embedding_service.ops.servefile import ServeFile
from embedding_service.wire import node_env
from embedding_service.wire.messages import FLEET_DEPLOYMENT

T = TypeVar("T")


def start(config: ServeFile, address: str | None = None, ray_init_kwargs: dict | None = None,
          node_ip_address: str | None = None) -> str:
    """Deploys the config's applications (on a local Ray of its own when `address` is None); returns the gRPC
    target (host:port). A local Ray's head declares HEAD_RESOURCE, where the router and the recycler run; it
    listens on loopback only unless `node_ip_address` names the address other machines join it at."""
    config.prepare_environment()  # before ray.serve is imported (see ServeFile.export_app_env)
    if not address:
        if node_ip_address is None:  # read as Ray is imported
            os.environ.setdefault(node_env.LOOPBACK_RAY_ENV, "0")
        else:
            ray_init_kwargs = {**(ray_init_kwargs or {}), "_node_ip_address": node_ip_address}
        # Ray's token authentication on (Ray makes a token in ~/.ray/auth_token if there is none), unless the
        # environment says otherwise: the router then says so at WARNING and in embedding_ray_token_auth. Set before
        # Ray is imported: it reads the mode once per process.
        os.environ.setdefault(node_env.AUTH_MODE_ENV, "token")
    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config.raw)
    apps = schema.applications
    if not ray.is_initialized():
        runtime_env = apps[0].runtime_env if len(apps) == 1 else {}
        kwargs = dict(ray_init_kwargs or {})
        if not address:
            kwargs["resources"] = {HEAD_RESOURCE: 1, **kwargs.get("resources", {})}
            kwargs.setdefault("dashboard_host", "127.0.0.1")
        # No address: a Ray of our own. (ray.init's default joins the last cluster started on this machine,
        # which this command would then deploy into and shut down on exit.)
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


class HandleLoop:
    """One long-lived event loop in a thread, for the coroutines that call deployment handles from the driver.

    With the app's Serve settings a handle's router runs on its caller's event loop, which must outlive the
    handle (Serve shuts cached handles down at exit).
    """

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def used(self) -> bool:
        return self._loop is not None

    def run(self, coroutine: Coroutine[Any, Any, T], timeout_s: float = 60) -> T:
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            threading.Thread(target=self._loop.run_forever, name="serve-handles", daemon=True).start()
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=timeout_s)


handles = HandleLoop()


def call_handles(coroutine: Coroutine[Any, Any, T], timeout_s: float = 60) -> T:
    return handles.run(coroutine, timeout_s)


def stop(graceful: bool = True) -> None:
    """Stops Serve, then Ray. `graceful` False: Ray at once (calls still in flight are cut; Serve would wait
    out each replica's grace for them)."""
    import ray
    from ray import serve

    try:
        if not graceful:
            return
        if handles.used:  # handles were used from this process: they shut down on their own loop
            call_handles(serve.shutdown_async(), timeout_s=120)
        else:
            serve.shutdown()
    finally:
        ray.shutdown()


async def drain(app_name: str, grace_s: float, give_up: threading.Event | None = None) -> bool:
    """Stops the service taking calls, then waits for the calls in flight to finish.

    At once every router answers health NOT_SERVING and new calls UNAVAILABLE (SHUTTING_DOWN, retryable);
    then this waits until every router reports no call left, at most `grace_s` (or until `give_up` is set).
    True when drained.
    """
    from ray import serve

    fleet = serve.get_deployment_handle(FLEET_DEPLOYMENT, app_name=app_name)
    await fleet.begin_shutdown.remote()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace_s
    while loop.time() < deadline and not (give_up is not None and give_up.is_set()):
        calls = await fleet.calls_in_flight.remote()
        if calls and all(n == 0 for n in calls.values()):
            return True
        await asyncio.sleep(0.1)
    return False


def start_gateway(config: ServeFile, target: str, port: int, drain_delay_s: float = 1.0,
                  env: dict[str, str] | None = None, **popen: Any) -> subprocess.Popen:
    """The gateway as its own process (it scales apart from Ray), with the service's limits.

    With the service's API keys configured, it calls the service with one of them (in its environment, not
    its command line, which `ps` shows); with batch jobs on, it serves OpenAI's Files and Batches on their store.
    """
    from embedding_service.wire.auth import Authenticator

    environ = dict(os.environ if env is None else env)
    auth = Authenticator(config.args.auth)
    if auth.enabled:
        environ["GATEWAY_UPSTREAM_API_KEY"] = auth.keys()[0].decode()
    jobs = config.args.jobs
    if jobs is not None and jobs.store_url_env:  # the service's store, the same secret; never SQLite beside it
        if not environ.get(jobs.store_url_env):
            raise RuntimeError(f"jobs.store_url_env names {jobs.store_url_env}, which is not set here: the gateway's "
                               "Batch API needs the jobs' store")
        environ["GATEWAY_JOBS_STORE_URL"] = environ[jobs.store_url_env]
    command = [sys.executable, "-m", "gateway", *config.gateway_args([target], port, drain_delay_s=drain_delay_s),
               "--parent-pid", str(os.getpid())]  # it stops if this process is killed outright
    return subprocess.Popen(command, env=environ, **popen)
