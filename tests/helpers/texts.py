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


def text_of_tokens(tokenizer, tokens: int, start: int = 0) -> str:
    """Real sentences (the packaged gate's, from the `start`th) cut to exactly `tokens` tokens of `tokenizer` (no
    special tokens), for a byte-level BPE that splits words with their leading space (Qwen's, ModernBERT's), whose
    counts add up word by word; filled to the count with " a" (one token)."""
    from embedding_service.model.accuracy import corpus

    words = [" " + w for w in " ".join(corpus().gate[start:]).split()[: tokens]]
    counts = [len(ids) for ids in tokenizer(words, add_special_tokens=False)["input_ids"]]
    assert len(tokenizer(" a", add_special_tokens=False)["input_ids"]) == 1
    kept, total = [], 0
    for word, count in zip(words, counts):
        if total + count > tokens:
            break
        kept.append(word)
        total += count
    text = "".join(kept) + " a" * (tokens - total)
    assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) == tokens
    return text
