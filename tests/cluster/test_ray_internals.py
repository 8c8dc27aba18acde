"""Ray's non-public API as the session's cluster runs it: the proxy's report of its gRPC options in force (metric and
log), and the shape of Ray's node drain answer that fleet/ray_internals.py checks. The rest of the fences against
the installed Ray: tests/unit/test_ray_internals.py."""

from __future__ import annotations

from pathlib import Path

# Ray's gRPC server built as Serve's proxy builds it, with our servicer functions, and a stand-in for Serve's
# handler factory (Serve's needs a running Serve): its handlers answer with the metadata they were given.


def test_the_sessions_proxy_reports_its_options_in_force_in_its_metric_and_its_log(service):
    """The real proxy, on a node the tests started with the service's environment (the preload took). Its log
    line is there at once: Serve buffers a proxy's records (up to 1,000) and the service's are flushed."""
    import ray

    from tests.helpers.observe import total, wait_until

    wait_until(lambda: total("ray_embedding_proxy_grpc_options_in_force") == 1, 30, "the proxy's report")
    session = Path(ray.init(address=service.cluster.address, ignore_reinit_error=True).address_info["session_dir"])
    logs = sorted((session / "logs" / "serve").glob("proxy_*.log"))
    assert logs, f"no proxy log under {session}"
    text = "".join(log.read_text() for log in logs)
    assert "runs with the service's server options (" in text and "grpc.server.max_pending_requests=" in text


def test_the_drain_call_answers_in_the_shape_the_fence_checks(service):
    from embedding_service.fleet import ray_internals

    answer = ray_internals.drain_node("ab" * 28, "test: a node that is not in the cluster", deadline_s=1)
    assert isinstance(answer, ray_internals.DrainAnswer) and isinstance(answer.message, str)
