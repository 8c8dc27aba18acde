"""The cluster tier's session: one real Ray cluster (a head and two workers) and the service on it, started once when
a test first asks for `service` and stopped, every process of it, when the session ends (tests/helpers/session.py)."""

from __future__ import annotations

import pytest

from benchmarks.otlp_sink import OtlpSink
from tests.helpers.session import Service, running_service


@pytest.fixture(scope="session")
def otlp_sink():
    with OtlpSink() as sink:
        yield sink


@pytest.fixture(scope="session")
def service(tiny_model_dir, scoring_model_dirs, tmp_path_factory, otlp_sink) -> Service:
    """A real multi-node Ray cluster on this machine: a head (proxy, router, recycler) and two workers, tracing to the
    session's OTLP collector."""
    with running_service(tiny_model_dir, scoring_model_dirs, tmp_path_factory.mktemp("faults"), otlp_sink) as service:
        yield service


@pytest.fixture(autouse=True)
def service_healthy_at_start(request):
    """Each test of the session's service starts from a known state: the application RUNNING, every deployment
    HEALTHY (a test before it may have killed replicas, drained a node or rolled the application, and must leave it
    so; Serve may still be replacing what it stopped)."""
    if "service" in request.fixturenames:
        request.getfixturevalue("service")
        from tests.helpers.replicas import wait_healthy

        wait_healthy(timeout_s=180)
    yield
