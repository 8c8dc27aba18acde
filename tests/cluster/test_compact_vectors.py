"""Compact vectors (int8, uint8, binary, ubinary): sentence-transformers' quantize_embeddings of the model's own
vectors with the ranges GetModel publishes, through gRPC, the client library and the gateway."""

from __future__ import annotations

import base64
from importlib import resources

import numpy as np
import pytest
from sentence_transformers.util.quantization import quantize_embeddings

from embedding_client import EmbedClient
from embedding_client.v1 import embedding_pb2 as pb
from tests.helpers.gateways import post, running_gateway
from tests.helpers.models import MINILM
from tests.helpers.texts import make_texts, text_inputs

ENCODINGS = {"int8": pb.VECTOR_ENCODING_INT8, "uint8": pb.VECTOR_ENCODING_UINT8,
             "binary": pb.VECTOR_ENCODING_BINARY, "ubinary": pb.VECTOR_ENCODING_UBINARY}
DTYPES = {"int8": np.int8, "uint8": np.uint8, "binary": np.int8, "ubinary": np.uint8}
# The service's float vectors are within 1e-5 of sentence-transformers' own: a value that close to a step
# edge (or to 0, for the sign bits) may land on either side. Everywhere else the bytes must be equal.
EDGE = 1e-5


def ranges_of(service, dimensions: int | None = None, normalize: bool | None = None) -> np.ndarray:
    request = pb.GetModelRequest(name=MINILM, dimensions=dimensions, normalize=normalize)
    q = service.stub.GetModel(request, timeout=60).model.quantization
    return np.array([q.min, q.max], dtype=np.float32)


def packed_of(response, precision: str) -> np.ndarray:
    return np.stack([np.frombuffer(e.packed, dtype=DTYPES[precision]) for e in response.embeddings])


def assert_quantized(got: np.ndarray, floats: np.ndarray, precision: str, ranges: np.ndarray) -> None:
    expected = quantize_embeddings(floats, precision=precision, ranges=ranges)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    if precision.endswith("binary"):  # compared bit by bit (all-MiniLM-L6-v2 has a dimension that is always ~0)
        near = np.abs(floats) < EDGE
        got_bits = np.unpackbits(got.view(np.uint8), axis=-1)[:, : floats.shape[1]]
        expected_bits = np.unpackbits(expected.view(np.uint8), axis=-1)[:, : floats.shape[1]]
        assert np.array_equal(got_bits[~near], expected_bits[~near]), precision
    else:
        steps = (ranges[1] - ranges[0]) / 255
        steps = np.where(steps == 0, 1, steps)  # as quantize_embeddings does for a dimension of one value
        position = (floats - ranges[0]) / steps
        near = np.abs(position - np.round(position)) < EDGE / steps
        assert np.array_equal(got[~near], expected[~near]), precision
        assert np.abs(got.astype(np.int16) - expected.astype(np.int16)).max() <= 1
    assert near.mean() < 0.05  # nearly every value was compared exactly (about 98% for int8 here)


def test_ranges_are_the_calibration_corpus_min_and_max_per_shape(service):
    full = ranges_of(service)
    model = service.stub.GetModel(pb.GetModelRequest(name=MINILM), timeout=60).model
    assert model.quantization.dimensions == model.dimension == full.shape[1]
    assert model.quantization.normalized and model.quantization.calibration_sentences == 5000
    # The shipped calibration's fp32 vectors of the packaged corpus, shaped as a call's vectors.
    with resources.as_file(shipped_calibration()) as path, np.load(path) as data:
        gate = data["gate"].astype(np.float32)
    gate /= np.linalg.norm(gate, axis=1, keepdims=True)  # normalized as the call's vectors are
    assert np.allclose(full, np.vstack((gate.min(0), gate.max(0))), atol=1e-7)
    cut = gate[:, :64] / np.linalg.norm(gate[:, :64], axis=1, keepdims=True)
    assert np.allclose(ranges_of(service, dimensions=64), np.vstack((cut.min(0), cut.max(0))), atol=1e-7)
    # Listing models stays small: no ranges there.
    listing = service.stub.ListModels(pb.ListModelsRequest(), timeout=60)
    assert not any(m.HasField("quantization") for m in listing.models)


def shipped_calibration():
    """The MiniLM calibration the package ships (its only one)."""
    files = [f for f in resources.files("embedding_service.model.calibrations").iterdir() if f.name.endswith(".npz")]
    assert len(files) == 1
    return files[0]


TYPED_TEXTS = make_texts(200, seed=71)


@pytest.fixture(scope="module")
def typed_floats(reference_models) -> tuple[np.ndarray, np.ndarray]:
    """sentence-transformers' own vectors of TYPED_TEXTS, normalized, and of the first 50 unnormalized, cut to 64:
    computed once for every type."""
    model = reference_models[MINILM]
    return (model.encode(TYPED_TEXTS, normalize_embeddings=True),
            model.encode(TYPED_TEXTS[:50], normalize_embeddings=False)[:, :64])


@pytest.mark.parametrize("precision", list(ENCODINGS))
def test_each_type_is_quantize_embeddings_of_the_models_vectors_with_the_published_ranges(
        service, typed_floats, precision):
    texts = TYPED_TEXTS
    floats, raw = typed_floats
    reply = service.stub.Embed(pb.EmbedRequest(model=MINILM, inputs=text_inputs(texts), encoding=ENCODINGS[precision]),
                               timeout=120)
    assert reply.dimensions == floats.shape[1]
    assert all(not e.values and not e.float32_le for e in reply.embeddings)
    assert_quantized(packed_of(reply, precision), floats, precision, ranges_of(service))

    # A Matryoshka shape has its own ranges; unnormalized vectors too.
    reply = service.stub.Embed(pb.EmbedRequest(model=MINILM, inputs=text_inputs(texts[:50]), dimensions=64,
                                               normalize=False, encoding=ENCODINGS[precision]), timeout=120)
    assert reply.dimensions == 64
    assert_quantized(packed_of(reply, precision), raw, precision, ranges_of(service, 64, False))


def test_the_same_text_gets_the_same_bytes_whatever_else_is_in_the_call(service):
    texts = make_texts(40, seed=72)
    alone = service.stub.Embed(pb.EmbedRequest(model=MINILM, inputs=text_inputs(texts[:1]),
                                               encoding=pb.VECTOR_ENCODING_INT8), timeout=60)
    among = service.stub.Embed(pb.EmbedRequest(model=MINILM, inputs=text_inputs(texts),
                                               encoding=pb.VECTOR_ENCODING_INT8), timeout=60)
    assert np.abs(packed_of(alone, "int8")[0].astype(int) - packed_of(among, "int8")[0].astype(int)).max() <= 1


def test_the_client_returns_compact_arrays_and_the_ranges(service, reference_models):
    texts = make_texts(120, seed=73)
    floats = reference_models[MINILM].encode(texts, normalize_embeddings=True)
    with EmbedClient(service.target) as client:
        ranges = client.ranges(MINILM)
        assert np.array_equal(ranges, ranges_of(service))
        for precision in ENCODINGS:
            got = client.embed(texts, model=MINILM, output=precision)
            assert_quantized(got.vectors, floats, precision, ranges)
        with pytest.raises(ValueError, match="output must be one of"):
            client.embed(texts[:1], model=MINILM, output="int4")


def test_the_gateway_takes_output_dtype_as_ints_or_base64(service, reference_models):
    texts = make_texts(20, seed=74)
    floats = reference_models[MINILM].encode(texts, normalize_embeddings=True)
    ranges = ranges_of(service)
    with running_gateway(targets=[service.target], api_keys=["k"]) as base:
        headers = {"Authorization": "Bearer k"}
        for precision in ENCODINGS:
            as_ints = post(base, {"model": MINILM, "input": texts, "output_dtype": precision}, headers)
            assert as_ints.status_code == 200, as_ints.text
            ints = np.array([d["embedding"] for d in as_ints.json()["data"]], dtype=DTYPES[precision])
            assert_quantized(ints, floats, precision, ranges)
            as_b64 = post(base, {"model": MINILM, "input": texts, "output_dtype": precision,
                                 "encoding_format": "base64"}, headers)
            decoded = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), DTYPES[precision])
                                for d in as_b64.json()["data"]])
            assert np.array_equal(decoded, ints)
        bad = post(base, {"model": MINILM, "input": texts, "output_dtype": "int4"}, headers)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "output_dtype"
