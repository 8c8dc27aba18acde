"""The cluster tier's session: one real Ray cluster (a head, two workers and two nodes for batch jobs) and the service
on it, started once when a test first asks for `service` and stopped, every process of it, when the session ends
(tests/helpers/session.py)."""

from __future__ import annotations

import pytest
import ray

from benchmarks.otlp_sink import OtlpSink
from embedding_client.v1 import embedding_pb2 as pb
from tests.helpers.replicas import wait_healthy
from tests.helpers.session import WORKER_CPUS, Service, running_service


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


@pytest.fixture
def capacity_restored(service):
    """The session's cluster as the test found it, whatever the outcome: its clients stopped, no fault flag, two
    live workers, the application healthy. A failure here is then one failure, not every test after it run short
    of a node. Yields a list for the test to put its clients' stop functions in."""
    head = ray.get_runtime_context().get_node_id()
    stops: list = []
    yield stops
    for stop in stops:
        stop()
    for flag in service.fault_dir.iterdir():
        flag.unlink()
    watch = service.stub.WatchNodes(pb.WatchNodesRequest())
    faulted = {n.node_id for n in next(watch).nodes if n.state != pb.NODE_STATE_HEALTHY}
    watch.cancel()
    for handle in list(service.cluster.worker_nodes):
        if handle.node_id in faulted:
            service.cluster.remove_node(handle)
    alive = [n for n in ray.nodes() if n["Alive"] and n["NodeID"] != head and n["Resources"].get("CPU")]
    for _ in range(len(alive), 2):
        service.cluster.add_node(num_cpus=WORKER_CPUS)
    wait_healthy(timeout_s=180)
