"""gRPC server options for Ray Serve's gRPC servers (the proxy above all), applied as a Ray worker starts.

Ray's proxy builds its grpc.aio server with Ray's own options (message sizes
only) before it imports any code of ours. gRPC core's defaults then cut
bursts: calls the proxy's event loop has not yet taken are held up to 1,000,
dropped at random up to 3,000 and all dropped past that, and the client gets
CANCELLED with no trace in the proxy (measured here: 213 of 2,000 concurrent
one-sentence calls, 1,391 of 4,000). With these bounds raised, a call the
service cannot take reaches Serve's queue bound and gets RESOURCE_EXHAUSTED
with a retry hint instead.

Ray's raylet imports the modules named in `RAY_preload_python_modules` into
each worker before it runs anything; the launcher names this one there and puts
the options, derived from the application's `limits`, in OPTIONS_ENV (on a
cluster, set both in the Ray nodes' environment).
"""

from __future__ import annotations

import json
import os

MODULE = __name__
OPTIONS_ENV = "EMBEDDING_SERVE_GRPC_OPTIONS"


def grpc_server_options(limits) -> list[tuple[str, int]]:
    """The gRPC core options for the proxy from the application's limits (config.Limits)."""
    return [
        ("grpc.server.max_pending_requests", limits.proxy_max_pending_calls),
        ("grpc.server.max_pending_requests_hard_limit", limits.proxy_max_pending_calls),
        # A call not taken within this long is cancelled by gRPC core; the per-call bound is longer anyway.
        ("grpc.server_max_unrequested_time_in_server", int(limits.request_timeout_s)),
        ("grpc.max_concurrent_streams", limits.proxy_max_streams_per_connection),
    ]


def _apply() -> None:
    raw = os.environ.get(OPTIONS_ENV)
    if not raw:
        return
    from ray.serve._private import constants  # noqa: PLC0415 (only where the options are asked for)

    extra = [(str(key), value) for key, value in json.loads(raw)]
    names = {key for key, _ in extra}
    # In place: Ray's grpc_util holds this very list and reads it when it builds a server.
    constants.DEFAULT_GRPC_SERVER_OPTIONS[:] = [
        option for option in constants.DEFAULT_GRPC_SERVER_OPTIONS if option[0] not in names
    ] + extra


_apply()
