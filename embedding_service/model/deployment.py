"""The model deployment: one sentence-transformers model per replica.

Each call brings one mini-batch (shard). It is tokenized on arrival, then queued in a continuous batcher:
shards that arrive while the model computes are gathered, sorted by length and run through the model
together in a worker thread, so the event loop keeps accepting and tokenizing meanwhile. A shard whose
caller left or whose deadline passed is dropped before it is tokenized or run (counted in
`embedding_sequences_dropped`). Each stage is measured (observability.metrics.ModelMetrics) and, with
tracing on, spanned under the router's shard call.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import numpy as np

from embedding_service.batching.waiters import DEADLINE, Expired
from embedding_service.config import ModelSettings, TracingSettings
from embedding_service.model.calibration import calibration_for
from embedding_service.model.forward import LoadedModel, forward_sorted, load_model
from embedding_service.model.quantization import postprocess, quantize, ranges_for
from embedding_service.model.replica import ServedReplica
from embedding_service.model.tokenization import Prepared
from embedding_service.model.watchdog import Placement
from embedding_service.observability.logs import service_logger
from embedding_service.observability.tracing import set_attributes, wall_ns
from embedding_service.wire.messages import (
    RANGED,
    EmbedOptions,
    ModelInfo,
    ReplicaError,
    ReplicaFaulted,
    ReplicaRefused,
    ShardRequest,
    ShardResult,
)
from embedding_service.wire.reasons import ServiceError

logger = service_logger(__name__)


@dataclass
class _Pending:
    sequences: list[np.ndarray]
    prompt: str | None
    enqueued_ns: int  # perf_counter_ns


@dataclass
class _Computed:
    vectors: np.ndarray
    queue_ns: int
    inference_ns: int
    batch: _Batch


@dataclass(frozen=True)
class _Batch:
    """One gathered batch as it ran, for the spans of the shards in it (wall-clock ns)."""

    started_wall_ns: int
    ended_wall_ns: int
    sequences: int
    padded_tokens: int


def describe(settings: ModelSettings, loaded: LoadedModel) -> ModelInfo:
    encoder = loaded.encoder
    return ModelInfo(
        name=settings.name,
        dimension=loaded.dimension,
        max_sequence_length=encoder.max_length,
        prompts=dict(loaded.model.prompts or {}),
        device=loaded.device,
        backend=loaded.backend,
        vocab_size=encoder.vocab_size,
        source=settings.path,
        verification=loaded.verification,
        tokenizer_json=encoder.tokenizer_json(),
        windows=encoder.windows,
    )


class EmbeddingModel(ServedReplica):
    def __init__(self, settings: ModelSettings, fleet, heartbeat_s: float, tracing: TracingSettings | None = None,
                 loaded: LoadedModel | None = None, placement: Placement | None = None) -> None:
        """Serve passes the first four; `loaded` and `placement` default to loading the model and asking Ray."""
        self.loaded = loaded = loaded or load_model(settings)
        self.info = describe(settings, loaded)
        self.refused = loaded.verification.refused if loaded.verification else None
        self._corpus: asyncio.Task | None = None  # the calibration corpus's fp32 vectors, made on first need
        self._ranges: dict[tuple[int | None, bool], np.ndarray] = {}
        self._forward_max_tokens = settings.forward_token_budget(loaded.device)
        self._serve(settings, fleet, heartbeat_s, tracing, loaded.device, loaded.backend, placement,
                    size=lambda pending: len(pending.sequences))
        for setting in loaded.not_applied:
            self.metrics.settings_not_applied.inc(tags={"setting": setting})

    # ---- what the router asks -------------------------------------------

    def describe(self) -> ModelInfo:
        return self.info

    async def quantization_ranges(self, dimensions: int | None, normalize: bool) -> tuple[np.ndarray, int]:
        """int8/uint8 ranges [2, dims] for vectors of this shape, and the corpus sentences they were taken over."""
        if self._corpus is None or (self._corpus.done() and self._corpus.exception() is not None):
            self._corpus = asyncio.create_task(asyncio.to_thread(self._corpus_vectors))
        corpus = await asyncio.shield(self._corpus)
        key = (dimensions, normalize)
        if key not in self._ranges:
            self._ranges[key] = ranges_for(corpus, dimensions, normalize)
        return self._ranges[key], len(corpus)

    def _corpus_vectors(self) -> np.ndarray:
        """The calibration's corpus vectors: loaded with it when its precision's gate needed them, else now, on
        the first int8/uint8 call or GetModel, not at start (a model with no calibration file computes them
        with fp32 torch: seconds to minutes on CPU)."""
        calibration = self.loaded.calibration
        if calibration is not None and len(calibration.gate):
            return calibration.gate
        return calibration_for(self.loaded.model, self.settings.calibration, gate=True).gate

    async def embed(self, request: ShardRequest) -> ShardResult:
        with self.tracer.span("model.embed", kind="SERVER", parent=request.trace_context,
                              attributes={"embedding.model": self.info.name, "embedding.backend": self.backend,
                                          "embedding.inputs": len(request.inputs)}) as span:
            try:
                return await self._embed(request, span)
            except (Expired, ServiceError, ReplicaFaulted, ReplicaRefused):
                raise
            except Exception as exc:  # the model's libraries' own exceptions stay here (the router loads none)
                raise ReplicaError(f"{type(exc).__name__}: {exc}") from None

    # ---- the work -------------------------------------------------------

    async def _embed(self, request: ShardRequest, span) -> ShardResult:
        if self.refused is not None:  # routing keeps calls away; one sent before the router heard is retried
            raise ReplicaRefused(f"replica {self.replica_id} refuses to serve: {self.refused}")
        if request.deadline.expired():
            self._dropped(len(request.inputs), DEADLINE)
            raise Expired("the caller's deadline passed before the shard reached the model")
        opts = request.options
        prepared, prompt = self._tokenize(request, span)
        counts = prepared.token_counts
        if prepared.too_long:
            return ShardResult(vectors=None, token_counts=counts, too_long=prepared.too_long)
        computed = await self._forward_queued(prepared, prompt, request)
        vectors = await self._shaped(prepared.pool(computed.vectors), opts)
        return ShardResult(vectors, counts, queue_ns=computed.queue_ns, inference_ns=computed.inference_ns)

    def _tokenize(self, request: ShardRequest, span) -> tuple[Prepared, str | None]:
        opts = request.options
        prompt = self.info.prompts.get(opts.prompt_name) if opts.prompt_name else None
        started, started_wall = time.perf_counter_ns(), wall_ns()
        prepared = self.loaded.encoder.prepare(request.inputs, opts.truncation, prompt)
        self._timed("tokenize", self.metrics.tokenize_seconds, (time.perf_counter_ns() - started) / 1e9)
        self.tracer.record("tokenize", started_wall, wall_ns())
        set_attributes(span, **{"embedding.tokens": int(prepared.token_counts.sum())})
        return prepared, prompt

    async def _forward_queued(self, prepared: Prepared, prompt: str | None, request: ShardRequest) -> _Computed:
        """The shard's sequences through the batcher, its queue and forward spanned."""
        queued_wall = wall_ns()
        computed = await self._queued(_Pending(prepared.sequences, prompt, time.perf_counter_ns()), request.deadline)
        batch = computed.batch
        self._timed("queue", self.metrics.queue_seconds, computed.queue_ns / 1e9)
        self.tracer.record("queue", queued_wall, batch.started_wall_ns)
        self.tracer.record("forward", batch.started_wall_ns, batch.ended_wall_ns,
                           {"embedding.batch_sequences": batch.sequences,
                            "embedding.batch_padded_tokens": batch.padded_tokens})
        return computed

    async def _shaped(self, vectors: np.ndarray, opts: EmbedOptions) -> np.ndarray:
        """Matryoshka cut, normalization and the compact type the call asked for."""
        vectors = postprocess(vectors, opts.dimensions, opts.normalize)
        if opts.output == "float":
            return vectors
        ranges = (await self.quantization_ranges(opts.dimensions, opts.normalize))[0] if opts.output in RANGED else None
        return quantize(vectors, opts.output, ranges)

    def _run_batch(self, items: list[_Pending]) -> list[_Computed]:
        """One gathered batch, in the batcher's worker thread."""
        start_ns, started_wall = time.perf_counter_ns(), wall_ns()
        total = sum(len(i.sequences) for i in items)
        # Shards with different prompts may need different pooling features: each prompt group runs on its own.
        outputs: list[np.ndarray | None] = [None] * len(items)
        padded = real = 0
        for prompt in {i.prompt for i in items}:
            members = [k for k, i in enumerate(items) if i.prompt == prompt]
            sequences = [s for k in members for s in items[k].sequences]
            vectors, group_padded = forward_sorted(self.loaded.runtime, self.loaded.encoder, sequences, prompt,
                                                   self.settings.forward_batch_size, self._forward_max_tokens,
                                                   self.device, self.info.dimension)
            padded += group_padded
            real += sum(len(s) for s in sequences)
            offset = 0
            for k in members:
                n = len(items[k].sequences)
                outputs[k] = vectors[offset : offset + n]
                offset += n
        inference_ns = time.perf_counter_ns() - start_ns
        self._count_batch(total, padded, real, inference_ns)
        batch = _Batch(started_wall, wall_ns(), total, padded)
        return [
            _Computed(vectors=out, queue_ns=start_ns - item.enqueued_ns, inference_ns=inference_ns, batch=batch)
            for item, out in zip(items, outputs)
        ]
