"""Truncation WINDOWS: a long input embedded whole, in overlapping token windows pooled by a token-weighted mean,
against the same computation done by hand with sentence-transformers' own model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embedding_client import EmbedClient
from embedding_client.v1 import embedding_pb2 as pb
from embedding_service.model.accuracy import corpus
from embedding_service.wire.messages import Windows
from tests.conftest import MINILM, TINY, TINY_WINDOWS
from tests.test_embed import WORDS, vectors_of

TOL = 1e-5
WINDOWS = pb.TRUNCATION_POLICY_WINDOWS
# all-MiniLM-L6-v2 keeps the defaults: all it takes (256 less [CLS] and [SEP]), an eighth of that overlapping.
MINILM_WINDOWS = {"window_tokens": 254, "overlap_tokens": 31, "max_windows": 128}


def by_hand(model, text: str, window_tokens: int, overlap_tokens: int, prompt: str = "") -> tuple[np.ndarray, int]:
    """(pooled vector before normalization, tokens embedded): the text's tokens after the prompt cut into windows of
    window_tokens less the prompt's, each window run through the model with the prompt and [CLS]/[SEP], the window
    vectors averaged with each window's token count as its weight."""
    tokenizer = model.tokenizer
    ids = tokenizer(prompt + text, add_special_tokens=False)["input_ids"]
    head = ids[: len(tokenizer(prompt, add_special_tokens=False)["input_ids"])] if prompt else []
    body = ids[len(head):]
    span = window_tokens - len(head)
    starts = [0]
    while starts[-1] + span < len(body):
        starts.append(starts[-1] + span - overlap_tokens)
    vectors, weights = [], []
    for start in starts:
        ids_window = torch.tensor([[tokenizer.cls_token_id, *head, *body[start : start + span], tokenizer.sep_token_id]])
        features = {"input_ids": ids_window, "attention_mask": torch.ones_like(ids_window),
                    "token_type_ids": torch.zeros_like(ids_window)}
        with torch.no_grad():
            vectors.append(model(features)["sentence_embedding"][0].numpy())
        weights.append(ids_window.shape[1])
    return np.average(np.stack(vectors), axis=0, weights=weights), sum(weights)


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


@pytest.mark.parametrize("tokens,span,overlap,expected", [
    (10, 10, 3, [0]),            # fits: one window
    (11, 10, 3, [0, 7]),         # one token over: a second window
    (24, 10, 3, [0, 7, 14]),     # the last window ends exactly at the end
    (25, 10, 3, [0, 7, 14, 21]),
    (12, 4, 9, list(range(9))),  # an overlap past the span (a long prompt) still advances a token a window
])
def test_window_starts_cover_every_token(tokens, span, overlap, expected):
    starts = list(Windows(span, overlap, 100, 2).starts(tokens, span))
    assert starts == expected
    covered = set().union(*(range(s, min(s + span, tokens)) for s in starts))
    assert covered == set(range(tokens))


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


def test_windows_settings_out_of_bounds_are_refused(reference_models):
    from pydantic import ValidationError

    from embedding_service.config import LongInputSettings
    from embedding_service.model.tokenization import InputEncoder

    with pytest.raises(ValidationError, match="overlap_tokens"):
        LongInputSettings(window_tokens=64, overlap_tokens=64)
    with pytest.raises(ValueError, match="exceeds the 254 input tokens"):
        InputEncoder(reference_models[MINILM], LongInputSettings(window_tokens=255))
    with pytest.raises(ValueError, match="must be below the window"):
        InputEncoder(reference_models[MINILM], LongInputSettings(overlap_tokens=254))
    windows = InputEncoder(reference_models[MINILM], LongInputSettings(window_tokens=100, max_windows=3)).windows
    assert windows.max_tokens == 100 + 2 * (100 - 12) + 2  # overlap: an eighth of the window
