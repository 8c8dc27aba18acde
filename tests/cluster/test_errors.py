"""Bad input gets a precise status and reason through the proxy; the service keeps serving."""

from __future__ import annotations

import grpc
import pytest

from embedding_client.v1 import embedding_pb2 as pb
from embedding_service.wire.reasons import DOMAIN, Reason
from tests.helpers.classifiers import CLASSIFIER
from tests.helpers.models import MINILM, RERANKER, SPLADE, TINY
from tests.helpers.session import MAX_REQUEST_BYTES, REFUSING

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def text(t: str) -> pb.EmbedInput:
    return pb.EmbedInput(text=t)


def ids(*values: int) -> pb.EmbedInput:
    return pb.EmbedInput(token_ids=pb.TokenIds(ids=list(values)))


LONG_TEXT = " ".join(["embedding"] * 400)

BAD_REQUESTS = {
    "no inputs": (pb.EmbedRequest(), INVALID, "NO_INPUTS", {}),
    "empty string": (pb.EmbedRequest(inputs=[text("ok"), text("")]), INVALID, "EMPTY_INPUT", {"index": "1"}),
    "input with no kind": (pb.EmbedRequest(inputs=[text("ok"), pb.EmbedInput()]), INVALID, "INPUT_MISSING", {"index": "1"}),
    "empty token ids": (pb.EmbedRequest(inputs=[ids()]), INVALID, "EMPTY_INPUT", {"index": "0"}),
    "too many inputs": (pb.EmbedRequest(inputs=[text("x")] * 2049), INVALID, "TOO_MANY_INPUTS", {"limit": "2048"}),
    "input over the character limit": (
        pb.EmbedRequest(inputs=[text("x"), text("a" * 100_001)]),
        INVALID,
        "INPUT_TOO_LARGE",
        {"index": "1", "limit": "100000"},
    ),
    "too long with reject": (
        pb.EmbedRequest(inputs=[text("short"), text(LONG_TEXT)], truncation=pb.TRUNCATION_POLICY_REJECT),
        INVALID,
        "INPUT_TOO_LONG",
        {"index": "1", "max_tokens": "256"},
    ),
    "too long for the windows": (  # the tiny model's windows (conftest.TINY_WINDOWS) cover 92 tokens
        pb.EmbedRequest(model=TINY, inputs=[text("short"), text(LONG_TEXT)], truncation=pb.TRUNCATION_POLICY_WINDOWS),
        INVALID,
        "INPUT_TOO_LONG",
        {"index": "1", "tokens": "1202", "max_tokens": "92"},
    ),
    "unknown model": (
        pb.EmbedRequest(model="no-such-model", inputs=[text("x")]),
        grpc.StatusCode.NOT_FOUND,
        "MODEL_NOT_FOUND",
        {"model": "no-such-model"},
    ),
    "unknown model with a 100,000-character name": (  # echoed clipped: gRPC clients refuse trailers over 16 KiB
        pb.EmbedRequest(model="m" * 100_000, inputs=[text("x")]),
        grpc.StatusCode.NOT_FOUND,
        "MODEL_NOT_FOUND",
        {},
    ),
    "dimensions zero": (pb.EmbedRequest(inputs=[text("x")], dimensions=0), INVALID, "INVALID_DIMENSIONS", {}),
    "dimensions negative": (pb.EmbedRequest(inputs=[text("x")], dimensions=-3), INVALID, "INVALID_DIMENSIONS", {}),
    "dimensions above the model's": (
        pb.EmbedRequest(inputs=[text("x")], dimensions=385),
        INVALID,
        "INVALID_DIMENSIONS",
        {"max": "384"},
    ),
    "dimensions above the tiny model's": (
        pb.EmbedRequest(model=TINY, inputs=[text("x")], dimensions=49),
        INVALID,
        "INVALID_DIMENSIONS",
        {"max": "48"},
    ),
    "token id above the vocabulary": (
        pb.EmbedRequest(inputs=[ids(7592, 2088), ids(7592, 30522)]),
        INVALID,
        "TOKEN_ID_OUT_OF_RANGE",
        {"index": "1", "token_id": "30522", "vocab_size": "30522"},
    ),
    "negative token id": (pb.EmbedRequest(inputs=[ids(-1)]), INVALID, "TOKEN_ID_OUT_OF_RANGE", {"index": "0"}),
    "unknown prompt": (
        pb.EmbedRequest(model=TINY, inputs=[text("x")], prompt_name="nope"),
        INVALID,
        "UNKNOWN_PROMPT",
        {"prompt_name": "nope"},
    ),
    "unknown truncation policy": (pb.EmbedRequest(inputs=[text("x")], truncation=42), INVALID, "INVALID_TRUNCATION", {}),
    "unknown encoding": (pb.EmbedRequest(inputs=[text("x")], encoding=9), INVALID, "INVALID_ENCODING", {}),
    "message over the size bound": (
        pb.EmbedRequest(inputs=[text("b" * 90_000)] * 60),  # about 5.4 MB, bound is 4 MiB
        INVALID,
        "REQUEST_TOO_LARGE",
        {"limit": str(MAX_REQUEST_BYTES)},
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS), ids=list(BAD_REQUESTS))
def test_bad_embed_request_gets_precise_status_and_reason(service, case):
    request, code, reason, metadata = BAD_REQUESTS[case]
    with pytest.raises(grpc.RpcError) as caught:
        service.stub.Embed(request, timeout=60)
    err = caught.value
    assert err.code() == code, err.details()
    assert "Traceback" not in err.details()
    info = error_info(err)
    assert info.reason == reason
    assert info.domain == DOMAIN
    for key, value in metadata.items():
        assert info.metadata[key] == value


def test_get_unknown_model_is_not_found(service):
    with pytest.raises(grpc.RpcError) as caught:
        service.stub.GetModel(pb.GetModelRequest(name="missing"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(caught.value).reason == "MODEL_NOT_FOUND"


@pytest.mark.parametrize(
    "request_, code, reason",
    [
        (pb.EmbedStreamRequest(), INVALID, "NO_INPUTS"),
        (pb.EmbedStreamRequest(model="missing", inputs=[text("x")]), grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND"),
        (pb.EmbedStreamRequest(inputs=[text("x"), text(LONG_TEXT)], truncation=3), INVALID, "INPUT_TOO_LONG"),
    ],
)
def test_bad_stream_request_gets_precise_status(service, request_, code, reason):
    # Ray's proxy ends a stream with the code and message alone (no trailers):
    # the reason leads the message.
    with pytest.raises(grpc.RpcError) as caught:
        list(service.stub.EmbedStream(request_, timeout=60))
    assert caught.value.code() == code
    assert caught.value.details().startswith(reason + ":")
    assert "Traceback" not in caught.value.details()


def test_service_keeps_serving_after_bad_input(service):
    for request, *_ in BAD_REQUESTS.values():
        with pytest.raises(grpc.RpcError):
            service.stub.Embed(request, timeout=60)
    ok = service.stub.Embed(pb.EmbedRequest(inputs=[text("still here")]), timeout=60)
    assert len(ok.embeddings) == 1 and len(ok.embeddings[0].values) == 384


EMBED = "/embedding_service.v1.EmbedService/"
HEALTH = "/grpc.health.v1.Health/"
UNARY_METHODS = [EMBED + m for m in ("Embed", "ListModels", "GetModel", "Rerank", "EmbedSparse", "Classify", "Tokenize",
                                     "Detokenize")] + \
    [HEALTH + m for m in ("Check", "List")]
STREAM_METHODS = [EMBED + m for m in ("EmbedStream", "RerankStream", "ClassifyStream", "WatchNodes")] + \
    [HEALTH + "Watch"]
# Never for a request, whatever its bytes: these say "the service broke", not "your request is wrong".
BROKEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAVAILABLE}
VALID = pb.EmbedRequest(inputs=[text("a valid request"), ids(7592, 2088)], dimensions=8).SerializeToString()
MALFORMED = {
    "random bytes": b"\x8a\x13\xff\x00garbage\x99",
    "cut short": VALID[: len(VALID) // 2],
    "flipped tag": b"\xff" + VALID[1:],
    "length past the end": b"\x12\x7f\x0a",
}
# Field 1 with invalid UTF-8: malformed where field 1 is a string (model, name, service); the empty
# request messages keep it as an unknown field, as protobuf must.
BAD_UTF8 = b"\x0a\x02\xc3\x28"
STRING_FIELD_ONE = [EMBED + m for m in ("Embed", "GetModel", "Rerank", "EmbedSparse", "Classify", "Tokenize",
                                        "Detokenize")] + [HEALTH + "Check"]


@pytest.mark.parametrize("body", list(MALFORMED), ids=list(MALFORMED))
def test_malformed_bytes_get_invalid_argument_on_every_method(service, body):
    for method in UNARY_METHODS:
        with pytest.raises(grpc.RpcError) as caught:
            service.channel.unary_unary(method)(MALFORMED[body], timeout=30)
        err = caught.value
        assert err.code() == INVALID, (method, err.code(), err.details())
        assert error_info(err).reason == Reason.MALFORMED_REQUEST.name
        assert "Error" not in err.details() and "<class" not in err.details(), err.details()
    for method in STREAM_METHODS:
        with pytest.raises(grpc.RpcError) as caught:
            list(service.channel.unary_stream(method)(MALFORMED[body], timeout=30))
        assert caught.value.code() == INVALID, (method, caught.value.details())
        assert caught.value.details().startswith("MALFORMED_REQUEST: the request bytes are not a valid ")


def test_invalid_utf8_in_a_string_field_is_malformed_and_in_an_unknown_field_is_kept(service):
    for method in STRING_FIELD_ONE:
        with pytest.raises(grpc.RpcError) as caught:
            service.channel.unary_unary(method)(BAD_UTF8, timeout=30)
        assert caught.value.code() == INVALID and error_info(caught.value).reason == "MALFORMED_REQUEST"
    listed = pb.ListModelsResponse.FromString(service.channel.unary_unary(EMBED + "ListModels")(BAD_UTF8, timeout=30))
    assert {m.name for m in listed.models} == {MINILM, TINY, REFUSING, RERANKER, SPLADE, CLASSIFIER}


# ---- fuzz: what a careless or hostile client sends, through the real proxy ----

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.helpers.grpc_errors import error_info

INT32 = st.integers(-(2**31), 2**31 - 1)
fuzz_input = st.one_of(
    st.builds(lambda t: pb.EmbedInput(text=t), st.text(max_size=40)),
    st.builds(lambda t: pb.EmbedInput(token_ids=pb.TokenIds(ids=t)), st.lists(INT32 | st.integers(0, 40000), max_size=6)),
    st.just(pb.EmbedInput()),
    st.just(pb.EmbedInput(text="x" * 100_001)),
)


def fuzz_request(message_type, inputs):
    def build(model, inputs, dimensions, normalize, truncation, prompt_name, encoding):
        request = message_type(model=model, inputs=inputs, truncation=truncation, prompt_name=prompt_name,
                               encoding=encoding)
        if dimensions is not None:
            request.dimensions = dimensions
        if normalize is not None:
            request.normalize = normalize
        return request

    return st.builds(
        build,
        model=st.sampled_from([MINILM, TINY, "", "nope"]) | st.text(max_size=12),
        inputs=inputs,
        dimensions=st.none() | st.sampled_from([0, 1, 48, 384, 385]) | INT32,
        normalize=st.none() | st.booleans(),
        truncation=st.sampled_from([0, 1, 2, 3]) | INT32,
        prompt_name=st.sampled_from(["", "query", "passage"]) | st.text(max_size=8),
        encoding=st.sampled_from([0, 1, 2]) | INT32,
    )


# Huge counts only where a cheap check refuses them (Embed's input limit); streams take up to 100,000.
embed_requests = fuzz_request(pb.EmbedRequest, st.lists(fuzz_input, max_size=5)
                              | st.integers(2049, 4000).map(lambda n: [text("x")] * n))
stream_requests = fuzz_request(pb.EmbedStreamRequest, st.lists(fuzz_input, max_size=5))


def expect_answered(err: grpc.RpcError, stream: bool = False) -> None:
    assert err.code() not in BROKEN, (err.code(), err.details())
    assert "Traceback" not in (err.details() or "")
    if stream:
        assert err.details().split(":", 1)[0] in Reason.__members__, err.details()
    else:
        assert error_info(err).reason in Reason.__members__


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=embed_requests)
def test_fuzzed_embed_requests_get_an_answer_or_a_precise_error(service, request):
    try:
        response = service.stub.Embed(request, timeout=60)
    except grpc.RpcError as err:
        expect_answered(err)
        return
    assert [e.index for e in response.embeddings] == list(range(len(request.inputs)))
    assert response.dimensions == (request.dimensions if request.HasField("dimensions") else
                                   (48 if response.model == TINY else 384))


# The bounds Classify, Tokenize and Detokenize brought: labels (top_k), pairs, token ids to decode.
classify_requests = st.builds(
    lambda model, inputs, top_k, raw, truncation: pb.ClassifyRequest(
        model=model, inputs=inputs, raw_scores=raw, truncation=truncation,
        **({} if top_k is None else {"top_k": top_k})),
    model=st.sampled_from([CLASSIFIER, "", MINILM, "nope"]),
    inputs=st.lists(st.builds(lambda t, p: pb.ClassifyInput(text=t, text_pair=p), st.text(max_size=30),
                              st.text(max_size=30) | st.just("y" * 100_001)), max_size=4),
    top_k=st.none() | st.sampled_from([0, 1, 5, 6, 100, 101]) | INT32,
    raw=st.booleans(),
    truncation=st.sampled_from([0, 1, 2, 3, 4]) | INT32,
)
tokenize_requests = st.builds(
    lambda model, inputs, special, tokens, offsets: pb.TokenizeRequest(
        model=model, inputs=inputs, return_tokens=tokens, return_offsets=offsets,
        **({} if special is None else {"add_special_tokens": special})),
    model=st.sampled_from([MINILM, CLASSIFIER, RERANKER, "", "nope"]),
    inputs=st.lists(st.text(max_size=40) | st.just("z" * 100_001), max_size=4),
    special=st.none() | st.booleans(), tokens=st.booleans(), offsets=st.booleans(),
)
detokenize_requests = st.builds(
    lambda model, inputs, skip: pb.DetokenizeRequest(model=model, inputs=[pb.TokenIds(ids=i) for i in inputs],
                                                     skip_special_tokens=skip),
    model=st.sampled_from([MINILM, TINY, "", "nope"]),
    inputs=st.lists(st.lists(INT32 | st.integers(0, 30521), max_size=8), max_size=4)
    | st.integers(65_537, 70_000).map(lambda n: [[101] * n]),
    skip=st.booleans(),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=classify_requests)
def test_fuzzed_classify_requests_get_an_answer_or_a_precise_error(service, request):
    try:
        response = service.stub.Classify(request, timeout=60)
    except grpc.RpcError as err:
        expect_answered(err)
        return
    assert [c.index for c in response.classifications] == list(range(len(request.inputs)))
    assert all(len(c.labels) == (request.top_k if request.HasField("top_k") else 5)
               for c in response.classifications)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tokenize=tokenize_requests, detokenize=detokenize_requests)
def test_fuzzed_tokenize_and_detokenize_requests_get_an_answer_or_a_precise_error(service, tokenize, detokenize):
    try:
        response = service.stub.Tokenize(tokenize, timeout=60)
        assert [i.index for i in response.inputs] == list(range(len(tokenize.inputs)))
    except grpc.RpcError as err:
        expect_answered(err)
    try:
        decoded = service.stub.Detokenize(detokenize, timeout=60)
        assert len(decoded.texts) == len(detokenize.inputs)
    except grpc.RpcError as err:
        expect_answered(err)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=stream_requests)
def test_fuzzed_stream_requests_get_an_answer_or_a_precise_error(service, request):
    try:
        chunks = list(service.stub.EmbedStream(request, timeout=60))
    except grpc.RpcError as err:
        expect_answered(err, stream=True)
        return
    assert sorted(e.index for c in chunks for e in c.embeddings) == list(range(len(request.inputs)))


def mutated(data: st.DataObject) -> bytes:
    """A valid message with a few bytes flipped, cut, or spliced."""
    raw = bytearray(data.draw(embed_requests.filter(lambda r: len(r.inputs) < 10)).SerializeToString() or b"\x00")
    for _ in range(data.draw(st.integers(1, 3))):
        kind = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        at = data.draw(st.integers(0, max(0, len(raw) - 1)))
        if kind == "flip" and raw:
            raw[at] ^= data.draw(st.integers(1, 255))
        elif kind == "cut":
            del raw[at:]
        else:
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=4))
    return bytes(raw)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_bytes_to_every_method_never_break_the_service(service, data):
    body = data.draw(st.binary(max_size=64)) if data.draw(st.booleans()) else mutated(data)
    for method in UNARY_METHODS:
        try:
            service.channel.unary_unary(method)(body, timeout=30)
        except grpc.RpcError as err:
            expect_answered(err)
    for method in STREAM_METHODS:
        call = service.channel.unary_stream(method)(body, timeout=30)
        try:
            next(call)  # a valid WatchNodes or Watch never ends: its first message is enough
        except StopIteration:
            pass
        except grpc.RpcError as err:
            expect_answered(err, stream=True)
        finally:
            call.cancel()


def test_the_service_answers_correctly_after_the_fuzz(service, reference_models):
    import numpy as np

    texts = ["after the fuzz", "still correct"]
    response = service.stub.Embed(pb.EmbedRequest(inputs=[text(t) for t in texts]), timeout=60)
    got = np.array([list(e.values) for e in response.embeddings], dtype=np.float32)
    assert np.abs(got - reference_models[MINILM].encode(texts, normalize_embeddings=True)).max() < 1e-5
