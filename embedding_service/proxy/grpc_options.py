"""gRPC server options for Ray Serve's gRPC servers (the proxy above all), applied as a Ray worker starts.

Ray's proxy builds its grpc.aio server with Ray's own options (message sizes only) before it imports any
code of ours, and gRPC core's defaults then cut bursts: calls the proxy's event loop has not yet taken are
held up to 1,000, dropped at random up to 3,000 and all dropped past that, and the client gets CANCELLED
with no trace in the proxy. With the service's bounds (wire/node_env.py) a call the service cannot take
reaches Serve's queue bound and gets RESOURCE_EXHAUSTED with a retry hint instead.

Ray's raylet imports the modules its nodes' environment names (ops/ray_internals.PRELOAD_ENV) into each
worker before it runs anything; the run command and the Kubernetes manifests name this one there and put
the options in PROXY_OPTIONS_ENV. Where they are missing the proxy says so when it starts (state.py).

On a Ray whose node is loopback only, Serve's replicas' inter-deployment servers are bound to loopback here too.
"""

from __future__ import annotations

import os

from embedding_service.wire.node_env import LOOPBACK_RAY_ENV, requested_proxy_options

_options = requested_proxy_options()
if _options:
    from embedding_service.proxy import serve_internals

    serve_internals.apply_server_options(_options)
if os.environ.get(LOOPBACK_RAY_ENV) == "0":  # a Ray on loopback only (the run command's): its replicas too
    from embedding_service.proxy import serve_internals

    serve_internals.bind_replica_servers_to_loopback()
