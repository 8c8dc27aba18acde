"""The rerank and sparse model deployments: a sentence-transformers CrossEncoder or SparseEncoder per replica.

Two kinds on model/replica.py's contract: each shard's token lengths are counted on arrival (the truncation
policy decides here: END cuts as sentence-transformers does, REJECT answers the shard's positions over the
maximum), and the base gathers shards in its continuous batcher and runs them in passes within the token budget. A sparse pass is SparseEncoder.encode
over its rows; a rerank shard's pairs are tokenized on arrival, in a thread, the query once for all its documents
(model/pairs.py), and a pass runs CrossEncoder.predict's own steps on their features (or predict itself, for a
model whose pairs cannot be joined from token ids), so what is served is what sentence-transformers computes.

Below fp32 (bf16 on torch) a replica first measures its kind's accuracy gate against the same weights in fp32
(model/scoring_accuracy.py) and refuses to serve when it misses it. Scores are the model's raw logits (CrossEncoder's activation replaced by the identity), and the activation
(sigmoid for one label) is applied to them on request, as CrossEncoder applies it. A sparse vector keeps its
`top_k` heaviest terms, as `SparseEncoder.encode(max_active_dims=top_k)` does, indices ascending.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable

import numpy as np

from embedding_service.config import ModelSettings
from embedding_service.model.forward import model_source, resolve_device, torch_kind_not_applied
from embedding_service.model.pairs import PairEncoder
from embedding_service.model.replica import Loaded, Rows, ServedKind
from embedding_service.model.scoring_accuracy import (
    rerank_accuracy,
    rerank_canary,
    rerank_pairs,
    run_in_passes,
    sparse_accuracy,
    sparse_canary,
    sparse_sentences,
    verify_scoring,
)
from embedding_service.model.tokenization import private_copy
from embedding_service.observability.logs import service_logger
from embedding_service.wire.messages import (
    ModelInfo,
    RerankOptions,
    ShardRequest,
    ShardResult,
    SparseOptions,
    SparseVector,
)

logger = service_logger(__name__)


def torch_threads(settings: ModelSettings) -> None:
    if settings.threads:
        import torch

        torch.set_num_threads(settings.threads)  # process-wide: holds in the forward thread too


def truncated(full: np.ndarray, max_tokens: int, truncation: str) -> tuple[np.ndarray, list[int]]:
    """Tokens of each row as it runs (cut at the maximum), and the positions REJECT refuses (then the untruncated
    counts, for the caller's error)."""
    if truncation == "reject":
        too_long = [int(k) for k in np.flatnonzero(full > max_tokens)]
        if too_long:
            return full, too_long
    return np.minimum(full, max_tokens), []


class RerankScorer:
    """A CrossEncoder loaded (and, below fp32, checked against its fp32 self) as a rerank replica loads it, and its
    scores of (query, document) pairs as sentence-transformers computes them: the replica's and a batch job's
    model actors' one path."""

    def __init__(self, settings: ModelSettings) -> None:
        import torch
        from sentence_transformers import CrossEncoder

        torch_threads(settings)
        device = resolve_device(settings.device)
        self.settings = settings
        self.model = CrossEncoder(model_source(settings.path), device=device, max_length=settings.max_seq_length,
                                  trust_remote_code=settings.trust_remote_code)
        self.model.eval()
        self._identity = torch.nn.Identity()
        verification = None
        if settings.precision == "bf16":  # the fp32 reference first, from the same weights
            (pairs, per_query), canary, batch = rerank_pairs(), rerank_canary(), settings.forward_batch_size

            def outputs() -> tuple[np.ndarray, np.ndarray]:
                return self._raw_scores(canary, batch), self._raw_scores(pairs, batch)

            reference = outputs()
            self.model.to(torch.bfloat16)
            verification = verify_scoring(settings, reference, outputs,
                                          lambda ours, theirs: rerank_accuracy(ours, theirs, per_query))
        tokenizer = self.model.tokenizer
        self.pairs = PairEncoder(self.model)
        self.loaded = Loaded(ModelInfo(
            name=settings.name, dimension=1, max_sequence_length=int(self.model.max_length), prompts={},
            device=device, backend="torch", vocab_size=int(tokenizer.vocab_size), source=settings.path,
            verification=verification, tokenizer_json=tokenizer.backend_tokenizer.to_str(), kind="rerank",
            decode_cleanup=bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))),
            torch_kind_not_applied(settings, device))

    def raw_scores(self, rows: list) -> np.ndarray:
        """One pass over pairs (PairEncoder rows): their raw logits."""
        return self._joined_scores(rows) if self.pairs.from_ids else self._raw_scores(rows)

    def activated(self, scores: np.ndarray) -> np.ndarray:
        """The model's activation on raw scores, as CrossEncoder.predict applies it (sigmoid for one label)."""
        import torch

        return self.model.activation_fn(torch.from_numpy(scores)).numpy().astype(np.float32, copy=False)

    def _raw_scores(self, pairs: list[list[str]], batch: int | None = None) -> np.ndarray:
        return self.model.predict(pairs, batch_size=batch or len(pairs), activation_fn=self._identity,
                                  convert_to_numpy=True, show_progress_bar=False).astype(np.float32, copy=False)

    def _joined_scores(self, rows: list) -> np.ndarray:
        """Raw scores of joined pairs (PairEncoder): one pass of CrossEncoder.predict's own steps on their
        features, the tokenization done."""
        import torch

        features = self.pairs.features(rows)
        features = {k: v.to(self.model.device) if isinstance(v, torch.Tensor) else v for k, v in features.items()}
        with torch.inference_mode():
            scores = self.model(features)["scores"]
        if scores.ndim > 1 and self.model.num_labels == 1:
            scores = scores.squeeze(-1)
        return scores.float().cpu().numpy()


class RerankModel(ServedKind):
    """A CrossEncoder: documents scored against a query."""

    kind = "rerank"
    span = "rerank"

    def load(self, settings: ModelSettings) -> Loaded:
        self.scorer = RerankScorer(settings)
        self._pairs = self.scorer.pairs
        return self.scorer.loaded

    async def prepare(self, request: ShardRequest) -> Rows:
        options: RerankOptions = request.options
        # Off the event loop: the query is the router's to bound (max_query_tokens), yet even one within it is
        # tokenized once per shard here, and its documents with it.
        pairs = await asyncio.to_thread(self._pairs.pairs, options.query, request.inputs)
        counts, too_long = truncated(pairs.full, self.info.max_sequence_length, options.truncation)
        return Rows(pairs.rows, counts, counts, too_long)

    def forward(self, rows: list, group: Hashable) -> np.ndarray:
        return self.scorer.raw_scores(rows)

    async def shape(self, out: np.ndarray, rows: Rows, request: ShardRequest) -> ShardResult:
        scores = self.scorer.activated(out) if request.options.activation else out
        return ShardResult(scores.astype(np.float32, copy=False), rows.counts)


class SparseModel(ServedKind):
    """A SparseEncoder (SPLADE-style): per input, weights over the vocabulary, most of them zero."""

    kind = "sparse"
    span = "embed_sparse"

    def load(self, settings: ModelSettings) -> Loaded:
        from sentence_transformers import SparseEncoder

        torch_threads(settings)
        device = resolve_device(settings.device)
        self.model = SparseEncoder(model_source(settings.path), device=device,
                                   trust_remote_code=settings.trust_remote_code)
        self.model.eval()
        if settings.max_seq_length is not None:
            self.model.max_seq_length = settings.max_seq_length
        # A module may learn its output size on its first forward: SpladePooling saved without embedding_dimension
        # reports the transformer's hidden size, not the vocabulary, until then.
        self.model.encode(["a"])
        verification = None
        if settings.precision == "bf16":  # the fp32 reference first, from the same weights
            import torch

            texts, canary, batch = sparse_sentences(), sparse_canary(), settings.forward_batch_size

            def outputs() -> tuple[np.ndarray, np.ndarray]:
                return self._weights(canary), run_in_passes(texts, batch, self._weights)

            reference = outputs()
            self.model.to(torch.bfloat16)
            verification = verify_scoring(settings, reference, outputs, sparse_accuracy)
        tokenizer = self.model.tokenizer
        self._tokens = private_copy(tokenizer.backend_tokenizer)
        return Loaded(ModelInfo(
            name=settings.name, dimension=int(self.model.get_embedding_dimension()),
            max_sequence_length=int(self.model.max_seq_length), prompts={}, device=device, backend="torch",
            vocab_size=int(tokenizer.vocab_size), source=settings.path, verification=verification,
            tokenizer_json=tokenizer.backend_tokenizer.to_str(), kind="sparse",
            decode_cleanup=bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))),
            torch_kind_not_applied(settings, device))

    async def prepare(self, request: ShardRequest) -> Rows:
        texts = list(request.inputs)
        full = np.fromiter((len(e.ids) for e in self._tokens.encode_batch(texts, add_special_tokens=True)),
                           dtype=np.int64, count=len(texts))
        counts, too_long = truncated(full, self.info.max_sequence_length, request.options.truncation)
        return Rows(texts, counts, counts, too_long)

    def forward(self, rows: list, group: Hashable) -> np.ndarray:
        return self._weights(rows)

    async def shape(self, out: np.ndarray, rows: Rows, request: ShardRequest) -> ShardResult:
        options: SparseOptions = request.options
        return ShardResult(None, rows.counts, sparse=[self._vector(row, options) for row in out])

    def _vector(self, weights: np.ndarray, options: SparseOptions) -> SparseVector:
        active = np.flatnonzero(weights)
        keep = active
        if len(active) > options.top_k:  # the heaviest top_k, as torch.topk picks them in encode(max_active_dims)
            keep = np.sort(active[np.argpartition(-weights[active], options.top_k - 1)[: options.top_k]])
        terms = tuple(self.model.tokenizer.convert_ids_to_tokens(keep.tolist())) if options.return_tokens else None
        return SparseVector(keep.astype(np.int32), weights[keep].astype(np.float32), int(len(active)), terms)

    def _weights(self, texts: list[str]) -> np.ndarray:
        """(n, vocab) float32 term weights, as SparseEncoder.encode computes them."""
        return self.model.encode(texts, batch_size=len(texts), convert_to_tensor=True, convert_to_sparse_tensor=False,
                                 show_progress_bar=False).float().cpu().numpy()
