"""Shards cut by tokens: the router's token counts equal the replica's, and a call of real text is cut
into shards of similar token lengths (little padding) with vectors equal to sentence-transformers'."""

from __future__ import annotations

import random

import numpy as np
import pytest

from embedding_client.v1 import embedding_pb2 as pb
from embedding_service.model.accuracy import corpus
from embedding_service.model.forward import plan_passes
from embedding_service.model.tokenization import InputEncoder
from embedding_service.router.fanout import plan_shards
from embedding_service.router.token_lengths import TokenLengths
from tests.conftest import METRICS_REPORT_MS, MINILM
from tests.observe import settled, total, wait_until

SLOTS = "ray_embedding_token_slots_total"
PADDING = "ray_embedding_padding_tokens_total"
FORWARDED = "ray_embedding_sequences_forwarded_total"


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


def test_a_call_of_real_text_runs_in_token_cut_shards(service, reference_models):
    texts = _real_text(640, seed=3)
    before = settled(FORWARDED, 2 * METRICS_REPORT_MS / 1000, model=MINILM)
    response = service.stub.Embed(pb.EmbedRequest(model=MINILM, inputs=[pb.EmbedInput(text=t) for t in texts]),
                                  timeout=300)
    vectors = np.array([list(e.values) for e in response.embeddings], dtype=np.float32)
    assert [e.index for e in response.embeddings] == list(range(len(texts)))
    assert np.abs(vectors - reference_models[MINILM].encode(texts)).max() < 1e-5

    wait_until(lambda: total(FORWARDED, model=MINILM) - total(FORWARDED, before, model=MINILM) >= len(texts), 60,
               "the call's forwards reported")
    after = settled(SLOTS, 2 * METRICS_REPORT_MS / 1000, model=MINILM)
    slots = total(SLOTS, after, model=MINILM) - total(SLOTS, before, model=MINILM)
    padding = total(PADDING, after, model=MINILM) - total(PADDING, before, model=MINILM)
    assert padding / slots < 0.10, (padding, slots)  # cut by characters: 0.28 (measured offline), 0.06 here
