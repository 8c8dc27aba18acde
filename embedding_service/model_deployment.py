"""The model deployment: one sentence-transformers model per replica.

Each call brings one mini-batch (shard). It is tokenized on arrival, then
queued in a continuous batcher: shards that arrive while the model computes
are gathered, sorted by length and run through the model together in a worker
thread, so the event loop keeps accepting and tokenizing meanwhile. A shard
whose caller left or whose deadline passed is dropped before it is tokenized
or run (counted in `embedding_sequences_dropped`). Each stage is measured
(metrics.ModelMetrics) and, with tracing on, spanned under the router's shard call.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from embedding_service.accuracy import corpus
from embedding_service.batching import DEADLINE, ContinuousBatcher, Expired, plan_passes
from embedding_service.calibration import Calibration, calibration_for
from embedding_service.config import ModelSettings, TracingSettings
from embedding_service.gpu_health import load_check
from embedding_service.metrics import ModelMetrics, keep_gauges_set
from embedding_service.quantization import RANGED, quantize, ranges_for
from embedding_service.runtimes import Runtime, load_runtime
from embedding_service.shards import ModelInfo, ShardRequest, ShardResult, postprocess
from embedding_service.tokenization import InputEncoder
from embedding_service.tracing import service_tracer, set_attributes, wall_ns
from embedding_service.verification import Verification, verify

logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class LoadedModel:
    """What a replica computes with: the sentence-transformers model, its backend and its input encoder."""

    model: Any  # sentence_transformers.SentenceTransformer
    device: str
    backend: str
    runtime: Runtime
    encoder: InputEncoder
    # The start-up check of the backend (verification.py); None: not checked (tests that build a replica by hand).
    verification: Verification | None = None
    # The start-up check's reference; its corpus vectors (the gate), when loaded, give the int8/uint8 ranges.
    calibration: Calibration | None = None


@dataclass(frozen=True)
class Placement:
    """Where a replica runs: its Ray node and Serve replica id."""

    node_id: str
    replica_id: str


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


def _resolve_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def load_model(settings: ModelSettings) -> LoadedModel:
    import torch
    from sentence_transformers import SentenceTransformer

    if settings.threads:
        torch.set_num_threads(settings.threads)  # process-wide: holds in the forward thread too
    device = _resolve_device(settings.device)
    source = settings.resolved_path()
    # Always loaded with torch: the tokenizer, the pooling modules and the reference
    # vectors come from it; runtimes.py compiles the transformer for onnx/openvino.
    model = SentenceTransformer(source, device=device, trust_remote_code=settings.trust_remote_code)
    model.eval()
    if settings.max_seq_length is not None:
        model.max_seq_length = settings.max_seq_length
    encoder = InputEncoder(model, settings.long_inputs)
    calibration = calibration_for(model, settings.calibration, gate=settings.precision != "fp32")
    samples = calibration_samples(encoder) if settings.precision == "int8" else []
    backend, runtime = load_runtime(model, settings.backend, device, settings.threads, settings.precision, samples)
    logger.info("model %s loaded from %s on %s (%s, %s)", settings.name, source, device, backend, settings.precision)
    embed = text_embedder(runtime, encoder, settings, device, int(model.get_embedding_dimension()))
    verification = verify(embed, calibration, settings)
    return LoadedModel(model, device, backend, runtime, encoder, verification, calibration)


def text_embedder(runtime: Runtime, encoder: InputEncoder, settings: ModelSettings, device: str,
                  dimension: int) -> Callable[[Sequence[str]], np.ndarray]:
    """texts -> the vectors the replica serves for them (no prompt, truncated at the end): what verify() checks."""

    def embed(texts: Sequence[str]) -> np.ndarray:
        sequences = encoder.prepare(list(texts), "end").sequences
        return forward_sorted(runtime, encoder, sequences, None, settings.forward_batch_size,
                              settings.forward_token_budget(device), device, dimension)[0]

    return embed


def calibration_samples(encoder: InputEncoder, per_batch: int = 8) -> list[dict]:
    """Features of the packaged calibration sentences (never gate sentences), to calibrate int8."""
    texts = corpus().calibration
    return [encoder.features(encoder.prepare(list(texts[i : i + per_batch]), "end").sequences)
            for i in range(0, len(texts), per_batch)]


def forward_sorted(runtime: Runtime, encoder: InputEncoder, sequences: list[np.ndarray], prompt: str | None,
                   max_sequences: int, max_tokens: int, device: str, dimension: int) -> tuple[np.ndarray, int]:
    """The vectors of sequences, run longest first in passes within both budgets (batching.plan_passes), and
    the token slots computed (longest x count, per pass)."""
    out = np.empty((len(sequences), dimension), dtype=np.float32)
    padded = 0
    for rows in plan_passes([len(s) for s in sequences], max_sequences, max_tokens):
        padded += len(sequences[rows[0]]) * len(rows)  # longest first
        features = encoder.features([sequences[k] for k in rows], prompt)
        features = {k: v.to(device) if hasattr(v, "to") else v for k, v in features.items()}
        out[rows] = runtime.embed(features)
    return out, padded


def _placement() -> Placement:
    import ray
    from ray import serve

    return Placement(ray.get_runtime_context().get_node_id(), serve.get_replica_context().replica_id.unique_id)


class ReplicaFaulted(Exception):
    """The replica's device failed; the router retries the shard elsewhere."""


class ReplicaRefused(Exception):
    """The replica's backend failed its start-up check (verification.py); the router retries elsewhere."""


class EmbeddingModel:
    def __init__(
        self,
        settings: ModelSettings,
        recycler,
        heartbeat_s: float,
        tracing: TracingSettings | None = None,
        loaded: LoadedModel | None = None,
        placement: Placement | None = None,
    ) -> None:
        """Serve passes the first four; `loaded` and `placement` default to loading the model and asking Ray."""
        self.settings = settings
        loaded = loaded or load_model(settings)
        placement = placement or _placement()
        self.device, self.backend, self.runtime, self.encoder = loaded.device, loaded.backend, loaded.runtime, loaded.encoder
        self.info = ModelInfo(
            name=settings.name,
            dimension=int(loaded.model.get_embedding_dimension()),
            max_sequence_length=self.encoder.max_length,
            prompts=dict(loaded.model.prompts or {}),
            device=self.device,
            backend=self.backend,
            vocab_size=self.encoder.vocab_size,
            source=settings.path,
            verification=loaded.verification,
            tokenizer_json=self.encoder.tokenizer_json(),
            windows=self.encoder.windows,
        )
        self.refused = loaded.verification.refused if loaded.verification else None
        self._model = loaded.model
        self._calibration = loaded.calibration
        self._corpus: asyncio.Task | None = None  # the calibration corpus's fp32 vectors, made on first need
        self._ranges: dict[tuple[int | None, bool], np.ndarray] = {}
        self._forward_max_tokens = settings.forward_token_budget(self.device)
        self.metrics = ModelMetrics(settings.name, self.backend)
        self.tracer = service_tracer(tracing or TracingSettings(), "model")
        self._batcher = ContinuousBatcher(self._run_batch, max_size=settings.max_batch_size,
                                          size=lambda pending: len(pending.sequences),
                                          max_wait_s=settings.batch_wait_timeout_s,
                                          on_drop=lambda pending, reason: self._dropped(len(pending.sequences), reason),
                                          on_depth=self.metrics.queue_depth.set)
        self.recycler = recycler
        self.node_id, self.replica_id = placement.node_id, placement.replica_id
        self._check = load_check(settings.gpu_check)
        self._quarantine_reason: str | None = None
        self._closed = False
        # Serve builds the replica on its event loop: the first heartbeat goes out at once.
        loop = asyncio.get_running_loop()
        self._watchdog = loop.create_task(self._watch(heartbeat_s))
        self._gauges = loop.create_task(keep_gauges_set(lambda: self.metrics.queue_depth.set(self._batcher.depth)))

    # ---- device health and the recycler ----------------------------------

    async def _device_fault(self) -> str | None:
        return await asyncio.to_thread(self._check, self.device, self.node_id, **self.settings.gpu_check_args)

    async def _heartbeat(self) -> None:
        quarantined, reason = await self.recycler.heartbeat.remote(self.replica_id, self.settings.name, self.node_id,
                                                                   self.refused or "")
        self._quarantine_reason = reason if quarantined else None

    async def _check_and_report(self) -> str | None:
        fault = await self._device_fault()
        if fault is not None:
            logger.error("replica %s on node %s: device fault: %s", self.replica_id, self.node_id, fault)
            await self.recycler.report_failure.remote(self.replica_id, self.node_id, fault)
        return fault

    async def _health_round(self, check_device: bool) -> None:
        try:
            if check_device:
                await self._check_and_report()
            await self._heartbeat()
        except Exception:
            logger.exception("replica %s: health round failed", self.replica_id)

    async def _watch(self, period_s: float) -> None:
        await self._health_round(check_device=False)  # known to the recycler at once
        while True:
            await asyncio.sleep(period_s)
            await self._health_round(check_device=True)

    async def check_health(self) -> None:
        """Serve's health check: fails on a quarantined node, so Serve replaces this replica elsewhere."""
        if self._quarantine_reason is not None:
            raise RuntimeError(f"node {self.node_id} is quarantined: {self._quarantine_reason}")
        if self._watchdog.done():
            raise RuntimeError("the device watchdog stopped")
        if self._gauges.done():
            raise RuntimeError("the metrics reporter stopped")

    async def close(self) -> None:
        """Leaves the recycler's view (its model's health follows at once) and stops the background work."""
        self._closed = True
        self._watchdog.cancel()
        self._gauges.cancel()
        self._batcher.close()
        try:
            await asyncio.wait_for(self.recycler.forget_replica.remote(self.replica_id), timeout=5)
        except Exception:
            logger.warning("replica %s: could not tell the recycler it is leaving", self.replica_id)
        try:  # its last spans out, without holding up the stop for a collector that is down
            await asyncio.wait_for(asyncio.to_thread(self.tracer.shutdown), timeout=5)
        except asyncio.TimeoutError:
            logger.warning("replica %s: spans not flushed within 5 s", self.replica_id)

    def __del__(self):
        # Serve calls this once the replica's calls in flight have finished (scale-down,
        # upgrade) and awaits what it returns; a plain garbage collection gets None.
        if getattr(self, "_closed", True):
            return None
        return self.close()

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
        """The calibration's corpus vectors: loaded with it when its precision's gate needed them, else now, on the
        first int8/uint8 call or GetModel, not at start (a model with no calibration file computes them with fp32
        torch: seconds to minutes on CPU, a replica start's worth; the tests' tiny model rolled past 20 s with them)."""
        if self._calibration is not None and len(self._calibration.gate):
            return self._calibration.gate
        return calibration_for(self._model, self.settings.calibration, gate=True).gate

    # ---- the work -------------------------------------------------------

    def _dropped(self, count: int, reason: str) -> None:
        self.metrics.sequences_dropped.inc(count, tags={"reason": reason})

    async def embed(self, request: ShardRequest) -> ShardResult:
        with self.tracer.span("model.embed", kind="SERVER", parent=request.trace_context,
                              attributes={"embedding.model": self.info.name, "embedding.backend": self.backend,
                                          "embedding.inputs": len(request.inputs)}) as span:
            return await self._embed(request, span)

    async def _embed(self, request: ShardRequest, span) -> ShardResult:
        if self.refused is not None:  # routing keeps calls away; one sent before the router heard is retried
            raise ReplicaRefused(f"replica {self.replica_id} refuses to serve: {self.refused}")
        loop = asyncio.get_running_loop()
        deadline = None if request.timeout_s is None else loop.time() + request.timeout_s
        if deadline is not None and request.timeout_s <= 0:
            self._dropped(len(request.inputs), DEADLINE)
            raise Expired("the caller's deadline passed before the shard reached the model")
        opts = request.options
        prompt = self.info.prompts.get(opts.prompt_name) if opts.prompt_name else None
        started, started_wall = time.perf_counter_ns(), wall_ns()
        prepared = self.encoder.prepare(request.inputs, opts.truncation, prompt)
        enqueued = time.perf_counter_ns()
        self._timed("tokenize", self.metrics.tokenize_seconds, (enqueued - started) / 1e9)
        self.tracer.record("tokenize", started_wall, wall_ns())
        counts = prepared.token_counts
        set_attributes(span, **{"embedding.tokens": int(counts.sum())})
        if prepared.too_long:
            return ShardResult(vectors=None, token_counts=counts, too_long=prepared.too_long)
        queued_wall = wall_ns()
        try:
            computed = await self._batcher.submit(_Pending(prepared.sequences, prompt, enqueued), deadline)
        except Expired:
            raise
        except Exception as exc:
            # An inference error may be a device fault: check now, report, let the router retry.
            fault = await self._check_and_report()
            if fault is not None:
                raise ReplicaFaulted(f"device fault on node {self.node_id}: {fault}") from exc
            raise
        batch = computed.batch
        self._timed("queue", self.metrics.queue_seconds, computed.queue_ns / 1e9)
        self.tracer.record("queue", queued_wall, batch.started_wall_ns)
        self.tracer.record("forward", batch.started_wall_ns, batch.ended_wall_ns,
                           {"embedding.batch_sequences": batch.sequences,
                            "embedding.batch_padded_tokens": batch.padded_tokens})
        vectors = postprocess(prepared.pool(computed.vectors), opts.dimensions, opts.normalize)
        if opts.output != "float":
            ranges = (await self.quantization_ranges(opts.dimensions, opts.normalize))[0] if opts.output in RANGED else None
            vectors = quantize(vectors, opts.output, ranges)
        return ShardResult(vectors, counts, queue_ns=computed.queue_ns, inference_ns=computed.inference_ns)

    def _timed(self, stage: str, histogram, seconds: float) -> None:
        histogram.observe(seconds)
        if seconds > 0:
            self.metrics.stage_seconds.inc(seconds, tags={"stage": stage})

    def _run_batch(self, items: list[_Pending]) -> list[_Computed]:
        """One gathered batch, in the batcher's worker thread."""
        start_ns, started_wall = time.perf_counter_ns(), wall_ns()
        total = sum(len(i.sequences) for i in items)
        # Shards with different prompts may need different pooling features:
        # each prompt group runs on its own.
        outputs: list[np.ndarray | None] = [None] * len(items)
        padded = real = 0
        for prompt in {i.prompt for i in items}:
            members = [k for k, i in enumerate(items) if i.prompt == prompt]
            sequences = [s for k in members for s in items[k].sequences]
            vectors, group_padded = self._forward(sequences, prompt)
            padded += group_padded
            real += sum(len(s) for s in sequences)
            offset = 0
            for k in members:
                n = len(items[k].sequences)
                outputs[k] = vectors[offset : offset + n]
                offset += n
        inference_ns = time.perf_counter_ns() - start_ns
        batch = _Batch(started_wall, wall_ns(), total, padded)
        m = self.metrics
        m.sequences_forwarded.inc(total)
        m.batch_size.observe(total)
        m.batch_padded_tokens.observe(padded)
        m.token_slots.inc(padded)
        if padded > real:
            m.padding_tokens.inc(padded - real)
        self._timed("forward", m.forward_seconds, inference_ns / 1e9)
        return [
            _Computed(vectors=out, queue_ns=start_ns - item.enqueued_ns, inference_ns=inference_ns, batch=batch)
            for item, out in zip(items, outputs)
        ]

    def _forward(self, sequences: list[np.ndarray], prompt: str | None) -> tuple[np.ndarray, int]:
        return forward_sorted(self.runtime, self.encoder, sequences, prompt, self.settings.forward_batch_size,
                              self._forward_max_tokens, self.device, self.info.dimension)
