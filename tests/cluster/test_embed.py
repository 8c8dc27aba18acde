"""The Embed API through Ray Serve's gRPC proxy, against sentence-transformers itself."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from embedding_client.v1 import embedding_pb2 as pb
from tests.helpers.classifiers import CLASSIFIER
from tests.helpers.models import MINILM, RERANKER, SPLADE, TINY, TINY_DIM, TINY_MAX_SEQ
from tests.helpers.session import REFUSING
from tests.helpers.texts import WORDS, make_texts, text_inputs, vectors_of

TOL = 1e-5


def test_large_sharded_batch_equals_sentence_transformers_in_order(service, reference_models):
    texts = make_texts(800)  # some 25 shards: more than the router sends at once (max_concurrent_shards)
    response = service.stub.Embed(pb.EmbedRequest(inputs=text_inputs(texts)), timeout=300)

    assert response.model == MINILM
    assert response.dimensions == 384
    assert [e.index for e in response.embeddings] == list(range(len(texts)))
    expected = reference_models[MINILM].encode(texts, normalize_embeddings=True)
    got = vectors_of(response)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < TOL

    tokenizer = reference_models[MINILM].tokenizer
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=256)["input_ids"]]
    assert [e.tokens for e in response.embeddings] == lengths
    assert response.usage.prompt_tokens == sum(lengths) == response.usage.total_tokens
    assert response.timing.inference_time_ns > 0
    assert response.timing.total_time_ns >= response.timing.inference_time_ns // 64


@pytest.mark.parametrize("dims", [1, 64, 256, 384])
def test_matryoshka_dimensions_truncate_then_renormalize(service, reference_models, dims):
    texts = make_texts(40, seed=dims)
    response = service.stub.Embed(pb.EmbedRequest(inputs=text_inputs(texts), dimensions=dims))
    got = vectors_of(response)
    expected = reference_models[MINILM].encode(texts, truncate_dim=dims, normalize_embeddings=True)
    assert response.dimensions == dims
    assert got.shape == (40, dims)
    assert np.abs(got - expected).max() < TOL
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_normalize_off_returns_the_raw_pooled_vectors(service, reference_models):
    # The tiny model has no Normalize module: its raw vectors are not unit length.
    texts = make_texts(30, seed=5)
    raw = service.stub.Embed(pb.EmbedRequest(model=TINY, inputs=text_inputs(texts), normalize=False))
    expected = reference_models[TINY].encode(texts, normalize_embeddings=False)
    assert np.abs(vectors_of(raw) - expected).max() < TOL
    assert not np.allclose(np.linalg.norm(expected, axis=1), 1.0)

    cut = service.stub.Embed(pb.EmbedRequest(model=TINY, inputs=text_inputs(texts), normalize=False, dimensions=16))
    assert np.abs(vectors_of(cut) - expected[:, :16]).max() < TOL


def test_raw_float32_bytes_equal_packed_floats(service, reference_models):
    texts = make_texts(50, seed=7)
    floats = service.stub.Embed(pb.EmbedRequest(inputs=text_inputs(texts), encoding=pb.VECTOR_ENCODING_FLOAT))
    raw = service.stub.Embed(pb.EmbedRequest(inputs=text_inputs(texts), encoding=pb.VECTOR_ENCODING_FLOAT32_LE))
    assert all(len(e.values) == 0 and len(e.float32_le) == 384 * 4 for e in raw.embeddings)
    decoded = np.stack([np.frombuffer(e.float32_le, dtype="<f4") for e in raw.embeddings])
    # Same vectors; the two calls may be batched with different neighbours.
    assert np.abs(decoded - vectors_of(floats)).max() < 1e-6
    assert np.abs(decoded - reference_models[MINILM].encode(texts, normalize_embeddings=True)).max() < TOL


def test_stream_returns_every_index_exactly_once(service, reference_models):
    texts = make_texts(3000, seed=11, max_words=20)
    chunks = list(
        service.stub.EmbedStream(
            pb.EmbedStreamRequest(model=TINY, inputs=text_inputs(texts), encoding=pb.VECTOR_ENCODING_FLOAT32_LE),
            timeout=300,
        )
    )
    assert len(chunks) > 1  # results arrive in several chunks, shard by shard
    indices = [e.index for c in chunks for e in c.embeddings]
    assert sorted(indices) == list(range(len(texts)))
    got = np.empty((len(texts), TINY_DIM), dtype=np.float32)
    for c in chunks:
        assert c.model == TINY and c.dimensions == TINY_DIM
        for e in c.embeddings:
            got[e.index] = np.frombuffer(e.float32_le, dtype="<f4")
    expected = reference_models[TINY].encode(texts, normalize_embeddings=True)
    assert np.abs(got - expected).max() < TOL
    assert sum(c.usage.prompt_tokens for c in chunks) == sum(e.tokens for c in chunks for e in c.embeddings)


def test_two_models_served_side_by_side(service, reference_models):
    listing = service.stub.ListModels(pb.ListModelsRequest())
    models = {m.name: m for m in listing.models}
    assert set(models) == {MINILM, TINY, REFUSING, RERANKER, SPLADE, CLASSIFIER}  # the last refuses to serve (test_precision.py)
    assert listing.default_model == MINILM
    assert models[MINILM].dimension == 384 and models[MINILM].is_default
    assert models[MINILM].max_sequence_length == 256
    assert models[MINILM].vocab_size == 30522
    assert models[TINY].dimension == TINY_DIM and not models[TINY].is_default
    assert models[TINY].max_sequence_length == TINY_MAX_SEQ
    assert models[TINY].prompts["query"] == "query: " and models[TINY].prompts["passage"] == "passage: "
    assert all(m.device == "cpu" for m in models.values())
    # The shipped default (backend auto) runs OpenVINO on CPU; the tiny model asks for torch.
    assert models[MINILM].backend == "openvino" and models[TINY].backend == "torch"

    described = service.stub.GetModel(pb.GetModelRequest(name=TINY)).model
    # GetModel alone reports the int8/uint8 ranges; this model has no calibration file: its replica computed the
    # corpus vectors for them when first asked.
    assert described.quantization.calibration_sentences == 5000 and len(described.quantization.min) == TINY_DIM
    described.ClearField("quantization")
    assert described == models[TINY]

    texts = make_texts(200, seed=3)

    def call(model):
        return model, service.stub.Embed(pb.EmbedRequest(model=model, inputs=text_inputs(texts)), timeout=120)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(call, [MINILM, TINY, MINILM, TINY]))
    for model, response in results:
        assert response.model == model
        expected = reference_models[model].encode(texts, normalize_embeddings=True)
        assert np.abs(vectors_of(response) - expected).max() < TOL


def test_prompt_name_matches_sentence_transformers_prompts(service, reference_models):
    texts = make_texts(20, seed=13)
    response = service.stub.Embed(pb.EmbedRequest(model=TINY, inputs=text_inputs(texts), prompt_name="query"))
    expected = reference_models[TINY].encode(texts, prompt_name="query", normalize_embeddings=True)
    assert np.abs(vectors_of(response) - expected).max() < TOL


def test_token_ids_embed_like_their_text(service, reference_models):
    texts = make_texts(25, seed=17)
    tokenizer = reference_models[MINILM].tokenizer
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    mixed = [
        pb.EmbedInput(token_ids=pb.TokenIds(ids=i)) if k % 2 else pb.EmbedInput(text=t)
        for k, (t, i) in enumerate(zip(texts, ids))
    ]
    response = service.stub.Embed(pb.EmbedRequest(inputs=mixed))
    expected = reference_models[MINILM].encode(texts, normalize_embeddings=True)
    assert np.abs(vectors_of(response) - expected).max() < TOL


def test_truncation_policies_end_and_start(service, reference_models):
    model = reference_models[TINY]
    text = " ".join(WORDS * 5)  # far more than 32 tokens
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    budget = TINY_MAX_SEQ - 2  # [CLS] and [SEP]
    assert len(ids) > budget

    end = service.stub.Embed(pb.EmbedRequest(model=TINY, inputs=[pb.EmbedInput(text=text)]))
    default = service.stub.Embed(
        pb.EmbedRequest(model=TINY, inputs=[pb.EmbedInput(text=text)], truncation=pb.TRUNCATION_POLICY_END)
    )
    start = service.stub.Embed(
        pb.EmbedRequest(model=TINY, inputs=[pb.EmbedInput(text=text)], truncation=pb.TRUNCATION_POLICY_START)
    )
    assert end.embeddings[0].tokens == start.embeddings[0].tokens == TINY_MAX_SEQ
    assert np.abs(vectors_of(end)[0] - model.encode(text, normalize_embeddings=True)).max() < TOL
    assert vectors_of(end).tolist() == vectors_of(default).tolist()

    tail = model.tokenizer.decode(ids[-budget:])
    tail_ids = model.tokenizer(tail, add_special_tokens=False)["input_ids"]
    assert tail_ids == ids[-budget:]
    assert np.abs(vectors_of(start)[0] - model.encode(tail, normalize_embeddings=True)).max() < TOL
    assert np.abs(vectors_of(start)[0] - vectors_of(end)[0]).max() > 1e-3
