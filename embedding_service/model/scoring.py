"""The rerank and sparse model deployments: a sentence-transformers CrossEncoder or SparseEncoder per replica.

They serve as embedding replicas do (model/replica.py: the device watchdog, Serve's health and stop, metrics
and spans): each call brings one shard, its token lengths are counted on arrival (the truncation policy
decides here: END cuts as sentence-transformers does, REJECT answers the shard's positions over the maximum),
and shards that arrive while the model computes are gathered in the continuous batcher, sorted by length and
run in forward passes within the token budget (model/forward.plan_passes). A sparse pass is SparseEncoder.encode
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
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from embedding_service.batching.waiters import DEADLINE, Expired
from embedding_service.config import ModelSettings, TracingSettings
from embedding_service.model.forward import model_source, plan_passes, resolve_device
from embedding_service.model.pairs import PairEncoder
from embedding_service.model.replica import ServedReplica
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
from embedding_service.model.watchdog import Placement
from embedding_service.observability.logs import service_logger
from embedding_service.observability.tracing import wall_ns
from embedding_service.wire.messages import (
    ModelInfo,
    ReplicaError,
    ReplicaFaulted,
    ReplicaRefused,
    RerankOptions,
    ShardRequest,
    ShardResult,
    SparseOptions,
    SparseVector,
)
from embedding_service.wire.reasons import ServiceError

logger = service_logger(__name__)


@dataclass
class _Pending:
    rows: list[Any]  # a rerank shard's [query, document] pairs, or a sparse shard's texts
    lengths: np.ndarray  # tokens of each row as the model runs it (truncated), for the passes
    enqueued_ns: int  # perf_counter_ns


@dataclass
class _Computed:
    out: Any  # (n,) raw scores, or the (n, vocab) float32 weights
    queue_ns: int
    inference_ns: int


def _torch_threads(settings: ModelSettings) -> None:
    if settings.threads:
        import torch

        torch.set_num_threads(settings.threads)  # process-wide: holds in the forward thread too


def _counter(tokenizer) -> Any:
    """A tokenizer of the model's own to count tokens with on the event loop: a transformers fast tokenizer keeps
    its padding and truncation as state, which the forward thread sets on every pass, so counting with it there
    raced the passes (a count came back padded)."""
    from tokenizers import Tokenizer

    counter = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    counter.no_padding()
    counter.no_truncation()
    return counter


class _ScoringReplica(ServedReplica):
    """What the rerank and sparse replicas share: the shard's way through the batcher and its spans."""

    info: ModelInfo
    _tokens: Any  # _counter's

    def _lengths(self, rows: list) -> np.ndarray:
        """Tokens of each row (a text, or a (query, document) pair), special tokens included, untruncated."""
        return np.fromiter((len(e.ids) for e in self._tokens.encode_batch(rows, add_special_tokens=True)),
                           dtype=np.int64, count=len(rows))

    def describe(self) -> ModelInfo:
        return self.info

    def _check_serving(self, request: ShardRequest) -> None:
        """Refused replica, or the caller's deadline passed: before any work on the shard."""
        if self.refused is not None:
            raise ReplicaRefused(f"replica {self.replica_id} refuses to serve: {self.refused}")
        if request.deadline.expired():
            self._dropped(len(request.inputs), DEADLINE)
            raise Expired("the caller's deadline passed before the shard reached the model")

    async def _shard(self, request: ShardRequest, rows: list[Any], full: np.ndarray, max_tokens: int) -> tuple[
            _Computed | None, np.ndarray, list[int]]:
        """Runs a shard's rows (`full`: their untruncated tokens): what was computed (None when rows were
        refused), each row's tokens as run, and the positions REJECT refused."""
        self._check_serving(request)
        counts = np.minimum(full, max_tokens)
        if request.options.truncation == "reject":
            too_long = [int(k) for k in np.flatnonzero(full > max_tokens)]
            if too_long:
                return None, full, too_long
        queued_wall = wall_ns()
        computed = await self._queued(_Pending(rows, counts, time.perf_counter_ns()), request.deadline)
        self.tracer.record("queue", queued_wall, queued_wall + computed.queue_ns)
        return computed, counts, []

    async def _spanned(self, method: str, request: ShardRequest, run) -> ShardResult:
        with self.tracer.span(f"model.{method}", kind="SERVER", parent=request.trace_context,
                              attributes={"embedding.model": self.info.name, "embedding.kind": self.info.kind,
                                          "embedding.inputs": len(request.inputs)}):
            try:
                return await run()
            except (Expired, ServiceError, ReplicaFaulted, ReplicaRefused):
                raise
            except Exception as exc:  # the model's libraries' own exceptions stay here (the router loads none)
                raise ReplicaError(f"{type(exc).__name__}: {exc}") from None

    def _passes(self, items: list[_Pending], forward) -> list[_Computed]:
        """Every gathered row through `forward(rows) -> array`, longest first in passes within the budgets."""
        start_ns = time.perf_counter_ns()
        rows = [r for i in items for r in i.rows]
        lengths = np.concatenate([i.lengths for i in items])
        out: np.ndarray | None = None
        padded = 0
        for members in plan_passes(lengths.tolist(), self.settings.forward_batch_size, self._max_tokens):
            padded += int(lengths[members[0]]) * len(members)
            computed = forward([rows[k] for k in members])
            if out is None:
                out = np.empty((len(rows), *computed.shape[1:]), dtype=np.float32)
            out[members] = computed
        inference_ns = time.perf_counter_ns() - start_ns
        self._count_batch(len(rows), padded, int(lengths.sum()), inference_ns)
        results, offset = [], 0
        for item in items:
            n = len(item.rows)
            results.append(_Computed(out[offset : offset + n], start_ns - item.enqueued_ns, inference_ns))
            offset += n
        return results


class RerankModel(_ScoringReplica):
    """A CrossEncoder: documents scored against a query."""

    def __init__(self, settings: ModelSettings, fleet, heartbeat_s: float, tracing: TracingSettings | None = None,
                 placement: Placement | None = None) -> None:
        import torch
        from sentence_transformers import CrossEncoder

        _torch_threads(settings)
        device = resolve_device(settings.device)
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
            self.refused = verification.refused
        tokenizer = self.model.tokenizer
        self._pairs = PairEncoder(self.model)
        self.info = ModelInfo(name=settings.name, dimension=1, max_sequence_length=int(self.model.max_length),
                              prompts={}, device=device, backend="torch", vocab_size=int(tokenizer.vocab_size),
                              source=settings.path, verification=verification,
                              tokenizer_json=tokenizer.backend_tokenizer.to_str(), kind="rerank")
        self._max_tokens = settings.forward_token_budget(device)
        logger.info("rerank model %s loaded from %s on %s", settings.name, settings.path, device)
        self._serve(settings, fleet, heartbeat_s, tracing, device, "torch", placement,
                    size=lambda pending: len(pending.rows))

    async def rerank(self, request: ShardRequest) -> ShardResult:
        return await self._spanned("rerank", request, lambda: self._rerank(request))

    async def _rerank(self, request: ShardRequest) -> ShardResult:
        options: RerankOptions = request.options
        self._check_serving(request)
        # Off the event loop: the query is the router's to bound (max_query_tokens), yet even one within it is
        # tokenized once per shard here, and its documents with it.
        pairs = await asyncio.to_thread(self._pairs.pairs, options.query, request.inputs)
        computed, counts, too_long = await self._shard(request, pairs.rows, pairs.full, self.info.max_sequence_length)
        if computed is None:
            return ShardResult(vectors=None, token_counts=counts, too_long=too_long)
        scores = computed.out
        if options.activation:
            import torch

            scores = self.model.activation_fn(torch.from_numpy(scores)).numpy()
        return ShardResult(scores.astype(np.float32, copy=False), counts, queue_ns=computed.queue_ns,
                           inference_ns=computed.inference_ns)

    def _raw_scores(self, pairs: list[list[str]], batch: int | None = None) -> np.ndarray:
        return self.model.predict(pairs, batch_size=batch or len(pairs), activation_fn=self._identity,
                                  convert_to_numpy=True, show_progress_bar=False)

    def _joined_scores(self, rows: list) -> np.ndarray:
        """Raw scores of joined pairs (PairEncoder): one pass of CrossEncoder.predict's own steps on their
        features, the tokenization done."""
        import torch

        features = self._pairs.features(rows)
        features = {k: v.to(self.model.device) if isinstance(v, torch.Tensor) else v for k, v in features.items()}
        with torch.inference_mode():
            scores = self.model(features)["scores"]
        if scores.ndim > 1 and self.model.num_labels == 1:
            scores = scores.squeeze(-1)
        return scores.float().cpu().numpy()

    def _run_batch(self, items: list[_Pending]) -> list[_Computed]:
        return self._passes(items, self._joined_scores if self._pairs.from_ids else self._raw_scores)


class SparseModel(_ScoringReplica):
    """A SparseEncoder (SPLADE-style): per input, weights over the vocabulary, most of them zero."""

    def __init__(self, settings: ModelSettings, fleet, heartbeat_s: float, tracing: TracingSettings | None = None,
                 placement: Placement | None = None) -> None:
        from sentence_transformers import SparseEncoder

        _torch_threads(settings)
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
            self.refused = verification.refused
        tokenizer = self.model.tokenizer
        self._tokens = _counter(tokenizer)
        self.info = ModelInfo(name=settings.name, dimension=int(self.model.get_embedding_dimension()),
                              max_sequence_length=int(self.model.max_seq_length), prompts={}, device=device,
                              backend="torch", vocab_size=int(tokenizer.vocab_size), source=settings.path,
                              verification=verification, tokenizer_json=tokenizer.backend_tokenizer.to_str(),
                              kind="sparse")
        self._max_tokens = settings.forward_token_budget(device)
        logger.info("sparse model %s loaded from %s on %s", settings.name, settings.path, device)
        self._serve(settings, fleet, heartbeat_s, tracing, device, "torch", placement,
                    size=lambda pending: len(pending.rows))

    async def embed_sparse(self, request: ShardRequest) -> ShardResult:
        return await self._spanned("embed_sparse", request, lambda: self._embed_sparse(request))

    async def _embed_sparse(self, request: ShardRequest) -> ShardResult:
        options: SparseOptions = request.options
        texts = list(request.inputs)
        full = self._lengths(texts)
        computed, counts, too_long = await self._shard(request, texts, full, self.info.max_sequence_length)
        if computed is None:
            return ShardResult(vectors=None, token_counts=counts, too_long=too_long)
        vectors = [self._vector(row, options) for row in computed.out]
        return ShardResult(None, counts, queue_ns=computed.queue_ns, inference_ns=computed.inference_ns,
                           sparse=vectors)

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

    def _run_batch(self, items: list[_Pending]) -> list[_Computed]:
        return self._passes(items, self._weights)
