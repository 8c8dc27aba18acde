"""Coalescing small calls in the router: concurrent one-shard calls for the same model and options
leave as one handle call, and their results are split back per caller.

With many small calls the per-call work of the handle call (Serve's routing,
serialization, the replica's request handling) is the limit, not the model. A
call that finds a free slot goes at once (a lone call waits for nothing); calls
that arrive while every slot is busy queue and leave together when one frees.
A caller whose deadline passes while it queues, or who leaves, is dropped before
anything is sent for it; each caller gets its own vectors, token counts and its
own rejected positions, in its own order.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from embedding_service.batching import fail_waiters, why_stale
from embedding_service.shards import Input, ShardResult


@dataclass
class _Entry:
    inputs: list[Input]
    future: asyncio.Future
    deadline: float | None  # event-loop time
    context: contextvars.Context  # the caller's (its trace span), for the merged call it leads


class Coalescer:
    """`send(inputs, deadline) -> ShardResult` carries the merged calls; at most `max_in_flight` at once,
    each with at most `max_inputs` inputs (a caller's own inputs are never split)."""

    def __init__(self, send: Callable[[list[Input], float | None], Awaitable[ShardResult]], max_inputs: int,
                 max_in_flight: int, on_drop: Callable[[int, str], None] = lambda count, reason: None,
                 on_send: Callable[[int], None] = lambda callers: None) -> None:
        self._send = send
        self.max_inputs = max_inputs
        self.max_in_flight = max_in_flight
        self._on_drop = on_drop  # (inputs, CANCELLED or DEADLINE) of each caller dropped unsent
        self._on_send = on_send  # callers in each merged call
        self._queue: deque[_Entry] = deque()
        self._in_flight = 0

    async def submit(self, inputs: list[Input], deadline: float | None) -> ShardResult:
        future = asyncio.get_running_loop().create_future()
        self._queue.append(_Entry(inputs, future, deadline, contextvars.copy_context()))
        self._pump()
        return await future

    def _live(self, entry: _Entry, now: float) -> bool:
        reason = why_stale(entry.future, entry.deadline, now, "in the router")
        if reason is not None:
            self._on_drop(len(entry.inputs), reason)
        return reason is None

    def _pump(self) -> None:
        loop = asyncio.get_running_loop()
        while self._in_flight < self.max_in_flight and self._queue:
            batch: list[_Entry] = []
            total = 0
            while self._queue:
                entry = self._queue[0]
                if batch and total + len(entry.inputs) > self.max_inputs:
                    break
                self._queue.popleft()
                if self._live(entry, loop.time()):
                    batch.append(entry)
                    total += len(entry.inputs)
            if batch:
                self._on_send(len(batch))
                self._in_flight += 1
                # In its first caller's context: the merged call's span joins that caller's trace.
                batch[0].context.run(loop.create_task, self._run(batch))

    async def _run(self, batch: list[_Entry]) -> None:
        try:
            deadlines = [e.deadline for e in batch]
            deadline = None if None in deadlines else max(deadlines)
            inputs = [x for e in batch for x in e.inputs]
            try:
                result = await self._send(inputs, deadline)
            except BaseException as exc:  # every caller in the call learns of its failure
                fail_waiters((e.future for e in batch), exc)
                if not isinstance(exc, Exception):
                    raise
                return
            offset, again = 0, []
            for e in batch:
                n = len(e.inputs)
                part = _part(result, offset, n)
                offset += n
                if part.vectors is None and not part.too_long:
                    again.append(e)  # another caller's input was rejected: this one goes again without it
                elif not e.future.done():
                    e.future.set_result(part)
            self._queue.extendleft(reversed(again))
        finally:
            self._in_flight -= 1
            self._pump()


def _part(result: ShardResult, offset: int, n: int) -> ShardResult:
    """One caller's rows of a merged result."""
    rows = slice(offset, offset + n)
    return ShardResult(
        vectors=None if result.vectors is None else result.vectors[rows],
        token_counts=result.token_counts[rows],
        too_long=[p - offset for p in result.too_long if offset <= p < offset + n],
        queue_ns=result.queue_ns,
        inference_ns=result.inference_ns,
    )
