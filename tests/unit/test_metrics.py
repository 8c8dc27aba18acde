"""The gateway's metrics as Prometheus scrapes its GET /metrics, after known traffic against a scripted upstream."""

from __future__ import annotations

import httpx

from tests.helpers.gateways import ScriptedEmbed, post, running_gateway, scripted_grpc_peer
from tests.helpers.observe import gateway_samples, total


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
