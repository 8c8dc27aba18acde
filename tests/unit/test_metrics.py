"""The gateway's metrics as Prometheus scrapes its GET /metrics, after known traffic against a scripted upstream."""

from __future__ import annotations

import time

import httpx

from tests.helpers.gateways import ScriptedEmbed, post, running_gateway, scripted_grpc_peer
from tests.helpers.observe import gateway_samples, scrape, settled, total, wait_until
from tests.helpers.session import METRICS_REPORT_MS


class Deltas:
    """Metric values now against a baseline scrape, over the whole cluster."""

    def __init__(self) -> None:
        # Settled: calls of the tests before (64 at once in test_health) may still be on their way to the endpoint.
        self.before = settled("ray_embedding_requests_total", 2 * METRICS_REPORT_MS / 1000)
        self.after = self.before

    def refresh(self) -> Deltas:
        self.after = scrape()
        return self

    def __call__(self, name: str, **labels: str) -> float:
        return total(name, self.after, **labels) - total(name, self.before, **labels)

    def wait(self, expected: dict[tuple, float], timeout_s: float = 30) -> None:
        """Until every (name, labels) delta reaches its value (Ray reports every METRICS_REPORT_MS), then once
        more after the next reports, so a count past the value shows too."""
        def reached() -> bool:
            self.refresh()
            return all(self(name, **dict(labels)) >= value for (name, *labels), value in expected.items())

        wait_until(reached, timeout_s, f"metric deltas {expected}")
        time.sleep(1.5)  # three report intervals: anything counted twice would show now
        self.refresh()


def test_gateway_metrics_count_routes_statuses_upstream_codes_and_retries():
    peer = ScriptedEmbed(failures=1, retry_delay_s=0.05)
    with scripted_grpc_peer(peer) as target, running_gateway(targets=[target], max_retries=2) as base:
        assert post(base, {"model": "m", "input": ["a", "b"]}).status_code == 200  # after one retry
        assert post(base, {"model": "m", "input": 5}).status_code == 400
        assert httpx.get(f"{base}/no/such/path/123").status_code == 404
        samples = gateway_samples(base)

    def value(name: str, **labels: str) -> float:
        return total(name, samples, **labels)

    route = {"route": "/v1/embeddings", "method": "POST"}
    assert value("embedding_gateway_http_requests_total", status="200", **route) == 1
    assert value("embedding_gateway_http_requests_total", status="400", **route) == 1
    # An unknown path is one bounded label, never the raw path.
    assert value("embedding_gateway_http_requests_total", route="(unmatched)", status="404") == 1
    assert not any("/no/such" in str(s.labels) for s in samples)
    assert value("embedding_gateway_http_request_seconds_count", **route) == 2
    assert value("embedding_gateway_upstream_calls_total", method="Embed", code="RESOURCE_EXHAUSTED") == 1
    assert value("embedding_gateway_upstream_calls_total", method="Embed", code="OK") == 1
    assert value("embedding_gateway_upstream_retries_total", method="Embed", code="RESOURCE_EXHAUSTED") == 1
    assert value("embedding_gateway_http_requests_in_flight") == 1  # the scrape itself
    assert len(peer.calls) == 2
