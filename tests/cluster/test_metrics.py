"""The service's metrics, as Prometheus scrapes Ray's per-node endpoints over HTTP, after known traffic; the Grafana
dashboard's queries against a real scrape."""

from __future__ import annotations

import json
import re
import time

import grpc
import pytest
import ray

from embedding_client.v1 import embedding_pb2 as pb
from embedding_service.config import FORWARD_MAX_TOKENS
from embedding_service.model.forward import plan_passes
from embedding_service.wire.deadline import ELAPSED_KEY, TIMEOUT_KEY
from embedding_service.wire.messages import MERGED_KEY
from tests.helpers.classifiers import CLASSIFIER
from tests.helpers.gateways import post, running_gateway
from tests.helpers.models import MINILM, RERANKER, SPLADE, TINY
from tests.helpers.observe import gateway_samples, scrape, settled, total, wait_until
from tests.helpers.paths import ROOT
from tests.helpers.session import METRICS_REPORT_MS, REFUSING
from tests.helpers.texts import make_texts, text_inputs

DASHBOARD = ROOT / "monitoring" / "grafana-dashboard.json"
EMBED = "/embedding_service.v1.EmbedService/Embed"


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


def key(name: str, **labels: str) -> tuple:
    return (name, *sorted(labels.items()))


def test_requests_inputs_tokens_batches_and_errors_are_counted_exactly(service):
    stub = service.stub
    deltas = Deltas()
    calls = [make_texts(n, seed=70 + n, max_words=20) for n in (1, 3, 7, 16, 32)]  # each one shard, one batch
    # Metadata the service's own processes pass each other, sent by callers: it changes nothing (each call counts
    # once, none is cut short by an "elapsed" time, and none fails on a value no proxy would write).
    forged = [[(MERGED_KEY, str(10**18)), (ELAPSED_KEY, str(10**9)), (TIMEOUT_KEY, "1")],
              [(MERGED_KEY, "1" * 4301)]]
    responses = [stub.Embed(pb.EmbedRequest(model=MINILM, inputs=text_inputs(texts)), timeout=60,
                            metadata=forged[i] if i < len(forged) else None) for i, texts in enumerate(calls)]
    tokens = [[e.tokens for e in r.embeddings] for r in responses]
    stream_texts = make_texts(40, seed=5, max_words=8)
    chunks = list(stub.EmbedStream(pb.EmbedStreamRequest(model=TINY, inputs=text_inputs(stream_texts)), timeout=60))
    stream_tokens = sum(c.usage.total_tokens for c in chunks)

    with pytest.raises(grpc.RpcError) as unknown:
        stub.Embed(pb.EmbedRequest(model="no-such-model", inputs=text_inputs(["x"])), timeout=30)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as invalid:
        stub.Embed(pb.EmbedRequest(model=MINILM, inputs=text_inputs(["x"]), dimensions=100_000), timeout=30)
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as malformed:
        service.channel.unary_unary(EMBED)(b"\xff\xff\xff", timeout=30)
    assert malformed.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    n_inputs = sum(len(t) for t in calls)
    n_tokens = sum(sum(t) for t in tokens)
    # The replica's forward passes (within 32 sequences and the CPU's 1,024 padded tokens): longest x count each.
    padded = sum(max(t[k] for k in p) * len(p) for t in tokens for p in plan_passes(t, 32, FORWARD_MAX_TOKENS["cpu"]))
    ok = {"method": "Embed", "model": MINILM, "code": "OK"}
    deltas.wait({
        key("ray_embedding_requests_total", **ok): len(calls),
        key("ray_embedding_requests_total", method="Embed", code="INVALID_ARGUMENT"): 1,
        key("ray_embedding_requests_total", method="Embed", code="NOT_FOUND"): 1,
        key("ray_embedding_requests_total", method="EmbedStream", model=TINY, code="OK"): 1,
        key("ray_embedding_batch_size_count", model=MINILM): len(calls),
        key("ray_embedding_proxy_refusals_total", method="Embed"): 1,
        key("ray_embedding_inputs_total", model=TINY): 40,
    })
    d = deltas
    # Calls by method, model and final code; a model the caller named wrongly is never a label.
    assert d("ray_embedding_requests_total", **ok) == len(calls)
    assert d("ray_embedding_requests_total", method="Embed", model=MINILM, code="INVALID_ARGUMENT") == 1
    assert d("ray_embedding_requests_total", method="Embed", model="(none)", code="NOT_FOUND") == 1
    assert d("ray_embedding_requests_total", method="Embed") == len(calls) + 2
    assert d("ray_embedding_requests_total", method="EmbedStream", model=TINY, code="OK") == 1
    assert not any(s.labels.get("model") == "no-such-model" for s in d.after)
    assert d("ray_embedding_request_seconds_count", method="Embed") == len(calls) + 2
    # The malformed bytes never reached a router: the proxy answered and counted them.
    assert d("ray_embedding_proxy_refusals_total", method="Embed", code="INVALID_ARGUMENT",
             reason="MALFORMED_REQUEST") == 1
    # Inputs and tokens, per call and in all.
    assert d("ray_embedding_inputs_total", model=MINILM) == n_inputs
    assert d("ray_embedding_tokens_total", model=MINILM) == n_tokens
    assert d("ray_embedding_inputs_total", model=TINY) == 40
    assert d("ray_embedding_tokens_total", model=TINY) == stream_tokens
    # Histograms: exact counts per bucket (Ray rebuilds a histogram's _sum from bucket midpoints).
    assert d("ray_embedding_request_inputs_count", method="Embed", model=MINILM) == len(calls)
    assert d("ray_embedding_request_inputs_bucket", method="Embed", model=MINILM, le="4.0") == 2  # 1 and 3
    assert d("ray_embedding_request_inputs_bucket", method="Embed", model=MINILM, le="16.0") == 4
    assert d("ray_embedding_request_tokens_count", method="Embed", model=MINILM) == len(calls)
    assert d("ray_embedding_request_inputs_bucket", method="EmbedStream", model=TINY, le="32.0") == 0  # 40
    assert d("ray_embedding_request_inputs_bucket", method="EmbedStream", model=TINY, le="64.0") == 1
    assert d("ray_embedding_request_shards_bucket", model=MINILM, le="1.0") == len(calls)
    assert d("ray_embedding_request_shards_bucket", model=TINY, le="1.0") == 0
    assert d("ray_embedding_request_shards_bucket", model=TINY, le="2.0") == 1
    assert d("ray_embedding_request_first_shard_seconds_count", model=MINILM) == len(calls)
    # The model replicas: one batch per call (sequential, one shard each), every stage timed once per shard.
    m = {"model": MINILM, "backend": "openvino"}
    assert d("ray_embedding_batch_size_count", **m) == len(calls)
    assert d("ray_embedding_batch_size_bucket", le="1.0", **m) == 1  # the one-sentence call
    assert d("ray_embedding_batch_size_bucket", le="4.0", **m) == 2
    assert d("ray_embedding_batch_size_bucket", le="32.0", **m) == len(calls)
    assert d("ray_embedding_sequences_forwarded_total", **m) == n_inputs
    assert d("ray_embedding_batch_padded_tokens_count", **m) == len(calls)
    assert d("ray_embedding_token_slots_total", **m) == padded
    assert d("ray_embedding_padding_tokens_total", **m) == padded - n_tokens
    for stage in ("tokenize", "queue", "forward"):
        assert d(f"ray_embedding_{stage}_seconds_count", **m) == len(calls), stage
        assert d("ray_embedding_stage_seconds_total", stage=stage, **m) > 0, stage
    # Every model replica reports its queue; nothing waits now.
    depths = [s for s in d.after if s.name == "ray_embedding_queue_depth" and s.labels.get("model") == MINILM]
    assert depths and all(s.value == 0 for s in depths)


def test_health_and_node_gauges_match_the_service_state(service):
    samples = scrape()
    alive = sum(1 for n in ray.nodes() if n["Alive"])
    assert total("ray_embedding_nodes", samples, state="healthy") == alive
    assert total("ray_embedding_nodes", samples, state="quarantined") == 0
    serving = {s.labels["service"]: s.value for s in samples if s.name == "ray_embedding_health_serving"}
    assert serving == {"(overall)": 1, "embedding_service.v1.EmbedService": 1, MINILM: 1, TINY: 1, REFUSING: 0,
                       RERANKER: 1, SPLADE: 1, CLASSIFIER: 1}
    # The session's Ray runs without token authentication (tests/conftest.py), and the router says so; its proxy
    # checks keys itself. (The run command's Ray runs with it: test_run_command.py reads 1 there.)
    assert [s.value for s in samples if s.name == "ray_embedding_ray_token_auth"] == [0.0]
    assert {s.value for s in samples if s.name == "ray_embedding_proxy_keys_checked"} == {1.0}


def test_grpc_reflection_is_off(service):
    """Reflection would list the services to anyone who reaches the port (serve-config.yaml turns it off)."""
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(service.channel)
    with pytest.raises(grpc.RpcError) as caught:
        next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=30))
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


def dashboard_metrics(dashboard: dict) -> set[str]:
    exprs = []

    def walk(node) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                exprs.append(node["expr"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(dashboard)
    return {m for e in exprs for m in re.findall(r"\b((?:ray_)?embedding_[a-z_]+|ray_serve_[a-z_]+)\b", e)}


def test_grafana_dashboard_parses_and_every_metric_it_queries_is_in_a_real_scrape(service):
    dashboard = json.loads(DASHBOARD.read_text())
    titles = " ".join(p.get("title", "") for p in dashboard["panels"]).lower()
    for topic in ("queue", "batch size", "padding", "latency", "error", "node"):
        assert topic in titles, topic
    queried = dashboard_metrics(dashboard)
    assert len(queried) >= 10

    with running_gateway(targets=[service.target]) as base:
        assert post(base, {"model": MINILM, "input": ["short", "a longer sentence: padding in its batch"]}).status_code == 200
        assert post(base, {"model": "no-such-model", "input": ["x"]}).status_code == 404
        gateway = {s.name for s in gateway_samples(base)}
    wait_until(lambda: total("ray_embedding_requests_total", code="NOT_FOUND") > 0, 30, "the failed call reported")
    names = {s.name for s in scrape(prefix="")} | gateway
    missing = sorted(m for m in queried if m not in names)
    assert not missing, missing
