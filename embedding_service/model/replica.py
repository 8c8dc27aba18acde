"""The one contract every kind of model replica keeps (kinds.py lists the kinds and their classes).

A kind says four things: how it loads its model (`load`), how a shard becomes rows the model runs and the tokens
of each (`prepare`: tokenization, REJECT's refusals), how one forward pass of rows runs (`forward`, in the
batcher's worker thread), and how the rows' outputs become the caller's result (`shape`). Everything else is
here, once for every kind: the device watchdog (heartbeats to the fleet, GPU checks, quarantine), Serve's health
check and stop, the refused and deadline checks, the continuous batcher (shards that arrive while the model
computes are gathered and run in passes of similar lengths within the token budget), device faults reported as
such, the spans and metrics of each stage, and the model's libraries' exceptions kept in this process.

Serve calls `compute` with each shard (a ShardRequest) and `describe` for the model's ModelInfo.
"""

from __future__ import annotations

import abc
import asyncio
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from embedding_service.batching.continuous import ContinuousBatcher
from embedding_service.batching.waiters import DEADLINE, Expired
from embedding_service.config import ModelSettings, TracingSettings
from embedding_service.model.forward import plan_passes
from embedding_service.model.watchdog import Placement, ReplicaWatchdog, current_placement, load_check
from embedding_service.observability.logs import service_logger
from embedding_service.observability.metrics import ModelMetrics, keep_gauges_set
from embedding_service.observability.tracing import service_tracer, set_attributes, wall_ns
from embedding_service.wire.deadline import Deadline
from embedding_service.wire.messages import (
    ModelInfo,
    ReplicaError,
    ReplicaFaulted,
    ReplicaRefused,
    ShardRequest,
    ShardResult,
)
from embedding_service.wire.reasons import ServiceError

logger = service_logger(__name__)


@dataclass(frozen=True)
class Loaded:
    """What `load` tells the base: the model's description (its device, backend and start-up check in it) and the
    settings it runs without (each logged at WARNING where it was decided, counted here)."""

    info: ModelInfo
    not_applied: tuple[str, ...] = ()


@dataclass
class Rows:
    """A shard as the model runs it (what `prepare` returns)."""

    rows: list  # what `forward` takes: one per sequence the model runs
    lengths: np.ndarray  # tokens of each row as it runs: passes are planned by them
    counts: np.ndarray  # tokens of each input of the shard (its usage)
    too_long: list[int] = field(default_factory=list)  # positions REJECT refused: nothing runs
    group: Hashable = None  # rows of different groups never share a pass (an embedding prompt's pooling)
    state: Any = None  # what `shape` needs besides the outputs


@dataclass
class _Pending:
    rows: list
    lengths: np.ndarray
    group: Hashable
    enqueued_ns: int  # perf_counter_ns


@dataclass(frozen=True)
class _Batch:
    """One gathered batch as it ran, for the spans of the shards in it (wall-clock ns)."""

    started_wall_ns: int
    ended_wall_ns: int
    sequences: int
    padded_tokens: int


@dataclass
class _Computed:
    out: np.ndarray  # one output row per row of the shard
    queue_ns: int
    inference_ns: int
    batch: _Batch


class ServedKind(abc.ABC):
    """A model replica of one kind: subclasses define `kind`, `span` and the four methods below; Serve builds it with
    (settings, fleet handle, heartbeat seconds, tracing)."""

    kind: ClassVar[str]
    span: ClassVar[str]  # the replica's span name: model.<span> (model.embed, model.rerank, ...)
    refused: str | None = None  # why the replica refuses to serve (its start-up check failed)

    def __init__(self, settings: ModelSettings, fleet: Any, heartbeat_s: float, tracing: TracingSettings | None = None,
                 placement: Placement | None = None) -> None:
        """`placement` defaults to asking Ray (tests that build a replica by hand give it)."""
        loaded = self.load(settings)
        self.settings, self.info = settings, loaded.info
        self.device, self.backend = loaded.info.device, loaded.info.backend
        verification = loaded.info.verification
        self.refused = verification.refused if verification is not None else None
        self._max_tokens = settings.forward_token_budget(self.device)
        self.metrics = ModelMetrics(model=settings.name, backend=self.backend, kind=settings.kind)
        for setting in loaded.not_applied:
            self.metrics.settings_not_applied.inc(tags={"setting": setting})
        self.tracer = service_tracer(tracing or TracingSettings(), "model")
        self._batcher = ContinuousBatcher(self._run_batch, max_size=settings.max_batch_size,
                                          size=lambda pending: len(pending.rows),
                                          max_wait_s=settings.batch_wait_timeout_s,
                                          on_drop=lambda pending, reason: self._dropped(len(pending.rows), reason),
                                          on_depth=self.metrics.queue_depth.set)
        self.watchdog = ReplicaWatchdog(fleet, settings.name, self.device, placement or current_placement(),
                                        load_check(settings.gpu_check), settings.gpu_check_args, self.refused)
        self.replica_id = self.watchdog.placement.replica_id
        self._closed = False
        # Serve builds the replica on its event loop: the first heartbeat goes out at once.
        self.watchdog.start(heartbeat_s)
        self._gauges = asyncio.get_running_loop().create_task(
            keep_gauges_set(lambda: self.metrics.queue_depth.set(self._batcher.depth)))
        logger.info("%s model %s loaded from %s on %s (%s)", self.kind, settings.name, settings.path, self.device,
                    self.backend)

    # ---- what a kind defines ----------------------------------------------

    @abc.abstractmethod
    def load(self, settings: ModelSettings) -> Loaded:
        """Loads the model (and checks it, when its precision has a gate); keeps what it computes with."""

    @abc.abstractmethod
    async def prepare(self, request: ShardRequest) -> Rows:
        """The shard's rows and their tokens (a long shard's tokenization off the event loop)."""

    @abc.abstractmethod
    def forward(self, rows: list, group: Hashable) -> np.ndarray:
        """One forward pass of rows of one group: an output row per row (float32)."""

    @abc.abstractmethod
    async def shape(self, out: np.ndarray, rows: Rows, request: ShardRequest) -> ShardResult:
        """The caller's result from the outputs of the shard's rows (its vectors, scores or terms, and counts)."""

    # ---- what Serve calls --------------------------------------------------

    def describe(self) -> ModelInfo:
        return self.info

    async def compute(self, request: ShardRequest) -> ShardResult:
        """One shard: checked, prepared, batched with others, forwarded and shaped, each stage measured."""
        with self.tracer.span(f"model.{self.span}", kind="SERVER", parent=request.trace_context,
                              attributes={"embedding.model": self.info.name, "embedding.kind": self.kind,
                                          "embedding.backend": self.backend,
                                          "embedding.inputs": len(request.inputs)}) as span:
            try:
                return await self._compute(request, span)
            except (Expired, ServiceError, ReplicaFaulted, ReplicaRefused):
                raise
            except Exception as exc:  # the model's libraries' own exceptions stay here (the router loads none)
                raise ReplicaError(f"{type(exc).__name__}: {exc}") from None

    async def check_health(self) -> None:
        """Serve's health check: fails on a quarantined node, so Serve replaces this replica elsewhere."""
        if self.watchdog.quarantine_reason is not None:
            raise RuntimeError(f"node {self.watchdog.placement.node_id} is quarantined: {self.watchdog.quarantine_reason}")
        if self.watchdog.stopped:
            raise RuntimeError("the device watchdog stopped")
        if self._gauges.done():
            raise RuntimeError("the metrics reporter stopped")

    async def close(self) -> None:
        """Leaves the recycler's view (its model's health follows at once) and stops the background work."""
        self._closed = True
        self._gauges.cancel()
        self._batcher.close()
        await self.watchdog.leave()
        try:  # its last spans out, without holding up the stop for a collector that is down
            await asyncio.wait_for(asyncio.to_thread(self.tracer.shutdown), timeout=5)
        except asyncio.TimeoutError:
            logger.warning("replica %s: spans not flushed within 5 s", self.replica_id)

    def __del__(self):
        # Serve calls this once the replica's calls in flight have finished (scale-down, upgrade) and awaits
        # what it returns; a plain garbage collection gets None.
        if getattr(self, "_closed", True):
            return None
        return self.close()

    # ---- the stages, the same for every kind -------------------------------

    async def _compute(self, request: ShardRequest, span) -> ShardResult:
        self._check_serving(request)
        started, started_wall = time.perf_counter_ns(), wall_ns()
        rows = await self.prepare(request)
        self._timed("tokenize", self.metrics.tokenize_seconds, (time.perf_counter_ns() - started) / 1e9)
        self.tracer.record("tokenize", started_wall, wall_ns())
        set_attributes(span, **{"embedding.tokens": int(rows.counts.sum())})
        if rows.too_long:
            return ShardResult(vectors=None, token_counts=rows.counts, too_long=list(rows.too_long))
        computed = await self._forward_queued(rows, request.deadline)
        result = await self.shape(computed.out, rows, request)
        result.queue_ns, result.inference_ns = computed.queue_ns, computed.inference_ns
        return result

    def _check_serving(self, request: ShardRequest) -> None:
        """Refused replica, or the caller's deadline passed: before any work on the shard."""
        if self.refused is not None:  # routing keeps calls away; one sent before the router heard is retried
            raise ReplicaRefused(f"replica {self.replica_id} refuses to serve: {self.refused}")
        if request.deadline.expired():
            self._dropped(len(request.inputs), DEADLINE)
            raise Expired("the caller's deadline passed before the shard reached the model")

    async def _forward_queued(self, rows: Rows, deadline: Deadline) -> _Computed:
        """The shard's rows through the batcher, its queue and forward spanned; an inference error that is a
        device fault is reported as one, so the router sends the shard elsewhere and the recycler quarantines
        the node."""
        queued_wall = wall_ns()
        try:
            computed = await self._batcher.submit(
                _Pending(rows.rows, rows.lengths, rows.group, time.perf_counter_ns()), deadline)
        except Expired:
            raise
        except Exception as exc:
            fault = await self.watchdog.device_fault()
            if fault is not None:
                raise ReplicaFaulted(f"device fault on node {self.watchdog.placement.node_id}: {fault}") from exc
            raise
        batch = computed.batch
        self._timed("queue", self.metrics.queue_seconds, computed.queue_ns / 1e9)
        self.tracer.record("queue", queued_wall, batch.started_wall_ns)
        self.tracer.record("forward", batch.started_wall_ns, batch.ended_wall_ns,
                           {"embedding.batch_sequences": batch.sequences,
                            "embedding.batch_padded_tokens": batch.padded_tokens})
        return computed

    def _run_batch(self, items: list[_Pending]) -> list[_Computed]:
        """One gathered batch, in the batcher's worker thread: each group's rows longest first, in passes within
        forward_batch_size and the token budget (plan_passes)."""
        start_ns, started_wall = time.perf_counter_ns(), wall_ns()
        outputs: list[np.ndarray | None] = [None] * len(items)
        padded = real = 0
        for group in dict.fromkeys(i.group for i in items):
            members = [k for k, i in enumerate(items) if i.group == group]
            rows = [r for k in members for r in items[k].rows]
            lengths = np.concatenate([items[k].lengths for k in members])
            out: np.ndarray | None = None
            for passed in plan_passes(lengths.tolist(), self.settings.forward_batch_size, self._max_tokens):
                padded += int(lengths[passed[0]]) * len(passed)  # longest first
                computed = self.forward([rows[k] for k in passed], group)
                if out is None:
                    out = np.empty((len(rows), *computed.shape[1:]), dtype=computed.dtype)
                out[passed] = computed
            real += int(lengths.sum())
            offset = 0
            for k in members:
                n = len(items[k].rows)
                outputs[k] = out[offset : offset + n]
                offset += n
        inference_ns = time.perf_counter_ns() - start_ns
        sequences = sum(len(i.rows) for i in items)
        self._count_batch(sequences, padded, real, inference_ns)
        batch = _Batch(started_wall, wall_ns(), sequences, padded)
        return [_Computed(out, start_ns - item.enqueued_ns, inference_ns, batch) for item, out in zip(items, outputs)]

    # ---- metrics -----------------------------------------------------------

    def _dropped(self, count: int, reason: str) -> None:
        self.metrics.sequences_dropped.inc(count, tags={"reason": reason})

    def _timed(self, stage: str, histogram, seconds: float) -> None:
        histogram.observe(seconds)
        if seconds > 0:
            self.metrics.stage_seconds.inc(seconds, tags={"stage": stage})

    def _count_batch(self, sequences: int, padded: int, real: int, inference_ns: int) -> None:
        m = self.metrics
        m.sequences_forwarded.inc(sequences)
        m.batch_size.observe(sequences)
        m.batch_padded_tokens.observe(padded)
        m.token_slots.inc(padded)
        if padded > real:
            m.padding_tokens.inc(padded - real)
        self._timed("forward", m.forward_seconds, inference_ns / 1e9)


def lengths_of(rows: list) -> np.ndarray:
    """Each row's length (sequences of token ids)."""
    return np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
