"""Traces: one gateway request is one trace across the gateway, the router, its shard calls and the model replicas'
stages. The session's service exports over OTLP to a collector in this process (benchmarks/otlp_sink.py); the
gateway here keeps its spans in memory."""

from __future__ import annotations

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from embedding_service.observability.tracing import Tracer
from tests.helpers.gateways import post, running_gateway
from tests.helpers.models import MINILM
from tests.helpers.observe import wait_until

INPUTS = 40  # two shards of 32 and 8


def test_one_gateway_request_is_one_trace_across_gateway_router_shards_and_model(service):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with running_gateway(targets=[service.target], tracer=Tracer(provider, "gateway")) as base:
        texts = [f"sentence number {i} " + "word " * (i % 9) for i in range(INPUTS)]
        assert post(base, {"model": MINILM, "input": texts}).status_code == 200

    mine = exporter.get_finished_spans()
    (server,) = [s for s in mine if s.kind == SpanKind.SERVER]
    (client,) = [s for s in mine if s.kind == SpanKind.CLIENT]
    assert server.parent is None and server.name == "POST /v1/embeddings"
    assert client.parent.span_id == server.context.span_id and client.name == "EmbedService/Embed"
    assert server.attributes["http.response.status_code"] == 200
    trace_id = format(server.context.trace_id, "032x")

    def named(name: str) -> list:
        return [s for s in service.traces.spans(trace_id) if s.name == name]

    wait_until(lambda: len(named("forward")) == 2 and len(named("EmbedService/Embed")) == 1, 30,
               "the service's spans of this trace exported")
    spans = service.traces.spans(trace_id)
    ids = {s.span_id: s for s in spans}
    assert len(ids) == len(spans)

    (router,) = named("EmbedService/Embed")
    assert router.parent_id == format(client.context.span_id, "016x")  # joined through gRPC metadata
    assert router.component == "router" and router.kind == SpanKind.SERVER.value + 1  # OTLP numbers from 1
    assert router.attribute("embedding.model") == MINILM
    assert router.attribute("embedding.inputs") == INPUTS
    assert router.attribute("embedding.tokens") > INPUTS
    assert router.attribute("rpc.grpc.status_code") == "OK"

    shards = named("shard")
    assert len(shards) == 2 and all(s.parent_id == router.span_id for s in shards)
    assert sorted(s.attribute("embedding.inputs") for s in shards) == [8, 32]
    models = named("model.embed")  # joined through the handle call's ShardRequest
    assert len(models) == 2 and {m.parent_id for m in models} == {s.span_id for s in shards}
    assert all(m.component == "model" and m.attribute("embedding.backend") == "openvino" for m in models)
    for stage in ("tokenize", "queue", "forward"):
        stage_spans = named(stage)
        assert len(stage_spans) == 2 and {s.parent_id for s in stage_spans} == {m.span_id for m in models}, stage
    assert all(s.attribute("embedding.batch_sequences") >= 8 for s in named("forward"))
    # Nothing else in the trace, and nothing parented outside it.
    assert len(spans) == 1 + 2 + 2 + 6
    assert all(s.parent_id in ids for s in spans if s is not router)


def test_a_call_with_a_garbage_traceparent_is_served_and_starts_a_trace_of_its_own(service):
    from embedding_client.v1 import embedding_pb2 as pb

    def roots() -> int:
        return sum(1 for s in service.traces.spans() if s.name == "EmbedService/Embed" and not s.parent_id
                   and s.attribute("embedding.inputs") == 3 and s.attribute("embedding.model") == MINILM)

    before = roots()
    metadata = [("traceparent", "00-not-a-trace-id-at-all-01"), ("tracestate", "!!,==,x")]
    request = pb.EmbedRequest(model=MINILM, inputs=[pb.EmbedInput(text=t) for t in ("garbage", "parent", "here")])
    response = service.stub.Embed(request, timeout=30, metadata=metadata)
    assert len(response.embeddings) == 3
    wait_until(lambda: roots() == before + 1, 30, "a new root router span")
