"""Settings that reach a process through its Ray node's environment, because Serve starts it without the
application's args: the gRPC server options of Serve's proxy, derived from `args.limits`, `args.proxy`, and
`args.auth` (where the keys are: the names of a variable and a file, never a key), which the proxy checks
before it reads a call's request.

The run command and the Kubernetes manifests put them in every node's environment (ops/servefile.py); the
proxy-side module named by PRELOADED_MODULE applies them as a Ray worker starts (proxy/grpc_options.py).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

from embedding_service.config import AuthSettings, Limits, ProxySettings

PROXY_OPTIONS_ENV = "EMBEDDING_SERVE_GRPC_OPTIONS"
PROXY_SETTINGS_ENV = "EMBEDDING_PROXY_SETTINGS"
AUTH_SETTINGS_ENV = "EMBEDDING_AUTH_SETTINGS"
# Ray's own switch for its token authentication (Ray's processes inherit it from the node that started them).
AUTH_MODE_ENV = "RAY_AUTH_MODE"
# Ray's switch for a cluster of several machines (on by default on Linux): "0" makes a local Ray's node 127.0.0.1, and
# every port Ray opens listens on loopback only.
LOOPBACK_RAY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
PRELOADED_MODULE = "embedding_service.proxy.grpc_options"
# The setting an operator changes, named when the options are not in force.
SETTING = "args.limits.proxy_max_pending_calls"


def proxy_grpc_options(limits: Limits) -> list[tuple[str, int]]:
    """gRPC core's server options for Serve's proxy from the application's limits.

    gRPC core holds calls the proxy's event loop has not yet taken up to 1,000 by default, then drops them at
    random (the client sees CANCELLED): these let a burst reach Serve's queue bound instead, which answers
    RESOURCE_EXHAUSTED with a retry hint.
    """
    return [
        ("grpc.server.max_pending_requests", limits.proxy_max_pending_calls),
        ("grpc.server.max_pending_requests_hard_limit", limits.proxy_max_pending_calls),
        # A call not taken within this long is cancelled by gRPC core; the per-call bound is longer anyway.
        ("grpc.server_max_unrequested_time_in_server", int(limits.request_timeout_s)),
        ("grpc.max_concurrent_streams", limits.proxy_max_streams_per_connection),
    ]


def encode(options: list[tuple[str, int]]) -> str:
    return json.dumps(options)


def requested_proxy_options(environ: Mapping[str, str] = os.environ) -> list[tuple[str, int]] | None:
    """The options this node's environment asks for; None when it names none."""
    raw = environ.get(PROXY_OPTIONS_ENV)
    if not raw:
        return None
    return [(str(key), value) for key, value in json.loads(raw)]


def encode_proxy_settings(settings: ProxySettings) -> str:
    return settings.model_dump_json()


def proxy_settings(environ: Mapping[str, str] = os.environ) -> ProxySettings | None:
    """args.proxy as this node's environment gives it; None when it gives none."""
    raw = environ.get(PROXY_SETTINGS_ENV)
    return ProxySettings.model_validate_json(raw) if raw else None


def encode_auth_settings(settings: AuthSettings) -> str:
    return settings.model_dump_json()


def auth_settings(environ: Mapping[str, str] = os.environ) -> AuthSettings | None:
    """args.auth as this node's environment gives it; None when it gives none."""
    raw = environ.get(AUTH_SETTINGS_ENV)
    return AuthSettings.model_validate_json(raw) if raw else None


def ray_token_auth(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process's Ray runs with token authentication."""
    return environ.get(AUTH_MODE_ENV, "").lower() == "token"
