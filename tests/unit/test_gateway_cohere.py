"""Cohere's embed API in the gateway (/v1/embed, /v2/embed): input_type as the model's prompt, the service's compact
encodings as Cohere's lists of ints, the request's bounds and errors, the cache of the models' prompts; then the
official cohere SDK against the gateway in front of a scripted gRPC peer that encodes as the service does
(sentence-transformers' quantize_embeddings)."""

from __future__ import annotations

import asyncio
import base64
import warnings
import zlib
from contextlib import contextmanager

import cohere
import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from embedding_client.v1 import embedding_pb2 as pb
from embedding_client.v1 import embedding_pb2_grpc
from embedding_service.wire.reasons import Reason, ServiceError
from gateway import cohere_vectors, errors
from gateway.cohere_embed import render
from gateway.cohere_prompts import prompt_name
from gateway.cohere_schema import CohereEmbedRequest
from gateway.embeddings import parse
from gateway.model_prompts import MISS_RELIST_S, ModelPrompts
from gateway.settings import GatewaySettings
from tests.helpers.gateways import running_gateway, scripted_grpc_peer

KEY = "cohere-key"
DIM = 12  # not a multiple of 8: the last packed byte has spare bits
PLAIN, PROMPTED = "plain", "prompted"  # no prompts; query and passage, as the cluster's tiny-bert
# As sentence-transformers lists them: an empty "query" and "document" for a model without its own.
MODELS = {PLAIN: {"query": "", "document": ""}, PROMPTED: {"query": "query: ", "document": "", "passage": "passage: "}}
MAX_CHARS = 40  # the peer's "maximum sequence length", in characters
RANGES = np.vstack((np.full(DIM, -0.6), np.full(DIM, 0.6))).astype(np.float32)
PRECISIONS = {pb.VECTOR_ENCODING_INT8: "int8", pb.VECTOR_ENCODING_UINT8: "uint8",
              pb.VECTOR_ENCODING_BINARY: "binary", pb.VECTOR_ENCODING_UBINARY: "ubinary"}
TEXTS = ["the cat sat", "a dog barked twice", "rain"]


# --- input_type -> the model's prompt ---

# sentence-transformers gives every model an empty "query" and "document" prompt unless it has its own.
ST_DEFAULTS = {"query": "", "document": ""}


@pytest.mark.parametrize("prompts, input_type, expected", [
    ({"query": "q: ", "passage": "p: "}, "search_query", "query"),
    ({"query": "q: ", "passage": "p: "}, "search_document", "passage"),
    ({"query": "q: ", "document": "d: ", "passage": "p: "}, "search_document", "document"),  # document first
    ({**ST_DEFAULTS, "query": "q: ", "passage": "p: "}, "search_document", "passage"),  # tiny-bert: text first
    ({**ST_DEFAULTS, "query": "q: "}, "search_document", ""),  # BGE: an empty document prompt alone, as it is
    ({"query": "q: ", "classification": "c: ", "clustering": "k: "}, "classification", "classification"),
    ({"query": "q: ", "classification": "c: ", "clustering": "k: "}, "clustering", "clustering"),
    ({}, "search_query", ""),  # a model with no prompts: the texts as they are, whatever the input_type
    ({}, "classification", ""),
    (ST_DEFAULTS, "classification", ""),  # all-MiniLM-L6-v2: only empty ones, so none
    ({"query": "q: "}, None, ""),  # no input_type: as they are
])
def test_each_input_type_takes_the_prompt_of_its_name(prompts, input_type, expected):
    assert prompt_name("m", input_type, prompts, {}) == expected


def test_a_model_with_prompts_but_none_for_the_input_type_is_refused_naming_its_prompts():
    with pytest.raises(errors.OpenAIError) as caught:
        prompt_name("tiny", "classification", {**ST_DEFAULTS, "query": "q: ", "passage": "p: "}, {})
    error = caught.value
    assert (error.status, error.param, error.code) == (400, "input_type", "no_prompt_for_input_type")
    assert "'classification'" in error.message and "prompts are 'passage', 'query'" in error.message
    with pytest.raises(errors.OpenAIError, match="'document' or 'passage'"):
        prompt_name("e5", "search_document", {"query": "q: "}, {})


def test_the_operators_mapping_per_model_comes_first():
    configured = {"bge": {"search_document": ""}, "e5": {"search_query": "q", "clustering": "nope"}}
    e5 = {"q": "q: ", "query": "query: "}
    assert prompt_name("bge", "search_document", {"query": "q: "}, configured) == ""  # as it is
    assert prompt_name("bge", "search_query", {"query": "q: "}, configured) == "query"  # the rest: defaults
    assert prompt_name("e5", "search_query", e5, configured) == "q"
    with pytest.raises(errors.OpenAIError, match="cohere_input_type_prompts names the prompt 'nope'"):
        prompt_name("e5", "clustering", e5, configured)


def test_the_mapping_is_a_typed_setting():
    from pydantic import ValidationError

    settings = GatewaySettings(cohere_input_type_prompts={"bge": {"search_document": ""}})
    assert settings.cohere_input_type_prompts == {"bge": {"search_document": ""}}
    with pytest.raises(ValidationError):
        GatewaySettings(cohere_input_type_prompts={"bge": {"search_documents": ""}})
    assert GatewaySettings().max_cohere_texts == 96  # Cohere's own


# --- the service's encodings as Cohere's lists ---

def service_bytes(vectors: np.ndarray, encoding: int) -> list[bytes]:
    """Each vector as the service writes it in `encoding` (model/quantization.py: quantize_embeddings)."""
    if encoding == pb.VECTOR_ENCODING_FLOAT32_LE:
        return [v.astype("<f4").tobytes() for v in vectors]
    from sentence_transformers.util.quantization import quantize_embeddings

    precision = PRECISIONS[encoding]
    ranges = RANGES[:, : vectors.shape[1]] if precision in ("int8", "uint8") else None
    return [row.tobytes() for row in quantize_embeddings(vectors, precision=precision, ranges=ranges)]


def reply_of(vectors: np.ndarray, encoding: int, tokens: int = 7) -> pb.EmbedResponse:
    field = "float32_le" if encoding == pb.VECTOR_ENCODING_FLOAT32_LE else "packed"
    embeddings = [pb.Embedding(index=i, **{field: raw}) for i, raw in enumerate(service_bytes(vectors, encoding))]
    return pb.EmbedResponse(model="m", embeddings=embeddings, dimensions=vectors.shape[1],
                            usage=pb.Usage(prompt_tokens=tokens, total_tokens=tokens))


def test_float_and_base64_share_one_call_and_each_compact_type_has_its_own():
    assert cohere_vectors.encodings(["base64", "float", "int8"]) == [pb.VECTOR_ENCODING_FLOAT32_LE,
                                                                    pb.VECTOR_ENCODING_INT8]
    assert len(cohere_vectors.encodings(cohere_vectors.EMBEDDING_TYPES)) == 5


def test_packed_bytes_unpack_to_cohere_ints_and_binary_is_ubinary_less_128():
    rng = np.random.default_rng(5)
    floats = rng.uniform(-0.5, 0.5, (4, DIM)).astype(np.float32)
    replies = {e: reply_of(floats, e) for e in (pb.VECTOR_ENCODING_FLOAT32_LE, *PRECISIONS)}
    got = cohere_vectors.by_type(replies, list(cohere_vectors.EMBEDDING_TYPES))
    assert np.array_equal(np.array(got["float"], dtype=np.float32), floats)  # every float exactly
    assert [np.frombuffer(base64.b64decode(b), "<f4").tolist() for b in got["base64"]] == got["float"]
    int8, uint8 = np.array(got["int8"]), np.array(got["uint8"])
    assert int8.min() >= -128 and int8.max() <= 127 and uint8.min() >= 0 and uint8.max() <= 255
    assert np.array_equal(uint8 - 128, int8)  # the same step, signed and unsigned
    binary, ubinary = np.array(got["binary"]), np.array(got["ubinary"])
    assert binary.shape == ubinary.shape == (4, 2)  # ceil(12 / 8) bytes
    assert binary.min() >= -128 and binary.max() <= 127 and ubinary.min() >= 0 and ubinary.max() <= 255
    assert np.array_equal(binary, ubinary - 128)
    bits = np.unpackbits(ubinary.astype(np.uint8), axis=1)
    assert np.array_equal(bits[:, :DIM], floats > 0) and not bits[:, DIM:].any()  # first dimension highest
    assert np.array_equal(np.unpackbits((binary + 128).astype(np.uint8), axis=1), bits)


def test_the_reply_is_cohere_shaped_and_v1_without_types_a_plain_list():
    floats = np.eye(3, DIM, dtype=np.float32)
    replies = {pb.VECTOR_ENCODING_FLOAT32_LE: reply_of(floats, pb.VECTOR_ENCODING_FLOAT32_LE, tokens=11)}
    v2 = render(TEXTS, None, replies, "2")
    assert v2["response_type"] == "embeddings_by_type" and set(v2["embeddings"]) == {"float"}
    assert v2["texts"] == TEXTS and v2["meta"] == {"api_version": {"version": "2"},
                                                   "billed_units": {"input_tokens": 11}}
    v1 = render(TEXTS, None, replies, "1")
    assert v1["response_type"] == "embeddings_floats" and v1["embeddings"] == floats.tolist()
    assert render(TEXTS, ["float"], replies, "1")["response_type"] == "embeddings_by_type"
    assert v1["id"] != v2["id"]


# --- the request: bounded, checked, first problem alone ---

def parsed(body: dict, **settings) -> CohereEmbedRequest:
    import orjson

    return parse(orjson.dumps(body), GatewaySettings(**settings), CohereEmbedRequest)


def refusal(body: dict, **settings) -> tuple[str, str | None]:
    with pytest.raises(errors.OpenAIError) as caught:
        parsed(body, **settings)
    assert caught.value.status == 400
    return caught.value.message, caught.value.param


def test_a_valid_request_and_its_defaults():
    body = parsed({"texts": ["a"], "model": "m", "embedding_types": ["int8", "float", "int8"], "priority": 3})
    assert body.embedding_types == ["int8", "float"] and body.truncate is None and body.input_type is None
    assert parsed({"texts": ["a"], "input_type": "search_query", "truncate": "NONE"}).truncate == "NONE"


@pytest.mark.parametrize("body, param, says", [
    ({"texts": ["x"] * 97}, "texts", "97 inputs; at most 96"),
    ({"texts": "x"}, "texts", "expected an array of strings"),
    ({"texts": ["x", 3]}, "texts", "texts[1]: expected a string"),
    ({}, "texts", "Field required"),
    ({"texts": ["x"], "input_type": "search_queries"}, "input_type", "expected one of search_query"),
    ({"texts": ["x"], "input_type": "image"}, "input_type", "'image' is not served"),
    ({"texts": ["x"], "embedding_types": ["float", "int4"]}, "embedding_types", "embedding_types[1]: expected one"),
    ({"texts": ["x"], "embedding_types": []}, "embedding_types", "one or more"),
    ({"texts": ["x"], "truncate": "MIDDLE"}, "truncate", None),
    ({"texts": ["x"], "images": ["data:image/png;base64,AA=="]}, "images", "images are not served"),
    ({"texts": ["x"], "inputs": [{"content": []}]}, "inputs", "inputs are not served"),
    ({"texts": ["x"], "max_tokens": 8}, "max_tokens", "max_tokens is not served"),
    ({"texts": ["x"], "output_dimension": "64"}, "output_dimension", None),
    ({"texts": ["x"], "output_dimension": 0}, "output_dimension", "expected a positive integer"),
    ({"texts": ["x"], "output_dimension": 2**31}, "output_dimension", "expected a positive integer"),
    ({"texts": ["x"], "relevant_spans": True}, None, "Extra inputs are not permitted"),
])
def test_each_wrong_field_is_a_400_naming_it(body, param, says):
    message, got_param = refusal(body)
    assert got_param == param, message
    if says is not None:
        assert says in message


def test_texts_are_bounded_by_the_setting_and_by_max_inputs():
    assert "3 inputs; at most 2" in refusal({"texts": ["x"] * 3}, max_cohere_texts=2)[0]
    assert "3 inputs; at most 2" in refusal({"texts": ["x"] * 3}, max_inputs=2, coalesce_max_inputs=2)[0]


# --- the models' prompts, kept ---

def listing(**models: dict[str, str]) -> pb.ListModelsResponse:
    return pb.ListModelsResponse(models=[pb.Model(name=n, prompts=p) for n, p in models.items()],
                                 default_model=next(iter(models)))


def test_one_listing_serves_every_request_until_it_ages_and_an_unknown_name_relists_at_most_once_a_second():
    now = [0.0]
    calls = []
    served = [listing(a={}, b={"query": "q: "})]

    async def list_models():
        calls.append(now[0])
        await asyncio.sleep(0.01)
        return served[0]

    async def scenario():
        cache = ModelPrompts(ttl_s=60, clock=lambda: now[0])
        together = await asyncio.gather(*(cache.of("b", list_models) for _ in range(20)))
        assert together == [("b", {"query": "q: "})] * 20 and len(calls) == 1  # one call for all
        assert await cache.of("", list_models) == ("a", {})  # the service's default
        assert await cache.of("c", list_models) is None and len(calls) == 1  # listed under a second ago
        now[0] += MISS_RELIST_S
        served[0] = listing(a={}, b={"query": "q: "}, c={"passage": "p: "})
        assert await cache.of("c", list_models) == ("c", {"passage": "p: "}) and len(calls) == 2  # found
        assert await cache.of("d", list_models) is None and len(calls) == 2
        now[0] += 60
        await cache.of("a", list_models)
        assert len(calls) == 3  # aged: listed again

    asyncio.run(scenario())


def test_a_failed_listing_reaches_every_waiting_caller_and_the_next_request_tries_again():
    attempts = []

    async def list_models():
        attempts.append(1)
        await asyncio.sleep(0.01)
        if len(attempts) == 1:
            raise RuntimeError("unavailable")
        return listing(a={})

    async def scenario():
        cache = ModelPrompts(ttl_s=60)
        outcomes = await asyncio.gather(*(cache.of("a", list_models) for _ in range(5)), return_exceptions=True)
        assert all(isinstance(o, RuntimeError) for o in outcomes) and len(attempts) == 1
        assert await cache.of("a", list_models) == ("a", {})

    asyncio.run(scenario())


# --- the official SDK against the gateway and a scripted service ---

def vectors_for(texts, prompt: str, dimensions: int | None) -> np.ndarray:
    """The peer's "model": a vector per text seeded by the text with its prompt, cut and normalized as the service
    does."""
    rows = [np.random.default_rng(zlib.crc32((prompt + t).encode())).uniform(-1, 1, DIM) for t in texts]
    vectors = np.array(rows, dtype=np.float32)[:, :dimensions]
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


class CoherePeer(embedding_pb2_grpc.EmbedServiceServicer):
    """ListModels: PLAIN and PROMPTED; Embed: vectors_for the texts in the encoding asked for, refusing what the
    service would; every request kept."""

    def __init__(self) -> None:
        self.requests: list[pb.EmbedRequest] = []
        self.listings = 0

    def ListModels(self, request, context):
        self.listings += 1
        return pb.ListModelsResponse(models=[pb.Model(name=n, prompts=p) for n, p in MODELS.items()],
                                     default_model=PLAIN)

    def Embed(self, request, context):
        self.requests.append(request)
        name = request.model or PLAIN
        if name not in MODELS:
            fail(context, ServiceError(Reason.MODEL_NOT_FOUND, f"model {name!r} is not served", model=name))
        prompt = MODELS[name][request.prompt_name] if request.prompt_name else ""
        texts = [i.text for i in request.inputs]
        if request.truncation == pb.TRUNCATION_POLICY_REJECT:
            for index, text in enumerate(texts):
                if len(prompt + text) > MAX_CHARS:
                    fail(context, ServiceError(Reason.INPUT_TOO_LONG, f"input {index} is too long", index=index))
        dimensions = request.dimensions if request.HasField("dimensions") else None
        reply = reply_of(vectors_for(texts, prompt, dimensions), request.encoding, tokens=5 * len(texts))
        reply.model = name
        return reply


def fail(context, error: ServiceError) -> None:
    context.set_trailing_metadata([("grpc-status-details-bin", error.status_bytes())])
    context.abort(error.code, error.message)


@pytest.fixture(scope="module")
def gateway():
    """(base URL, peer): the gateway, keyed, in front of a CoherePeer."""
    peer = CoherePeer()
    with scripted_grpc_peer(peer) as target, running_gateway(targets=[target], api_keys=[KEY]) as base:
        yield base, peer


@contextmanager
def parsed_without_a_word():
    """Any warning while the SDK parses a reply fails the test; but deprecations: the SDK's own use of pydantic's
    deprecated API (v1's merge_embed_responses: parse_obj, model_fields of an instance), whatever the reply."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def expected(texts, embedding_type: str, prompt: str = "", dimensions: int | None = None) -> list:
    """What Cohere's `embedding_type` of these texts must be: the service's bytes of the peer's vectors, unpacked."""
    encoding = cohere_vectors.encoding(embedding_type)
    return cohere_vectors.vectors(reply_of(vectors_for(texts, prompt, dimensions), encoding).embeddings,
                                  embedding_type)


def test_the_sdks_v2_embed_returns_every_type_as_the_service_encodes_it(gateway):
    base, peer = gateway
    client = cohere.ClientV2(api_key=KEY, base_url=base)
    types = ["float", "int8", "uint8", "binary", "ubinary", "base64"]
    peer.requests.clear()
    with parsed_without_a_word():
        reply = client.embed(model=PROMPTED, texts=TEXTS, input_type="search_query", embedding_types=types,
                             output_dimension=10)
    assert reply.response_type == "embeddings_by_type" and reply.id and reply.texts == TEXTS
    for t in types:
        got = getattr(reply.embeddings, "float_" if t == "float" else t)
        assert got == expected(TEXTS, t, "query: ", 10), t
    assert reply.meta.billed_units.input_tokens == 15 and reply.meta.api_version.version == "2"
    # One call per encoding (float and base64 share one), each with the prompt, cut END and the dimensions.
    assert sorted(r.encoding for r in peer.requests) == sorted(cohere_vectors.encodings(types))
    assert {(r.model, r.prompt_name, r.truncation, r.dimensions) for r in peer.requests} == {
        (PROMPTED, "query", pb.TRUNCATION_POLICY_END, 10)}


def test_input_types_take_the_models_prompts_and_a_model_without_prompts_embeds_as_is(gateway):
    base, peer = gateway
    client = cohere.ClientV2(api_key=KEY, base_url=base)
    document = client.embed(model=PROMPTED, texts=TEXTS, input_type="search_document", truncate="START")
    assert document.embeddings.float_ == expected(TEXTS, "float", "passage: ")
    assert peer.requests[-1].truncation == pb.TRUNCATION_POLICY_START
    plain = client.embed(model=PLAIN, texts=TEXTS, input_type="classification", embedding_types=["float"])
    assert plain.embeddings.float_ == expected(TEXTS, "float") and peer.requests[-1].prompt_name == ""
    listings = peer.listings
    for _ in range(3):
        client.embed(model=PROMPTED, texts=TEXTS[:1], input_type="search_query")
    assert peer.listings == listings  # the prompts were kept, not listed per request


def test_the_sdks_v1_embed_plain_floats_or_by_type(gateway):
    base, _ = gateway
    client = cohere.Client(api_key=KEY, base_url=base)
    with parsed_without_a_word():
        floats = client.embed(texts=TEXTS, model=PROMPTED, input_type="search_query")
        by_type = client.embed(texts=TEXTS, input_type="search_document", embedding_types=["ubinary", "float"])
    assert floats.response_type == "embeddings_floats" and floats.texts == TEXTS
    assert floats.embeddings == expected(TEXTS, "float", "query: ") and floats.meta.api_version.version == "1"
    assert by_type.response_type == "embeddings_by_type"  # the default model, PLAIN: no prompts
    assert by_type.embeddings.ubinary == expected(TEXTS, "ubinary") and by_type.embeddings.int8 is None


def test_errors_are_the_gateways_error_objects_with_cohere_field_names(gateway):
    base, _ = gateway
    client = cohere.ClientV2(api_key=KEY, base_url=base, max_retries=0)
    with pytest.raises(cohere.BadRequestError) as refused:
        client.embed(model=PROMPTED, texts=TEXTS, input_type="classification")
    assert refused.value.status_code == 400
    assert refused.value.body["error"]["param"] == "input_type" and "'passage', 'query'" in str(refused.value.body)
    with pytest.raises(cohere.BadRequestError) as too_long:
        client.embed(model=PROMPTED, texts=["short", "x" * 60], input_type="search_document", truncate="NONE")
    assert too_long.value.body["error"]["param"] == "texts"
    assert too_long.value.body["error"]["code"] == "input_too_long"
    with pytest.raises(cohere.NotFoundError):
        client.embed(model="nope", texts=TEXTS, input_type="search_query")  # not in the service's listing
    with pytest.raises(cohere.NotFoundError):
        client.embed(model="nope", texts=TEXTS, input_type=None)  # the service's own answer
    with pytest.raises(cohere.UnauthorizedError):
        cohere.ClientV2(api_key="wrong", base_url=base).embed(model=PLAIN, texts=TEXTS, input_type="search_query")

    def post(body: dict) -> httpx.Response:
        return httpx.post(f"{base}/v2/embed", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)

    many = post({"model": PLAIN, "texts": ["x"] * 97, "input_type": "search_query"})
    assert many.status_code == 400 and many.json()["error"]["param"] == "texts", many.text
    zero = post({"model": PLAIN, "texts": ["x"], "output_dimension": 0})
    assert zero.status_code == 400 and zero.json()["error"]["param"] == "output_dimension"
    assert httpx.post(f"{base}/v2/embed", json={"texts": ["x"]}, timeout=30).status_code == 401


def test_the_routes_are_counted_by_their_templates(gateway):
    base, _ = gateway
    headers = {"Authorization": f"Bearer {KEY}"}
    httpx.post(f"{base}/v1/embed", json={"texts": ["x"]}, headers=headers, timeout=30)
    httpx.post(f"{base}/v2/embed", json={"texts": ["x"]}, headers=headers, timeout=30)
    text = httpx.get(f"{base}/metrics", timeout=10).text
    routes = {(s.labels["route"], s.labels["status"]) for f in text_string_to_metric_families(text) for s in f.samples
              if s.name == "embedding_gateway_http_requests_total"}
    assert {("/v1/embed", "200"), ("/v2/embed", "200")} <= routes
    schema = httpx.get(f"{base}/openapi.json", timeout=10).json()
    assert {"/v1/embed", "/v2/embed"} <= set(schema["paths"])


def test_a_bad_body_is_refused_before_the_service_is_asked(gateway):
    base, peer = gateway
    calls = len(peer.requests), peer.listings
    reply = httpx.post(f"{base}/v2/embed", json={"texts": ["x"], "embedding_types": ["int4"]},
                       headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert reply.status_code == 400 and (len(peer.requests), peer.listings) == calls
