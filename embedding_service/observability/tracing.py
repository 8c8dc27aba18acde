"""OpenTelemetry spans for the service's hops, off unless an OTLP endpoint is configured.

One `Tracer` per process (router replica, model replica, gateway). Off, its
`span()` is a shared no-op context and nothing from the SDK is imported, so a
service without tracing pays nothing. On, spans go to an OTLP collector through
the SDK's batching processor (the `tracing` extra installs the exporter).

Context crosses processes as W3C `traceparent` headers: in gRPC metadata from the
gateway (or any traced client) to the router, and in `ShardRequest.trace_context`
through the deployment-handle call to the model replica.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable, Mapping
from typing import Any

from embedding_service.config import TracingSettings

_OFF = contextlib.nullcontext()
TRACE_HEADERS = ("traceparent", "tracestate")


class Tracer:
    """Starts spans, or does nothing when `provider` is None (tracing off)."""

    def __init__(self, provider: Any | None, scope: str) -> None:
        self.provider = provider
        self._tracer = provider.get_tracer(scope) if provider is not None else None
        if provider is not None:
            from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

            self._propagator = TraceContextTextMapPropagator()

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    def _context(self, carrier: Mapping[str, str] | Iterable[tuple[str, str]] | None):
        if not carrier:
            return None
        if not isinstance(carrier, Mapping):
            carrier = {k: v for k, v in carrier if k in TRACE_HEADERS}
        return self._propagator.extract(carrier)

    def span(self, name: str, kind: str = "INTERNAL", parent=None, attributes: dict | None = None):
        """A context manager yielding the span (None when off). `parent`: a carrier (dict or gRPC
        metadata pairs) from another process; without it the span is a child of the current one."""
        if self._tracer is None:
            return _OFF
        from opentelemetry.trace import SpanKind

        return self._tracer.start_as_current_span(name, context=self._context(parent), kind=SpanKind[kind],
                                                  attributes=attributes)

    def record(self, name: str, start_ns: int, end_ns: int, attributes: dict | None = None) -> None:
        """A finished span, child of the current one, for a stage timed elsewhere (wall-clock ns)."""
        if self._tracer is None:
            return
        span = self._tracer.start_span(name, attributes=attributes, start_time=start_ns)
        span.end(end_time=end_ns)

    def inject(self) -> dict[str, str] | None:
        """The current span's context as headers for the next hop (None when off)."""
        if self._tracer is None:
            return None
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier)
        return carrier

    def shutdown(self) -> None:
        if self.provider is not None:
            self.provider.shutdown()


def wall_ns() -> int:
    return time.time_ns()


def set_attributes(span, **attributes: Any) -> None:
    if span is not None:
        span.set_attributes({k: v for k, v in attributes.items() if v is not None})


def set_error(span, code_name: str, message: str = "") -> None:
    """Marks a span failed with its gRPC code."""
    if span is None:
        return
    from opentelemetry.trace import Status, StatusCode

    span.set_attribute("rpc.grpc.status_code", code_name)
    if code_name != "OK":
        span.set_status(Status(StatusCode.ERROR, message or code_name))


def _provider(exporter, service_name: str, sample_ratio: float, component: str):
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    resource = Resource.create({"service.name": service_name, "embedding.component": component})
    provider = TracerProvider(resource=resource, sampler=ParentBased(TraceIdRatioBased(sample_ratio)))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def service_tracer(settings: TracingSettings, component: str) -> Tracer:
    """The tracer of a router or model replica, from the app's `args.tracing`."""
    if not settings.otlp_endpoint:
        return Tracer(None, component)
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    headers = os.environ.get(settings.headers_env, "") if settings.headers_env else ""
    exporter = OTLPSpanExporter(endpoint=settings.otlp_endpoint, insecure=settings.otlp_endpoint.startswith("http://"),
                                headers=headers or None)
    return Tracer(_provider(exporter, settings.service_name, settings.sample_ratio, component), "embedding_service")


def env_tracer(component: str, environ: Mapping[str, str] = os.environ) -> Tracer:
    """A tracer configured by the standard OTEL_* variables (the gateway): on when an OTLP endpoint is set.

    The exporter reads OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT, _HEADERS, _INSECURE and
    the rest itself; OTEL_SERVICE_NAME names the service, OTEL_TRACES_SAMPLER_ARG the ratio.
    """
    if not (environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")):
        return Tracer(None, component)
    if environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return Tracer(None, component)
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    ratio = float(environ.get("OTEL_TRACES_SAMPLER_ARG", "1.0"))
    name = environ.get("OTEL_SERVICE_NAME", "embedding-gateway")
    return Tracer(_provider(OTLPSpanExporter(), name, ratio, component), component)
