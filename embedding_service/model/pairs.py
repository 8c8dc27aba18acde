"""A rerank shard's (query, document) pairs as token ids: the query tokenized once per shard, not once per pair.

CrossEncoder.predict tokenizes every pair's texts, so each document paid for the whole query again (32 documents
with a 100,000-character query: 0.8 s counting them on the replica's event loop, then 2.4 s inside predict). Here
the query and the documents are tokenized once each, without special tokens, and each pair is joined by the
model's own tokenizer's post-processing: its truncation (longest_first: the longer of the two is cut first) and its
pair template, what the tokenizer runs on a pair's two encodings after tokenizing its texts. The features are
padded as CrossEncoder.preprocess pads them, so the model computes what predict computes.

A replica checks that at start-up on probe pairs (short; the query, the document or both over the maximum; the
special tokens' own text) against CrossEncoder.preprocess itself. A model whose features differ (a chat template,
inputs flattened for flash attention) keeps CrossEncoder's own tokenization of each pair's texts, logged at WARNING.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tokenizers import Encoding

from embedding_service.model.tokenization import private_copy
from embedding_service.observability.logs import service_logger

logger = service_logger(__name__)


@dataclass(frozen=True)
class Pairs:
    """A shard's pairs as the forward takes them, and their lengths."""

    rows: list[Any]  # each pair's joined Encoding, or its [query, document] texts (PairEncoder.from_ids False)
    full: np.ndarray  # (n,) tokens of each pair untruncated, special tokens included


def _probe_pairs(max_length: int, special: Sequence[str]) -> list[tuple[str, str]]:
    """Pairs that cover what the joining must get right: a short pair, the query or the document or both over the
    model's maximum (either the longer), and the special tokens' own text inside a pair."""
    long = "word " * (max_length + 8)
    marks = " ".join(special)
    return [("what do cats eat", "Cats eat fish and meat."), (long, "a short document"), ("a short query", long),
            (long, long + long), (long + long, long), (long * 3, "a"), (f"{marks} é 日本", f"ü {marks}")]


class PairEncoder:
    def __init__(self, model) -> None:
        """`model`: the replica's CrossEncoder, before any call is served (its tokenizer's state is read here)."""
        hf = model.tokenizer
        probes = _probe_pairs(int(model.max_length), list(hf.all_special_tokens))
        reference = model.preprocess([list(p) for p in probes])
        # preprocess leaves its truncation and padding on the backend: the pairs are cut and padded the same way.
        backend = hf.backend_tokenizer
        truncation = backend.truncation or {}
        padding = backend.padding or {}
        self._content = private_copy(backend)
        self._joiner = private_copy(backend)
        if truncation:
            self._joiner.enable_truncation(**truncation)
        self._special = self._content.num_special_tokens_to_add(is_pair=True)
        # What longest_first leaves of a pair (special tokens aside), and from which end it cuts.
        self._budget = (truncation["max_length"] - self._special
                        if truncation.get("strategy") == "longest_first" and not truncation.get("stride") else None)
        self._cut_from = truncation.get("direction", "right")
        self._pad_id, self._pad_type_id = int(padding.get("pad_id", 0)), int(padding.get("pad_type_id", 0))
        self._pad_left = padding.get("direction") == "left"
        self._pad_multiple = padding.get("pad_to_multiple_of")
        self._type_ids = "token_type_ids" in reference
        self._modality = reference.get("modality")
        joined = [self._joined(q, [d])[0][0] for q, d in probes]
        self.from_ids = _same(reference, self.features(joined))
        if not self.from_ids:
            logger.warning("rerank pairs: CrossEncoder's features for this model are not its tokenizer's join of a "
                           "query's and a document's tokens; each pair is tokenized as text by CrossEncoder")

    def query_tokens(self, query: str) -> Encoding:
        """A query's tokens, special tokens left out: their count is what max_query_tokens bounds, and pairs() takes
        them so that the query is tokenized once."""
        return self._content.encode(query, add_special_tokens=False)

    def pairs(self, query: str, documents: Sequence[str], head: Encoding | None = None) -> Pairs:
        """The pairs of `query` with each document, the query tokenized once (`head`: its query_tokens already)."""
        rows, full = self._joined(query if head is None else head, documents)
        return Pairs(rows if self.from_ids else [[query, d] for d in documents], full)

    def _joined(self, query: str | Encoding, documents: Sequence[str]) -> tuple[list[Encoding], np.ndarray]:
        """Each pair's encoding as the tokenizer makes it of the pair's texts (truncated, its special tokens in),
        and each pair's untruncated length."""
        head = self.query_tokens(query) if isinstance(query, str) else query
        tails = self._content.encode_batch(list(documents), add_special_tokens=False)
        full = np.fromiter((len(head) + len(d) + self._special for d in tails), dtype=np.int64, count=len(tails))
        self._cut_query(head, tails)
        return [self._joiner.post_process(head, d, add_special_tokens=True) for d in tails], full

    def _cut_query(self, head: Encoding, tails: Sequence[Encoding]) -> None:
        """Cuts the query's tokens, once, to one more than the larger of the pair budget and the longest document:
        longest_first decides from the budget, the shorter side's length and which side is longer, none of which
        this changes, so every pair keeps the same tokens; but each pair copies the query, and a 19,000-token
        query cost 50 ms a pair (the cut-off tokens become overflow pieces, each templated again)."""
        if self._budget is None or not tails:
            return
        keep = max(self._budget, max(len(d) for d in tails)) + 1
        if len(head) > keep:
            head.truncate(keep, direction=self._cut_from)

    def features(self, rows: Sequence[Encoding]) -> dict[str, Any]:
        """The padded tensors of joined pairs, as CrossEncoder.preprocess returns them for the same texts."""
        width = max(len(e) for e in rows)
        if self._pad_multiple:
            width = -(-width // self._pad_multiple) * self._pad_multiple
        ids = np.full((len(rows), width), self._pad_id, dtype=np.int64)
        types = np.full((len(rows), width), self._pad_type_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for row, e in enumerate(rows):
            cols = slice(width - len(e), width) if self._pad_left else slice(0, len(e))
            ids[row, cols] = e.ids
            types[row, cols] = e.type_ids
            mask[row, cols] = e.attention_mask
        features: dict[str, Any] = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
        if self._type_ids:
            features["token_type_ids"] = torch.from_numpy(types)
        if self._modality is not None:
            features["modality"] = self._modality
        return features


def _same(reference: dict[str, Any], ours: dict[str, Any]) -> bool:
    """The same keys, and equal tensors and values under each."""
    if set(reference) != set(ours):
        return False
    for key, value in reference.items():
        other = ours[key]
        if isinstance(value, torch.Tensor):
            if not isinstance(other, torch.Tensor) or value.shape != other.shape or not torch.equal(value.cpu(), other):
                return False
        elif value != other:
            return False
    return True
