"""Cohere's embed API in the gateway against the session's service: the official cohere SDK's ClientV2.embed and
Client.embed, their float vectors equal to sentence-transformers' own (with the prompt each input_type takes), every
compact type equal to the service's own encoding of the same texts, output_dimension, truncate, and the refusals."""

from __future__ import annotations

import base64

import cohere
import httpx
import numpy as np
import pytest

from embedding_client.v1 import embedding_pb2 as pb
from tests.helpers.gateways import running_gateway
from tests.helpers.models import MINILM, TINY, TINY_MAX_SEQ
from tests.helpers.texts import make_texts, text_inputs

KEY = "gateway-key"
TOL = 1e-5
# A value this close to 0 may take either sign bit in two calls of the same text (test_compact_vectors.py).
EDGE = 1e-5
COMPACT = {"int8": (pb.VECTOR_ENCODING_INT8, np.int8), "uint8": (pb.VECTOR_ENCODING_UINT8, np.uint8),
           "binary": (pb.VECTOR_ENCODING_BINARY, np.int8), "ubinary": (pb.VECTOR_ENCODING_UBINARY, np.uint8)}
LONG = " ".join(["retrieval"] * (4 * TINY_MAX_SEQ))  # far past tiny-bert's maximum


@pytest.fixture(scope="module")
def gateway(service):
    with running_gateway(targets=[service.target], api_keys=[KEY]) as base:
        yield base


@pytest.fixture(scope="module")
def client(gateway):
    return cohere.ClientV2(api_key=KEY, base_url=gateway, timeout=120, max_retries=0)


def floats_of(rows) -> np.ndarray:
    return np.array(rows, dtype=np.float32)


def grpc_embed(service, texts, encoding: int, **fields) -> pb.EmbedResponse:
    """The service's own reply for the texts, called directly."""
    return service.stub.Embed(pb.EmbedRequest(inputs=text_inputs(texts), encoding=encoding, **fields), timeout=120)


def grpc_floats(reply: pb.EmbedResponse) -> np.ndarray:
    return np.stack([np.frombuffer(e.float32_le, "<f4") for e in reply.embeddings])


def assert_the_services_encoding(got: list[list[int]], reply: pb.EmbedResponse, embedding_type: str,
                                 floats: np.ndarray) -> None:
    """Cohere's ints are the service's bytes for the same texts, read as Cohere's type: equal, but where two calls
    of a text may differ at all (the texts were embedded in other batches): a value on a step's edge, one step
    either way; a sign bit of a value within EDGE of 0."""
    dtype = COMPACT[embedding_type][1]
    expected = np.stack([np.frombuffer(e.packed, dtype) for e in reply.embeddings]).astype(np.int16)
    ints = np.array(got, dtype=np.int16)
    assert ints.shape == expected.shape, embedding_type
    assert ints.min() >= np.iinfo(dtype).min and ints.max() <= np.iinfo(dtype).max, embedding_type
    if embedding_type.endswith("binary"):
        offset = 128 if embedding_type == "binary" else 0  # binary is ubinary less 128
        bits = np.unpackbits((ints + offset).astype(np.uint8), axis=1)[:, : floats.shape[1]]
        expected_bits = np.unpackbits((expected + offset).astype(np.uint8), axis=1)[:, : floats.shape[1]]
        near = np.abs(floats) < EDGE
        assert np.array_equal(bits[~near], expected_bits[~near]), embedding_type
        assert np.array_equal(bits[~near], (floats > 0)[~near]), embedding_type  # the floats' sign bits
    else:
        assert np.abs(ints - expected).max() <= 1, embedding_type
        assert (ints != expected).mean() < 0.01, embedding_type


def test_the_sdks_floats_equal_sentence_transformers_with_the_prompt_of_each_input_type(client, reference_models):
    texts = make_texts(24, seed=91)
    minilm = client.embed(model=MINILM, texts=texts, input_type="search_query")  # no prompts: as they are
    assert minilm.response_type == "embeddings_by_type" and minilm.texts == texts and minilm.id
    expected = reference_models[MINILM].encode(texts, normalize_embeddings=True)
    assert np.abs(floats_of(minilm.embeddings.float_) - expected).max() < TOL
    tokens = sum(len(ids) for ids in reference_models[MINILM].tokenizer(texts, truncation=True,
                                                                         max_length=256)["input_ids"])
    assert minilm.meta.billed_units.input_tokens == tokens and minilm.meta.api_version.version == "2"

    for input_type, prompt in (("search_query", "query"), ("search_document", "passage")):  # tiny-bert: no document
        reply = client.embed(model=TINY, texts=texts, input_type=input_type, embedding_types=["float"])
        expected = reference_models[TINY].encode(texts, prompt_name=prompt, normalize_embeddings=True)
        assert np.abs(floats_of(reply.embeddings.float_) - expected).max() < TOL, input_type
    as_is = reference_models[TINY].encode(texts, normalize_embeddings=True)
    assert np.abs(floats_of(reply.embeddings.float_) - as_is).max() > 1e-3  # the prompt made a difference


def test_every_type_at_once_equals_the_services_own_encodings(client, service):
    texts = make_texts(30, seed=92)
    types = ["float", "int8", "uint8", "binary", "ubinary", "base64"]
    reply = client.embed(model=MINILM, texts=texts, input_type="search_document", embedding_types=types)
    floats = grpc_floats(grpc_embed(service, texts, pb.VECTOR_ENCODING_FLOAT32_LE, model=MINILM))
    got = floats_of(reply.embeddings.float_)
    assert got.shape == floats.shape and np.abs(got - floats).max() < TOL
    decoded = np.stack([np.frombuffer(base64.b64decode(b), "<f4") for b in reply.embeddings.base64])
    assert np.array_equal(decoded, got)  # base64 is the float vectors' own bytes
    for embedding_type, (encoding, _) in COMPACT.items():
        own = grpc_embed(service, texts, encoding, model=MINILM)
        assert_the_services_encoding(getattr(reply.embeddings, embedding_type), own, embedding_type, floats)
    assert len(reply.embeddings.binary[0]) == len(reply.embeddings.int8[0]) // 8 == 384 // 8


def test_output_dimension_is_the_services_matryoshka_cut(client, service, reference_models):
    texts = make_texts(12, seed=93)
    reply = client.embed(model=MINILM, texts=texts, input_type="search_query", output_dimension=64,
                         embedding_types=["float", "int8", "ubinary"])
    full = reference_models[MINILM].encode(texts, normalize_embeddings=False)[:, :64]
    expected = full / np.linalg.norm(full, axis=1, keepdims=True)
    got = floats_of(reply.embeddings.float_)
    assert got.shape == (12, 64) and np.abs(got - expected).max() < TOL
    floats = grpc_floats(grpc_embed(service, texts, pb.VECTOR_ENCODING_FLOAT32_LE, model=MINILM, dimensions=64))
    for embedding_type in ("int8", "ubinary"):
        own = grpc_embed(service, texts, COMPACT[embedding_type][0], model=MINILM, dimensions=64)
        assert_the_services_encoding(getattr(reply.embeddings, embedding_type), own, embedding_type, floats)


def test_truncate_none_refuses_a_too_long_text_and_start_and_end_cut_it(client, reference_models):
    with pytest.raises(cohere.BadRequestError) as refused:
        client.embed(model=TINY, texts=["short", LONG], input_type="search_query", truncate="NONE")
    assert refused.value.status_code == 400
    error = refused.value.body["error"]
    assert (error["param"], error["code"]) == ("texts", "input_too_long"), error
    end = client.embed(model=TINY, texts=[LONG], input_type="search_query")  # Cohere's default: END
    expected = reference_models[TINY].encode([LONG], prompt_name="query", normalize_embeddings=True)
    assert np.abs(floats_of(end.embeddings.float_) - expected).max() < TOL
    start = client.embed(model=TINY, texts=["short " + LONG], input_type="search_query", truncate="START")
    assert start.meta.billed_units.input_tokens == end.meta.billed_units.input_tokens == TINY_MAX_SEQ


def test_an_input_type_the_model_has_no_prompt_for_is_refused_naming_its_prompts(client, reference_models):
    with pytest.raises(cohere.BadRequestError) as refused:
        client.embed(model=TINY, texts=["a text"], input_type="classification")
    error = refused.value.body["error"]
    assert refused.value.status_code == 400 and error["param"] == "input_type", error
    assert "'passage', 'query'" in error["message"]
    plain = client.embed(model=MINILM, texts=["a text"], input_type="classification")  # no prompts: as it is
    expected = reference_models[MINILM].encode(["a text"], normalize_embeddings=True)
    assert np.abs(floats_of(plain.embeddings.float_) - expected).max() < TOL


def test_the_sdks_v1_client_embeds_plain_floats_or_by_type(gateway, reference_models):
    texts = make_texts(10, seed=94)
    client = cohere.Client(api_key=KEY, base_url=gateway, timeout=120)
    floats = client.embed(texts=texts, model=TINY, input_type="search_query")
    assert floats.response_type == "embeddings_floats" and floats.texts == texts
    expected = reference_models[TINY].encode(texts, prompt_name="query", normalize_embeddings=True)
    assert np.abs(floats_of(floats.embeddings) - expected).max() < TOL
    by_type = client.embed(texts=texts, model=MINILM, input_type="search_document", embedding_types=["float", "int8"])
    assert by_type.response_type == "embeddings_by_type" and len(by_type.embeddings.int8) == len(texts)
    expected = reference_models[MINILM].encode(texts, normalize_embeddings=True)
    assert np.abs(floats_of(by_type.embeddings.float_) - expected).max() < TOL


def test_refusals_are_the_gateways_error_objects(gateway, client):
    unauthorized = httpx.post(f"{gateway}/v2/embed", json={"model": MINILM, "texts": ["x"]}, timeout=60)
    assert unauthorized.status_code == 401
    with pytest.raises(cohere.NotFoundError):
        client.embed(model="no-such-model", texts=["x"], input_type="search_query")
    headers = {"Authorization": f"Bearer {KEY}"}
    too_many = httpx.post(f"{gateway}/v2/embed", json={"model": MINILM, "texts": ["x"] * 97}, headers=headers,
                          timeout=60)
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "texts"
    too_wide = httpx.post(f"{gateway}/v2/embed", json={"model": MINILM, "texts": ["x"], "output_dimension": 4096},
                          headers=headers, timeout=60)
    assert too_wide.status_code == 400 and too_wide.json()["error"]["param"] == "output_dimension", too_wide.text
