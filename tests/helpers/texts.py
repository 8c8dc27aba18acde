"""Inputs the tests send and what they read back: texts of mixed lengths, EmbedInput lists, vectors of a reply."""

from __future__ import annotations

import random

import numpy as np

from embedding_client.v1 import embedding_pb2 as pb

WORDS = (
    "search retrieval vector embedding model query passage ranking cluster semantic gpu ray serve "
    "batch token shard router latency throughput recall precision index document sentence"
).split()


def make_texts(n: int, seed: int = 0, max_words: int = 60) -> list[str]:
    """n texts of 1 to max_words words, every 97th of 400 (past 256 tokens), the same for the same seed."""
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        k = rng.choice([1, 3, 8, 20, max_words]) if i % 97 else 400
        texts.append(f"{i}: " + " ".join(rng.choice(WORDS) for _ in range(k)))
    return texts


def text_inputs(texts) -> list[pb.EmbedInput]:
    return [pb.EmbedInput(text=t) for t in texts]


def vectors_of(response) -> np.ndarray:
    """The float vectors of an EmbedResponse (VECTOR_ENCODING_FLOAT), one row per input."""
    return np.array([list(e.values) for e in response.embeddings], dtype=np.float32)
