"""Truncation WINDOWS through the session's service: a long input embedded whole, in overlapping token windows pooled
by a token-weighted mean, against the same computation done by hand with sentence-transformers' own model."""

from __future__ import annotations

import numpy as np

from embedding_client import EmbedClient
from embedding_client.v1 import embedding_pb2 as pb
from embedding_service.model.accuracy import corpus
from tests.helpers.models import MINILM, TINY
from tests.helpers.session import TINY_WINDOWS
from tests.helpers.texts import WORDS, vectors_of
from tests.helpers.windows import by_hand

TOL = 1e-5
WINDOWS = pb.TRUNCATION_POLICY_WINDOWS
# all-MiniLM-L6-v2 keeps the defaults: all it takes (256 less [CLS] and [SEP]), an eighth of that overlapping.
MINILM_WINDOWS = {"window_tokens": 254, "overlap_tokens": 31, "max_windows": 128}


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def test_long_inputs_equal_the_hand_computation(service, reference_models):
    model = reference_models[MINILM]
    sentences = corpus().gate
    long_text, medium_text = " ".join(sentences[:80]), " ".join(sentences[100:130])
    ids = model.tokenizer(long_text, add_special_tokens=False)["input_ids"]
    assert len(ids) > 4 * 256  # several windows
    inputs = [pb.EmbedInput(text=long_text), pb.EmbedInput(text="a short sentence"),
              pb.EmbedInput(text=medium_text), pb.EmbedInput(token_ids=pb.TokenIds(ids=ids))]
    response = service.stub.Embed(pb.EmbedRequest(model=MINILM, inputs=inputs, truncation=WINDOWS), timeout=60)

    window, overlap = MINILM_WINDOWS["window_tokens"], MINILM_WINDOWS["overlap_tokens"]
    expected = [by_hand(model, t, window, overlap) for t in (long_text, "a short sentence", medium_text, long_text)]
    got = vectors_of(response)
    for k, (pooled, tokens) in enumerate(expected):
        assert np.abs(got[k] - unit(pooled)).max() < TOL, k
        assert response.embeddings[k].tokens == tokens, k  # every window's tokens, special tokens included
    assert response.usage.prompt_tokens == sum(t for _, t in expected) == response.usage.total_tokens
    assert expected[0][1] > len(ids) + 2  # overlaps counted again
    # A short input is one window: what sentence-transformers' encode gives.
    assert np.abs(got[1] - model.encode("a short sentence", normalize_embeddings=True)).max() < TOL
    # Not what cutting at the end gives.
    end = model.encode(long_text, normalize_embeddings=True)
    assert np.abs(got[0] - end).max() > 1e-2

    with EmbedClient(service.target) as client:  # the client library's name for it
        result = client.embed([long_text, medium_text] * 3, model=MINILM, truncation="windows")
    assert np.abs(result.vectors - got[[0, 2] * 3]).max() < TOL

    described = service.stub.GetModel(pb.GetModelRequest(name=MINILM), timeout=60).model.long_inputs
    assert {"window_tokens": described.window_tokens, "overlap_tokens": described.overlap_tokens,
            "max_windows": described.max_windows} == MINILM_WINDOWS


def test_configured_windows_with_a_prompt_matryoshka_and_no_normalization(service, reference_models):
    model = reference_models[TINY]
    text = " ".join(WORDS * 2)  # about 60 tokens: 4 windows of 20 (18 after the prompt), 6 shared
    request = pb.EmbedRequest(model=TINY, inputs=[pb.EmbedInput(text=text)], truncation=WINDOWS,
                              prompt_name="query", dimensions=16, normalize=False)
    response = service.stub.Embed(request, timeout=60)
    pooled, tokens = by_hand(model, text, TINY_WINDOWS["window_tokens"], TINY_WINDOWS["overlap_tokens"],
                             prompt=model.prompts["query"])
    assert np.abs(vectors_of(response)[0] - pooled[:16]).max() < TOL
    assert response.embeddings[0].tokens == tokens > 3 * 22

    described = service.stub.GetModel(pb.GetModelRequest(name=TINY), timeout=60).model.long_inputs
    assert (described.window_tokens, described.overlap_tokens, described.max_windows) == tuple(TINY_WINDOWS.values())
