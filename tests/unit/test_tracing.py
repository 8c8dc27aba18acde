"""Traces: with no OTLP endpoint configured, tracing is off and costs nothing."""

from __future__ import annotations

from embedding_service.config import TracingSettings
from embedding_service.observability.tracing import Tracer, env_tracer, service_tracer


def test_tracing_is_off_without_an_endpoint():
    assert not service_tracer(TracingSettings(), "router").enabled
    assert not env_tracer("gateway", environ={}).enabled
    off = Tracer(None, "x")
    with off.span("anything") as span:
        assert span is None
    assert off.inject() is None
    assert env_tracer("gateway", environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1"}).enabled
