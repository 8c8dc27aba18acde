"""What every model replica does for Serve, whatever its kind: its device watchdog (heartbeats to the fleet,
GPU checks, quarantine), Serve's health check and stop, its metrics and spans, and the continuous batcher its
shards queue in (an inference error there that is a device fault is reported as one).

model/deployment.py (embedding models) and model/scoring.py (rerank and sparse models) build on it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from embedding_service.batching.continuous import ContinuousBatcher
from embedding_service.batching.waiters import Expired
from embedding_service.config import ModelSettings, TracingSettings
from embedding_service.model.watchdog import Placement, ReplicaWatchdog, current_placement, load_check
from embedding_service.observability.logs import service_logger
from embedding_service.observability.metrics import ModelMetrics, keep_gauges_set
from embedding_service.observability.tracing import service_tracer
from embedding_service.wire.deadline import Deadline
from embedding_service.wire.messages import ReplicaFaulted

logger = service_logger(__name__)


class ServedReplica:
    """Subclasses load their model, then call `_serve`; they define `_run_batch(items) -> results` (in the
    batcher's worker thread) and the methods the router calls."""

    refused: str | None = None

    def _serve(self, settings: ModelSettings, fleet: Any, heartbeat_s: float, tracing: TracingSettings | None,
               device: str, backend: str, placement: Placement | None, size: Callable[[Any], int]) -> None:
        self.settings = settings
        self.device, self.backend = device, backend
        self.metrics = ModelMetrics(model=settings.name, backend=backend, kind=settings.kind)
        self.tracer = service_tracer(tracing or TracingSettings(), "model")
        self._batcher = ContinuousBatcher(self._run_batch, max_size=settings.max_batch_size, size=size,
                                          max_wait_s=settings.batch_wait_timeout_s,
                                          on_drop=lambda pending, reason: self._dropped(size(pending), reason),
                                          on_depth=self.metrics.queue_depth.set)
        self.watchdog = ReplicaWatchdog(fleet, settings.name, device, placement or current_placement(),
                                        load_check(settings.gpu_check), settings.gpu_check_args, self.refused)
        self.replica_id = self.watchdog.placement.replica_id
        self._closed = False
        # Serve builds the replica on its event loop: the first heartbeat goes out at once.
        self.watchdog.start(heartbeat_s)
        self._gauges = asyncio.get_running_loop().create_task(
            keep_gauges_set(lambda: self.metrics.queue_depth.set(self._batcher.depth)))

    def _run_batch(self, items: list) -> list:
        raise NotImplementedError

    # ---- Serve's lifecycle ------------------------------------------------

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

    # ---- shared by every kind -------------------------------------------

    async def _queued(self, pending: Any, deadline: Deadline) -> Any:
        """`pending` through the batcher; an inference error that is a device fault is reported as one, so the
        router sends the shard elsewhere and the recycler quarantines the node."""
        try:
            return await self._batcher.submit(pending, deadline)
        except Expired:
            raise
        except Exception as exc:
            fault = await self.watchdog.device_fault()
            if fault is not None:
                raise ReplicaFaulted(f"device fault on node {self.watchdog.placement.node_id}: {fault}") from exc
            raise

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
