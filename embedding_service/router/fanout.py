"""A job's shards on its model's replicas: cut by length, run with bounded concurrency, sent again when a
replica died, and yielded as each finishes.

A job of more than one shard is sorted by token length (counted with the model's tokenizer, see
token_lengths.py) and cut into mini-batches of similar lengths, so little of what the model computes is
padding. A job of one shard may leave in one handle call with other such jobs of the same model and
options (batching/coalescing.py): with many small calls the per-call work of Serve's routing is the limit.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import numpy as np
from ray.serve.handle import DeploymentHandle

from embedding_service.batching.coalescing import Coalescer, KeyedCoalescers
from embedding_service.config import RouterSettings
from embedding_service.observability.logs import service_logger
from embedding_service.observability.metrics import RouterMetrics
from embedding_service.observability.tracing import Tracer
from embedding_service.router.call_observer import ObservedCall
from embedding_service.router.catalog import ModelCatalog
from embedding_service.router.validation import Job, too_long
from embedding_service.wire.deadline import Deadline
from embedding_service.wire.messages import Input, Options, ShardRequest, ShardResult
from embedding_service.wire.reasons import Reason, ServiceError
from embedding_service.wire.serve_failures import cause_label, replica_gone

logger = service_logger(__name__)


@dataclass(frozen=True)
class Shard:
    """Positions (in the request) of the inputs one mini-batch carries."""

    positions: np.ndarray


def plan_shards(inputs: Sequence[Input], shard_size: int, lengths: np.ndarray | None = None) -> list[Shard]:
    """Sort inputs by length and cut them into mini-batches of similar lengths. `lengths`: each input's tokens;
    without them, characters (a text, or both texts of a pair) or token ids."""
    if lengths is None:
        lengths = np.fromiter((sum(map(len, x)) if isinstance(x, tuple) else len(x) for x in inputs), dtype=np.int64,
                              count=len(inputs))
    order = np.argsort(-lengths, kind="stable")
    return [Shard(order[i : i + shard_size]) for i in range(0, len(order), shard_size)]


class Fanout:
    def __init__(self, catalog: ModelCatalog, settings: RouterSettings, metrics: RouterMetrics,
                 tracer: Tracer) -> None:
        self.catalog = catalog
        self.settings = settings
        self.metrics = metrics
        self.tracer = tracer
        # Keyed by the call's options, which hold a rerank's query: a key is dropped once its calls are done.
        self.coalescers: KeyedCoalescers[tuple[str, Options], ShardResult] = KeyedCoalescers(self._coalescer)

    async def results(self, job: Job, deadline: Deadline, call: ObservedCall) -> AsyncIterator[tuple[Shard, ShardResult]]:
        """Runs every shard, yielding each as it finishes; fails fast on the first error or at the deadline."""
        s = self.settings
        lengths = None
        if len(job.inputs) > s.shard_size and s.shard_by_tokens:
            lengths = await self.catalog.token_lengths(job.model, job.inputs, deadline)
        shards = plan_shards(job.inputs, s.shard_size, lengths)
        coalesce = len(shards) == 1 and s.coalesce_max_in_flight > 0
        limit = asyncio.Semaphore(s.max_concurrent_shards)

        async def run(shard: Shard) -> tuple[Shard, ShardResult]:
            inputs = [job.inputs[p] for p in shard.positions]
            if coalesce:
                result = await self.coalescers.submit((job.model, job.options), inputs, deadline)
            else:
                async with limit:
                    result = await self.call(job.model, inputs, job.options, deadline)
            if result.too_long:
                index = int(shard.positions[result.too_long[0]])
                info = await self.catalog.info(job.model, deadline)
                raise too_long(index, int(result.token_counts[result.too_long[0]]), info, job.options.truncation)
            return shard, result

        call.planned(len(shards))
        tasks = [asyncio.ensure_future(run(s)) for s in shards]
        try:
            for next_done in asyncio.as_completed(tasks):
                done = await asyncio.wait_for(next_done, deadline.remaining())
                call.shard_done()
                yield done
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _coalescer(self, key: tuple[str, Options]) -> Coalescer[ShardResult]:
        model, options = key
        m = self.metrics
        return Coalescer(
            lambda inputs, deadline: self.call(model, inputs, options, deadline),
            max_inputs=self.settings.shard_size, max_in_flight=self.settings.coalesce_max_in_flight,
            split=ShardResult.part,
            on_drop=lambda n, reason: m.router_inputs_dropped.inc(n, tags={"model": model, "reason": reason}),
            on_send=lambda callers: m.coalesced_callers.observe(callers, tags={"model": model}))

    async def call(self, model: str, inputs: list[Input], options: Options, deadline: Deadline) -> ShardResult:
        """One shard on one replica of the model, sent again (with backoff) while replicas die under it."""
        s = self.settings
        handle: DeploymentHandle = self.catalog.models[model]
        with self.tracer.span("shard", kind="CLIENT", attributes={"embedding.model": model,
                                                                  "embedding.inputs": len(inputs)}) as span:
            for attempt in range(s.shard_retries + 1):
                request = ShardRequest(inputs, options, deadline=deadline, trace_context=self.tracer.inject())
                response = handle.compute.remote(request)  # every kind's replica serves shards by compute
                try:
                    result = await response
                    if span is not None:
                        span.set_attribute("embedding.attempts", attempt + 1)
                    return result
                except asyncio.CancelledError:
                    response.cancel()  # the replica drops the shard if it has not run it yet
                    raise
                except Exception as exc:
                    if not replica_gone(exc):
                        raise
                    if attempt == s.shard_retries:
                        raise ServiceError(
                            Reason.MODEL_UNAVAILABLE, "model replicas kept failing for this request; retry shortly"
                        ) from exc
                    cause = cause_label(exc)
                    self.metrics.shard_retries.inc(tags={"model": model, "cause": cause})
                    logger.warning("shard of %d inputs failed (%s); retrying", len(inputs), cause)
                    await asyncio.sleep(s.retry_backoff_s * (2**attempt))
        raise AssertionError("unreachable")
