"""The classification kind and Tokenize/Detokenize through Serve's real gRPC proxy: scores equal to transformers'
own text-classification pipeline, a stream's every index once, the tokenizers of the served models, their bounds
and errors, and the metrics and health a kind gets with no code of its own."""

from __future__ import annotations

import secrets

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from embedding_client.v1 import embedding_pb2 as pb
from embedding_service.wire.reasons import Reason
from tests.helpers.classifiers import CLASSIFIER, CLASSIFIER_LABELS, pipeline_scores
from tests.helpers.grpc_errors import error_info
from tests.helpers.models import MINILM, RERANKER
from tests.helpers.observe import settled, total, wait_until
from tests.helpers.texts import make_texts

INVALID, FAILED = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION


def _expect(code: grpc.StatusCode, reason: Reason, call, request) -> dict:
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=60)
    assert caught.value.code() == code, (caught.value.code(), caught.value.details())
    info = error_info(caught.value)
    assert info.reason == reason.name, (info.reason, caught.value.details())
    return dict(info.metadata)


def _inputs(items) -> list[pb.ClassifyInput]:
    return [pb.ClassifyInput(text=x[0], text_pair=x[1]) if isinstance(x, tuple) else pb.ClassifyInput(text=x)
            for x in items]


def test_classify_equals_the_pipeline_with_labels_ranked_top_k_and_raw_scores(service, text_classifier):
    items = [*make_texts(40, seed=31, max_words=12), ("a man plays guitar", "someone makes music")]  # 2 shards
    reply = service.stub.Classify(pb.ClassifyRequest(model=CLASSIFIER, inputs=_inputs(items)), timeout=60)
    expected = pipeline_scores(text_classifier, items)
    assert reply.model == CLASSIFIER and [c.index for c in reply.classifications] == list(range(len(items)))
    for c in reply.classifications:
        assert [s.label for s in c.labels] == [CLASSIFIER_LABELS[s.label_id] for s in c.labels]
        got = {s.label_id: s.score for s in c.labels}
        assert len(got) == len(CLASSIFIER_LABELS)
        assert max(abs(got[k] - expected[c.index, k]) for k in got) < 1e-5
        assert [s.score for s in c.labels] == sorted(got.values(), reverse=True)
    assert reply.usage.total_tokens == sum(c.tokens for c in reply.classifications) > 0
    top = service.stub.Classify(pb.ClassifyRequest(inputs=_inputs(items[:3]), top_k=2, raw_scores=True),
                                timeout=60)  # no model named: the first classification model
    raw = pipeline_scores(text_classifier, items[:3], raw=True)
    assert top.model == CLASSIFIER
    for c in top.classifications:
        assert [s.label_id for s in c.labels] == list(np.argsort(-raw[c.index], kind="stable")[:2])
        assert max(abs(s.score - raw[c.index, s.label_id]) for s in c.labels) < 1e-5


def test_classify_stream_returns_every_index_once_with_the_pipelines_scores(service, text_classifier):
    items = make_texts(150, seed=37, max_words=10)
    chunks = list(service.stub.ClassifyStream(pb.ClassifyStreamRequest(model=CLASSIFIER, inputs=_inputs(items),
                                                                       top_k=1), timeout=120))
    got = {c.index: c.labels[0] for chunk in chunks for c in chunk.classifications}
    assert len(chunks) > 1 and sorted(got) == list(range(len(items)))
    assert sum(len(chunk.classifications) for chunk in chunks) == len(items)
    expected = pipeline_scores(text_classifier, items)
    for index, best in got.items():
        assert best.label_id == int(np.argmax(expected[index])) and abs(best.score - expected[index].max()) < 1e-5


def test_classify_bounds_and_kinds(service):
    stub = service.stub
    for top_k in (0, len(CLASSIFIER_LABELS) + 1, -3):
        metadata = _expect(INVALID, Reason.INVALID_TOP, stub.Classify,
                           pb.ClassifyRequest(model=CLASSIFIER, inputs=_inputs(["a"]), top_k=top_k))
        assert metadata["field"] == "top_k"
    _expect(INVALID, Reason.NO_INPUTS, stub.Classify, pb.ClassifyRequest(model=CLASSIFIER))
    _expect(INVALID, Reason.EMPTY_INPUT, stub.Classify, pb.ClassifyRequest(model=CLASSIFIER, inputs=_inputs([""])))
    _expect(INVALID, Reason.INVALID_TRUNCATION, stub.Classify, pb.ClassifyRequest(
        model=CLASSIFIER, inputs=_inputs(["a"]), truncation=pb.TRUNCATION_POLICY_WINDOWS))
    metadata = _expect(INVALID, Reason.INPUT_TOO_LONG, stub.Classify, pb.ClassifyRequest(
        model=CLASSIFIER, inputs=_inputs(["short", "word " * 100]), truncation=pb.TRUNCATION_POLICY_REJECT))
    assert metadata["index"] == "1"
    metadata = _expect(FAILED, Reason.WRONG_MODEL_KIND, stub.Classify, pb.ClassifyRequest(model=MINILM,
                                                                                          inputs=_inputs(["a"])))
    assert metadata["kind"] == "embedding" and metadata["needed"] == "classify"
    _expect(FAILED, Reason.WRONG_MODEL_KIND, stub.Embed, pb.EmbedRequest(model=CLASSIFIER,
                                                                         inputs=[pb.EmbedInput(text="a")]))
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.ClassifyStream(pb.ClassifyStreamRequest(model=RERANKER, inputs=_inputs(["a"])), timeout=60))
    # Serve's proxy ends a failed stream with its code and message alone: the message starts with the reason.
    assert caught.value.code() == FAILED and caught.value.details().startswith(Reason.WRONG_MODEL_KIND.name)


def test_the_classifier_is_listed_with_its_labels_and_the_limits_are_published(service):
    listed = service.stub.ListModels(pb.ListModelsRequest(), timeout=60)
    model = next(m for m in listed.models if m.name == CLASSIFIER)
    assert model.kind == pb.MODEL_KIND_CLASSIFY and tuple(model.labels) == CLASSIFIER_LABELS
    assert model.activation == "sigmoid" and model.dimension == len(CLASSIFIER_LABELS)
    assert listed.limits.max_labels_per_result == 100 and listed.limits.max_token_ids_per_detokenize == 65_536
    got = service.stub.GetModel(pb.GetModelRequest(name=CLASSIFIER), timeout=60).model
    assert tuple(got.labels) == CLASSIFIER_LABELS and not got.HasField("quantization")


def test_tokenize_and_detokenize_equal_the_models_own_tokenizer(service, minilm_tokenizer):
    texts = ["Hello, world! Isn't it fine?", "naïve café, 日本 ok.", "word " * 300]
    reply = service.stub.Tokenize(pb.TokenizeRequest(model=MINILM, inputs=texts, return_tokens=True,
                                                     return_offsets=True), timeout=60)
    assert reply.model == MINILM and reply.max_sequence_length == 256
    for text, item in zip(texts, reply.inputs):
        own = minilm_tokenizer(text, return_offsets_mapping=True)
        assert list(item.ids) == own["input_ids"]  # untruncated: the long text has 302 ids
        assert list(item.tokens) == minilm_tokenizer.convert_ids_to_tokens(own["input_ids"])
        assert list(zip(item.starts, item.ends)) == [tuple(o) for o in own["offset_mapping"]]
    assert reply.usage.total_tokens == sum(len(i.ids) for i in reply.inputs)
    bare = service.stub.Tokenize(pb.TokenizeRequest(inputs=texts[:1], add_special_tokens=False), timeout=60)
    assert bare.model == MINILM and list(bare.inputs[0].ids) == minilm_tokenizer(texts[0],
                                                                                 add_special_tokens=False)["input_ids"]
    assert not bare.inputs[0].tokens and not bare.inputs[0].starts
    ids = [list(i.ids) for i in reply.inputs]
    for skip in (False, True):
        decoded = service.stub.Detokenize(pb.DetokenizeRequest(
            model=MINILM, inputs=[pb.TokenIds(ids=i) for i in ids], skip_special_tokens=skip), timeout=60)
        assert list(decoded.texts) == [minilm_tokenizer.decode(i, skip_special_tokens=skip) for i in ids]
    classifier = service.stub.Tokenize(pb.TokenizeRequest(model=CLASSIFIER, inputs=texts[:1]), timeout=60)
    assert list(classifier.inputs[0].ids) == minilm_tokenizer(texts[0])["input_ids"]  # any kind's tokenizer


def test_tokenize_and_detokenize_bounds(service):
    stub = service.stub
    _expect(INVALID, Reason.NO_INPUTS, stub.Tokenize, pb.TokenizeRequest(model=MINILM))
    _expect(INVALID, Reason.EMPTY_INPUT, stub.Tokenize, pb.TokenizeRequest(model=MINILM, inputs=["a", ""]))
    _expect(grpc.StatusCode.NOT_FOUND, Reason.MODEL_NOT_FOUND, stub.Tokenize,
            pb.TokenizeRequest(model="nope", inputs=["a"]))
    metadata = _expect(INVALID, Reason.TOKEN_ID_OUT_OF_RANGE, stub.Detokenize, pb.DetokenizeRequest(
        model=MINILM, inputs=[pb.TokenIds(ids=[101]), pb.TokenIds(ids=[5, -1])]))
    assert metadata["index"] == "1" and metadata["token_id"] == "-1"
    metadata = _expect(INVALID, Reason.INPUT_TOO_LARGE, stub.Detokenize, pb.DetokenizeRequest(
        model=MINILM, inputs=[pb.TokenIds(ids=[101] * 40_000), pb.TokenIds(ids=[101] * 30_000)]))
    assert metadata["limit"] == "65536"


def test_metrics_spans_health_and_the_recycler_cover_the_classifier_with_no_code_of_their_own(service):
    trace_id = secrets.token_hex(16)
    service.stub.Classify(pb.ClassifyRequest(model=CLASSIFIER, inputs=_inputs(["metrics", "and spans"])), timeout=60,
                          metadata=[("traceparent", f"00-{trace_id}-{secrets.token_hex(8)}-01")])

    def named(name: str) -> list:
        return [s for s in service.traces.spans(trace_id) if s.name == name]

    wait_until(lambda: len(named("forward")) == 1 and len(named("EmbedService/Classify")) == 1, 30,
               "the Classify call's spans exported")
    (model,) = named("model.classify")
    assert model.component == "model" and model.attribute("embedding.kind") == "classify"
    assert model.attribute("embedding.inputs") == 2 and named("shard")[0].span_id == model.parent_id
    assert {s.parent_id for s in named("tokenize") + named("queue") + named("forward")} == {model.span_id}
    samples = settled("ray_embedding_requests_total", 2.0, method="Classify")
    assert total("ray_embedding_requests_total", samples, method="Classify", model=CLASSIFIER, code="OK") >= 1
    assert total("ray_embedding_sequences_forwarded_total", samples, model=CLASSIFIER, kind="classify") >= 1
    health = health_pb2_grpc.HealthStub(service.channel)
    assert health.Check(health_pb2.HealthCheckRequest(service=CLASSIFIER), timeout=30).status == \
        health_pb2.HealthCheckResponse.SERVING
    watch = service.stub.WatchNodes(pb.WatchNodesRequest(), timeout=30)
    view = next(watch)
    watch.cancel()
    assert any(r.model == CLASSIFIER and not r.refused for node in view.nodes for r in node.replicas)
