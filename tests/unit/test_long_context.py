"""A long-context encoder (ModernBERT-shaped: 8,192 tokens, rotary positions, local and global attention) loaded
in-process as a replica loads it, at its real maximum: vectors equal to sentence-transformers' own to 1e-5 for inputs
of 8,000 tokens and more and short ones, "reject" and "end" at the exact boundary (8,192 tokens pass, 8,193 do not),
truncation WINDOWS of 8,190 tokens (the maximum less [CLS] and [SEP]), and backend auto compiling it for OpenVINO."""

from __future__ import annotations

import numpy as np
import pytest

from embedding_service.config import ModelSettings
from embedding_service.model.forward import forward_sorted, load_model
from embedding_service.model.runtimes import OpenVinoRuntime
from tests.helpers.models import LONG, LONG_MAX_SEQ, build_tiny_long_encoder
from tests.helpers.texts import text_of_tokens
from tests.helpers.windows import by_hand

TOLERANCE = 1e-5
CONTENT = LONG_MAX_SEQ - 2  # input tokens the model takes besides [CLS] and [SEP]


@pytest.fixture(scope="module")
def long_dir(tmp_path_factory):
    return build_tiny_long_encoder(tmp_path_factory.mktemp("long"))


@pytest.fixture(scope="module")
def encoder_model(long_dir):
    """sentence-transformers' own model: the ground truth."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(long_dir), device="cpu")


@pytest.fixture(scope="module")
def on_torch(long_dir):
    return load_model(ModelSettings(name=LONG, path=str(long_dir), backend="torch"))


@pytest.fixture(scope="module")
def texts(encoder_model):
    """By content tokens: the most the model takes, one past it (the same and " a"), past one window, short ones."""
    tokenizer = encoder_model.tokenizer
    fits = text_of_tokens(tokenizer, CONTENT)
    return {CONTENT: fits, CONTENT + 1: fits + " a", **{n: text_of_tokens(tokenizer, n, start=n % 997) for n in (9000, 700, 12)}}


def _served(loaded, inputs, policy: str = "end") -> np.ndarray:
    """Vectors as a replica computes them (the default CPU budget: an 8,192-token sequence runs alone), windows
    pooled and normalized as the replica does."""
    prepared = loaded.encoder.prepare(inputs, policy)
    assert not prepared.too_long
    vectors, _ = forward_sorted(loaded.runtime, loaded.encoder, prepared.sequences, None, 32, 1024, loaded.device,
                                loaded.dimension)
    pooled = prepared.pool(vectors)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


def test_the_model_keeps_its_real_maximum(encoder_model, on_torch):
    encoder = on_torch.encoder
    assert encoder_model.max_seq_length == encoder.max_length == LONG_MAX_SEQ
    assert encoder_model[0].auto_model.config.max_position_embeddings == LONG_MAX_SEQ
    assert encoder.budget == CONTENT and not encoder.pad_left
    # WINDOWS at that maximum: as many tokens as the model takes, an eighth of them repeated.
    assert (encoder.windows.window_tokens, encoder.windows.overlap_tokens) == (CONTENT, CONTENT // 8)


def test_long_and_short_vectors_equal_sentence_transformers(encoder_model, on_torch, texts):
    inputs = [texts[CONTENT], texts[12], texts[700]]
    # One at a time: sentence-transformers pads a batch to its longest, as the replica's token budget does not.
    expected = encoder_model.encode(inputs, batch_size=1)
    lengths = [len(s) for s in on_torch.encoder.prepare(inputs, "end").sequences]
    assert lengths == [LONG_MAX_SEQ, 14, 702]
    assert np.abs(_served(on_torch, inputs) - expected).max() < TOLERANCE


def test_reject_and_end_at_the_exact_maximum(encoder_model, on_torch, texts):
    encoder = on_torch.encoder
    fits, over = texts[CONTENT], texts[CONTENT + 1]
    rejected = encoder.prepare([fits, over, "short"], "reject")
    assert rejected.too_long == [1] and len(rejected.sequences[0]) == LONG_MAX_SEQ
    ids = [np.arange(5, 5 + CONTENT), np.arange(5, 6 + CONTENT)]  # given as token ids: the same boundary
    assert encoder.prepare(ids, "reject").too_long == [1]
    end = encoder.prepare([fits, over], "end")
    assert not end.too_long and [len(s) for s in end.sequences] == [LONG_MAX_SEQ, LONG_MAX_SEQ]
    # The token past the maximum is the one cut, as sentence-transformers cuts it: the vector is the one above.
    assert np.array_equal(end.sequences[0], end.sequences[1])
    assert encoder_model.preprocess([over])["input_ids"][0].tolist() == end.sequences[1].tolist()


def test_windows_at_the_real_maximum_equal_sentence_transformers_window_by_window(encoder_model, on_torch, texts):
    text = texts[9000]
    prepared = on_torch.encoder.prepare([text, texts[12]], "windows")
    windows = on_torch.encoder.windows
    # 9,000 tokens: a window of 8,190 and one from 7,167 (8,190 less the 1,023 repeated) to the end.
    assert prepared.windows.tolist() == [2, 1]
    assert [len(s) for s in prepared.sequences] == [LONG_MAX_SEQ, 9000 - (CONTENT - CONTENT // 8) + 2, 14]
    pooled, tokens = by_hand(encoder_model, text, windows.window_tokens, windows.overlap_tokens)
    assert prepared.token_counts.tolist() == [tokens, 14]
    served = _served(on_torch, [text, texts[12]], "windows")
    assert np.abs(served[0] - pooled / np.linalg.norm(pooled)).max() < TOLERANCE
    assert np.abs(served[1] - encoder_model.encode([texts[12]])[0]).max() < TOLERANCE


def test_backend_auto_compiles_the_long_encoder_for_openvino(encoder_model, long_dir, texts):
    """Past the 64-token local window and the length the export traced, within 1e-5 of torch."""
    loaded = load_model(ModelSettings(name=LONG, path=str(long_dir), backend="auto"))
    assert loaded.backend == "openvino" and isinstance(loaded.runtime, OpenVinoRuntime)
    assert loaded.not_applied == () and loaded.verification.refused is None
    inputs = [texts[700], texts[12], text_of_tokens(encoder_model.tokenizer, 3000)]
    assert np.abs(_served(loaded, inputs) - encoder_model.encode(inputs)).max() < TOLERANCE
