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
