"""Shards cut by tokens through the session's service: a call of real text runs in shards of similar token lengths
(little padding) with vectors equal to sentence-transformers'."""

from __future__ import annotations

import random

import numpy as np

from embedding_client.v1 import embedding_pb2 as pb
from embedding_service.model.accuracy import corpus
from tests.helpers.models import MINILM
from tests.helpers.observe import settled, total, wait_until
from tests.helpers.session import METRICS_REPORT_MS

SLOTS = "ray_embedding_token_slots_total"
PADDING = "ray_embedding_padding_tokens_total"
FORWARDED = "ray_embedding_sequences_forwarded_total"


def _real_text(n: int, seed: int) -> list[str]:
    texts = list(corpus().gate)
    random.Random(seed).shuffle(texts)
    return texts[:n]


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
