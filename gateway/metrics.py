"""The gateway's metrics (prometheus_client, served at GET /metrics), defined once, and the
ASGI middleware that measures every HTTP request and opens its server span.

Names start with `embedding_gateway_`; labels stay bounded: the route template
(never the raw path), the HTTP method and status, gRPC method and code names.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from embedding_service.observability import tracing
from embedding_service.observability.tracing import Tracer

PREFIX = "embedding_gateway_"
SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
UNMATCHED = "(unmatched)"


@dataclass(frozen=True)
class MetricSpec:
    """One gateway metric as declared: made per app into its registry, listed in docs/monitoring.md."""

    kind: str  # counter, gauge, histogram
    name: str
    description: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()

    @property
    def exported(self) -> str:
        return self.name + ("_total" if self.kind == "counter" else "")

    def make(self, registry: CollectorRegistry):
        if self.kind == "counter":
            return Counter(self.name, self.description, self.labels, registry=registry)
        if self.kind == "gauge":
            return Gauge(self.name, self.description, self.labels, registry=registry)
        return Histogram(self.name, self.description, self.labels, buckets=self.buckets, registry=registry)


SPECS = {
    "http_requests": MetricSpec("counter", PREFIX + "http_requests", "HTTP requests by route template, method and "
                                "status.", ("route", "method", "status")),
    "http_seconds": MetricSpec("histogram", PREFIX + "http_request_seconds", "HTTP request duration, first byte in "
                               "to last byte out.", ("route", "method"), SECONDS),
    "in_flight": MetricSpec("gauge", PREFIX + "http_requests_in_flight", "HTTP requests being served now."),
    "upstream_calls": MetricSpec("counter", PREFIX + "upstream_calls", "gRPC calls to the service (each attempt), "
                                 "by method and gRPC code (OK included).", ("method", "code")),
    "upstream_retries": MetricSpec("counter", PREFIX + "upstream_retries", "gRPC calls sent again after a "
                                   "retryable code (UNAVAILABLE, RESOURCE_EXHAUSTED), by method and that code.",
                                   ("method", "code")),
    "coalesced_callers": MetricSpec("histogram", PREFIX + "coalesced_callers", "REST requests carried by each "
                                    "merged Embed call.", (), (1, 2, 4, 8, 16, 32, 64, 128)),
    "coalescing_refused": MetricSpec("counter", PREFIX + "coalescing_refused", "REST requests refused with 429 "
                                     "because coalesce_max_queued requests were waiting to leave in merged calls."),
}


class GatewayMetrics:
    """One registry per gateway app (a process may run several, as the tests do)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        for attr, spec in SPECS.items():
            setattr(self, attr, spec.make(self.registry))


class ObserveRequests:
    """Pure ASGI middleware (no per-request task as BaseHTTPMiddleware makes): counts, times and spans
    each HTTP request under its route template (`route` where the app serves one route, else the router's match)."""

    def __init__(self, app, metrics: GatewayMetrics, tracer: Tracer, route: str | None = None) -> None:
        self.app = app
        self.metrics = metrics
        self.tracer = tracer
        self.route = route

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}  # what a crash before any response means

        async def sending(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        m = self.metrics
        method = scope["method"]
        started = time.perf_counter()
        m.in_flight.inc()
        # The caller's trace headers, read only when there is a trace to join.
        headers = ([(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope.get("headers", ())]
                   if self.tracer.enabled else None)
        try:
            with self.tracer.span(method, kind="SERVER", parent=headers,
                                  attributes={"http.request.method": method}) as span:
                await self.app(scope, receive, sending)
                if span is not None:
                    route = self.route or _route(scope)
                    span.update_name(f"{method} {route}")
                    tracing.set_attributes(span, **{"http.route": route,
                                                    "http.response.status_code": status["code"]})
        finally:
            route = self.route or _route(scope)
            m.in_flight.dec()
            m.http_requests.labels(route, method, str(status["code"])).inc()
            m.http_seconds.labels(route, method).observe(time.perf_counter() - started)


def _route(scope) -> str:
    route = scope.get("route")  # set by the router on a match
    return getattr(route, "path", None) or UNMATCHED
