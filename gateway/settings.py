"""Gateway settings: typed, validated once at start-up, from the command line or GATEWAY_* variables."""

from __future__ import annotations

import ipaddress

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GATEWAY_", extra="forbid", frozen=True)

    # gRPC targets of the embedding service (host:port); calls are spread
    # round-robin and move to the next target when one is unavailable.
    targets: list[str] = Field(default_factory=lambda: ["127.0.0.1:9000"], min_length=1)
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    # Bearer keys; empty disables auth, which is allowed on loopback only
    # unless allow_unauthenticated is set.
    api_keys: list[str] = Field(default_factory=list)
    allow_unauthenticated: bool = False
    # The gateway's own key for the service's gRPC API (its args.auth), from the
    # environment (GATEWAY_UPSTREAM_API_KEY), never the command line.
    upstream_api_key: SecretStr | None = None

    # Deadline of one gRPC call, and of the whole request with its retries.
    call_timeout_s: float = Field(30.0, gt=0)
    request_timeout_s: float = Field(60.0, gt=0)
    # Retries on UNAVAILABLE and RESOURCE_EXHAUSTED: exponential backoff, or
    # the server's RetryInfo delay when it sends one.
    max_retries: int = Field(3, ge=0)
    backoff_initial_s: float = Field(0.1, ge=0)
    backoff_max_s: float = Field(2.0, ge=0)
    # Seconds in Retry-After of a 503.
    retry_after_s: int = Field(1, ge=0)

    # Seconds an idle client connection is kept open. Longer than a load balancer's own idle
    # timeout (60 s on the common ones), so the balancer never reuses a connection the gateway
    # has just closed (uvicorn's default, 5 s, makes that race: a reused connection breaks).
    keep_alive_s: int = Field(75, ge=1)
    # uvicorn's line per request (a log record per call costs more CPU than the rest of the gateway's
    # per-call work but its JSON and gRPC); the gateway's metrics and traces count every request anyway.
    access_log: bool = False

    # On SIGTERM or Ctrl-C: /readyz answers 503 at once while requests are still
    # served for drain_delay_s (load balancers stop sending), then no new
    # connections and up to shutdown_timeout_s for the requests in flight.
    drain_delay_s: float = Field(5.0, ge=0)
    shutdown_timeout_s: float = Field(30.0, gt=0)
    # The process that started this one (`python -m embedding_service run`): when it is gone, however it died,
    # the gateway stops as on SIGTERM instead of living on alone. None: nothing to follow (Kubernetes, by hand).
    parent_pid: int | None = Field(None, gt=1)

    # Concurrent embedding requests of at most coalesce_max_inputs inputs for one model and
    # dimensions leave as one gRPC call once coalesce_max_in_flight such calls are out, or at once
    # when they fill coalesce_max_inputs (0: off); see gateway/coalescing.py.
    coalesce_max_inputs: int = Field(32, ge=1)
    coalesce_max_in_flight: int = Field(1, ge=0)
    # Requests waiting to leave in a merged call, over every key; past that a request is refused at once with
    # 429 and Retry-After (as the service's full queues refuse), never held without bound.
    coalesce_max_queued: int = Field(1024, ge=1)

    # Bounds matching the service's limits.
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    max_inputs: int = Field(2048, ge=1)
    max_message_bytes: int = Field(256 * 1024 * 1024, ge=1024)

    @model_validator(mode="after")
    def _auth_off_only_on_loopback(self) -> GatewaySettings:
        if not self.api_keys and not self.allow_unauthenticated and not is_loopback(self.host):
            raise ValueError(
                f"no api_keys configured while listening on {self.host}: set api_keys, "
                "or allow_unauthenticated to serve without auth"
            )
        return self

    @model_validator(mode="after")
    def _merged_calls_within_the_input_bound(self) -> GatewaySettings:
        if self.coalesce_max_inputs > self.max_inputs:
            raise ValueError(f"coalesce_max_inputs ({self.coalesce_max_inputs}) exceeds max_inputs ({self.max_inputs})")
        return self
