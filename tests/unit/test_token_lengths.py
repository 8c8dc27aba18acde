"""Shards cut by tokens, in-process: the router's token counts equal the replica's, and real text cut by tokens pads
far less than cut by characters."""

from __future__ import annotations

import random

import numpy as np
import pytest

from embedding_service.model.accuracy import corpus
from embedding_service.model.forward import plan_passes
from embedding_service.model.tokenization import InputEncoder
from embedding_service.router.fanout import plan_shards
from embedding_service.router.token_lengths import TokenLengths
from tests.helpers.models import MINILM


@pytest.fixture(scope="module")
def encoder(reference_models):
    return InputEncoder(reference_models[MINILM])


def _real_text(n: int, seed: int) -> list[str]:
    texts = list(corpus().gate)
    random.Random(seed).shuffle(texts)
    return texts[:n]


def _padding_share(texts: list[str], encoder: InputEncoder, lengths: np.ndarray | None) -> float:
    """Padded share of the token slots the replica computes for `texts` cut into shards of 32."""
    real = [len(s) for s in encoder.prepare(texts, "end").sequences]
    slots = 0
    for shard in plan_shards(texts, 32, lengths):
        members = [real[k] for k in shard.positions]
        slots += sum(max(members[k] for k in p) * len(p) for p in plan_passes(members, 32, 1024))
    return 1 - sum(real) / slots


def test_the_routers_token_counts_equal_the_replicas(encoder):
    counter = TokenLengths(encoder.tokenizer_json(), encoder.max_length)
    texts = _real_text(500, seed=1) + ["", "x " * 600]  # an empty text, one past the limit
    ids = [np.arange(1000, 1000 + n, dtype=np.int32) for n in (1, 17, 900)]
    lengths = counter.of(texts + ids)
    specials = len(encoder.prepare(["x"], "end").sequences[0]) - 1
    content = [len(s) - specials for s in encoder.prepare(texts, "end").sequences]
    # The replica cuts content at its budget (max_length minus the special tokens); the router caps at max_length.
    assert lengths[:len(texts)].tolist() == [c if c < encoder.budget else lengths[k] for k, c in enumerate(content)]
    assert lengths[len(texts) - 1] == encoder.max_length
    assert lengths[len(texts):].tolist() == [1, 17, encoder.max_length]


def test_real_text_cut_by_tokens_pads_far_less_than_by_characters(encoder):
    texts = _real_text(2000, seed=2)
    counter = TokenLengths(encoder.tokenizer_json(), encoder.max_length)
    by_tokens = _padding_share(texts, encoder, counter.of(texts))
    by_chars = _padding_share(texts, encoder, None)
    assert by_tokens < 0.03 and by_chars > 0.15, (by_tokens, by_chars)
