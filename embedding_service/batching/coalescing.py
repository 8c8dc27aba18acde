"""Coalescing small calls: concurrent calls for the same model and options leave as one call, and
its result is split back per caller. The router merges one-shard calls into one handle call
(ShardResult.part); the gateway merges REST calls into one gRPC Embed.

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
from typing import Any, Generic, TypeVar

from embedding_service.batching.waiters import CANCELLED, fail_waiters, why_stale
from embedding_service.wire.deadline import Deadline

R = TypeVar("R")


@dataclass(eq=False)  # each caller's own: found in the queue by identity
class _Entry:
    inputs: list[Any]
    future: asyncio.Future
    deadline: Deadline
    context: contextvars.Context  # the caller's (its trace span), for the merged call it leads
    alone: bool = False  # goes in a call of its own (its merged call failed in a way that may be its inputs')


class Coalescer(Generic[R]):
    """`send(inputs, deadline) -> R` carries the merged calls (with the last of their callers' deadlines), each
    with at most `max_inputs` inputs (a caller's own inputs are never split): a call leaves while fewer than
    `max_in_flight` are out, or once the callers queued fill `max_inputs`.

    `split(result, offset, n)` is one caller's part of a merged result, or None when the caller
    must go again without the others (another caller's input was refused). `isolate(exc)`: whether
    a merged call's failure may belong to one caller's inputs only; then each of its callers goes
    again in a call of its own and gets exactly what it would have got alone.
    """

    def __init__(self, send: Callable[[list[Any], Deadline], Awaitable[R]], max_inputs: int,
                 max_in_flight: int, split: Callable[[R, int, int], R | None],
                 isolate: Callable[[BaseException], bool] = lambda exc: False,
                 on_drop: Callable[[int, str], None] = lambda count, reason: None,
                 on_send: Callable[[int], None] = lambda callers: None, where: str = "in the router") -> None:
        self._send = send
        self._split = split
        self._isolate = isolate
        self.max_inputs = max_inputs
        self.max_in_flight = max_in_flight
        self._on_drop = on_drop  # (inputs, CANCELLED or DEADLINE) of each caller dropped unsent
        self._on_send = on_send  # callers in each merged call
        self._where = where
        self._queue: deque[_Entry] = deque()
        self._queued_inputs = 0  # over the entries in _queue
        self._in_flight = 0
        self.on_idle: Callable[[], None] = lambda: None  # told each time nothing is left queued or in flight

    @property
    def waiting(self) -> int:
        """Callers queued, not yet sent."""
        return len(self._queue)

    @property
    def idle(self) -> bool:
        """Nothing queued, nothing in flight: the owner may drop it."""
        return not self._queue and self._in_flight == 0

    def enqueue(self, inputs: list[Any], deadline: Deadline) -> asyncio.Future:
        """Queues the caller now (no await between this and the queue); its result comes on the future,
        and cancelling the future drops the caller unsent."""
        future = asyncio.get_running_loop().create_future()
        entry = _Entry(inputs, future, deadline, contextvars.copy_context())
        self._queue.append(entry)
        self._queued_inputs += len(inputs)
        future.add_done_callback(lambda _: self._left(entry))
        self._pump()
        return future

    def _left(self, entry: _Entry) -> None:
        """A caller that left while queued waits no more, nor counts as waiting (a bound on waiting callers would
        otherwise refuse new ones until the merged call ahead of it finished)."""
        if not entry.future.cancelled():
            return
        try:
            self._queue.remove(entry)
        except ValueError:  # already sent, or dropped by _pump
            return
        self._queued_inputs -= len(entry.inputs)
        self._on_drop(len(entry.inputs), CANCELLED)
        if self.idle:
            self.on_idle()

    async def submit(self, inputs: list[Any], deadline: Deadline) -> R:
        return await self.enqueue(inputs, deadline)

    def _live(self, entry: _Entry) -> bool:
        reason = why_stale(entry.future, entry.deadline, self._where)
        if reason is not None:
            self._on_drop(len(entry.inputs), reason)
        return reason is None

    def _pump(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue and (self._in_flight < self.max_in_flight or self._queued_inputs >= self.max_inputs):
            batch: list[_Entry] = []
            total = 0
            while self._queue:
                entry = self._queue[0]
                if batch and (entry.alone or total + len(entry.inputs) > self.max_inputs):
                    break
                self._queue.popleft()
                self._queued_inputs -= len(entry.inputs)
                if self._live(entry):
                    batch.append(entry)
                    total += len(entry.inputs)
                    if entry.alone:
                        break
            if batch:
                self._on_send(len(batch))
                self._in_flight += 1
                # In its first caller's context: the merged call's span joins that caller's trace.
                batch[0].context.run(loop.create_task, self._run(batch))

    def _requeue(self, entries: list[_Entry]) -> None:
        """Back at the head of the queue, in their order."""
        self._queue.extendleft(reversed(entries))
        self._queued_inputs += sum(len(e.inputs) for e in entries)

    async def _run(self, batch: list[_Entry]) -> None:
        try:
            deadline = Deadline.latest(e.deadline for e in batch)
            inputs = [x for e in batch for x in e.inputs]
            try:
                result = await self._send(inputs, deadline)
            except BaseException as exc:  # every caller in the call learns of its failure
                if len(batch) > 1 and isinstance(exc, Exception) and self._isolate(exc):
                    for e in batch:
                        e.alone = True
                    self._requeue(batch)
                    return
                fail_waiters((e.future for e in batch), exc)
                if not isinstance(exc, Exception):
                    raise
                return
            offset, again = 0, []
            for e in batch:
                n = len(e.inputs)
                part = self._split(result, offset, n)
                offset += n
                if part is None:
                    again.append(e)  # another caller's input was rejected: this one goes again without it
                elif not e.future.done():
                    e.future.set_result(part)
            self._requeue(again)
        finally:
            self._in_flight -= 1
            self._pump()
            if self.idle:
                self.on_idle()



K = TypeVar("K")


class KeyedCoalescers(Generic[K, R]):
    """One Coalescer per key (made by `make(key)` on first use), dropped again once idle: keys that come from
    callers (a model name, options, metadata) are never kept."""

    def __init__(self, make: Callable[[K], Coalescer[R]]) -> None:
        self._make = make
        self._coalescers: dict[K, Coalescer[R]] = {}

    def __len__(self) -> int:
        """Keys with callers queued or in flight."""
        return len(self._coalescers)

    @property
    def waiting(self) -> int:
        """Callers queued, not yet sent, over every key."""
        return sum(c.waiting for c in self._coalescers.values())

    async def submit(self, key: K, inputs: list[Any], deadline: Deadline) -> R:
        """The caller's result; TimeoutError when its own deadline passes first (the merged call it rides in
        may run to a later caller's)."""
        coalescer = self._coalescers.get(key)
        if coalescer is None:
            coalescer = self._coalescers[key] = self._make(key)
            coalescer.on_idle = lambda: self._forget(key, coalescer)
        # Queued before any await, so an idle coalescer dropped by another caller is never this one's.
        return await asyncio.wait_for(coalescer.enqueue(inputs, deadline), deadline.remaining())

    def _forget(self, key: K, coalescer: Coalescer[R]) -> None:
        """Drops an idle coalescer, however its last caller ended (answered, gone, or out of time while the call
        it rode in was still out)."""
        if self._coalescers.get(key) is coalescer:
            del self._coalescers[key]
