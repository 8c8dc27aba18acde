"""What a test needs to start the run command beside the session's Ray: the environment without the session's own
Ray settings, and a call's key."""

from __future__ import annotations

import os

from embedding_service.ops import ray_internals
from embedding_service.wire import node_env

# What the test session put in its own environment for its own Ray: the run command derives its own.
SESSION_ONLY = ("RAY_ADDRESS", "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE", "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH",
                node_env.PROXY_OPTIONS_ENV, node_env.PROXY_SETTINGS_ENV, node_env.AUTH_SETTINGS_ENV,
                node_env.AUTH_MODE_ENV, ray_internals.PRELOAD_ENV)


def own_environment(**extra: str) -> dict[str, str]:
    """This process's environment without the session's Ray settings, with `extra`."""
    return {k: v for k, v in os.environ.items() if k not in SESSION_ONLY} | extra


def bearer(key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]
