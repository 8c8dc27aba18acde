"""Coalescing in the router: the Coalescer on its own, its send standing in for the handle call to a model replica
(which tests/cluster/test_coalescing.py makes for real)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from embedding_service.batching.coalescing import Coalescer, KeyedCoalescers
from embedding_service.batching.waiters import CANCELLED, DEADLINE, Expired
from embedding_service.wire.deadline import UNBOUNDED, Deadline
from embedding_service.wire.messages import ShardResult

LIMIT = 16


class _Model:
    """Records each merged call; the first waits until released (a busy replica). An input "LONG" is
    rejected as the replica rejects an over-long input under truncation REJECT: no vectors for the shard."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[list[str]] = []
        self.release = asyncio.Event()
        self.fail = fail

    async def send(self, inputs: list[str], deadline) -> ShardResult:
        self.calls.append(list(inputs))
        if len(self.calls) == 1:
            await self.release.wait()
        if self.fail:
            raise RuntimeError("replica gone")
        counts = np.array([len(x) for x in inputs])
        rejected = [i for i, x in enumerate(inputs) if x == "LONG"]
        if rejected:
            return ShardResult(None, counts, too_long=rejected)
        return ShardResult(np.array([[len(x), i] for i, x in enumerate(inputs)], dtype=np.float32), counts)


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def _busy(**options) -> tuple[_Model, Coalescer, asyncio.Future]:
    """A coalescer with one slot, taken by a call the model holds until released."""
    model = _Model()
    coalescer = Coalescer(model.send, max_inputs=LIMIT, max_in_flight=1, split=ShardResult.part, **options)
    blocker = asyncio.ensure_future(coalescer.submit(["x"], UNBOUNDED))
    await _settle()
    return model, coalescer, blocker


def test_calls_that_wait_leave_together_and_each_gets_its_own_rows():
    async def main():
        model = _Model()
        coalescer = Coalescer(model.send, max_inputs=LIMIT, max_in_flight=1, split=ShardResult.part)
        first = asyncio.ensure_future(coalescer.submit(["a"], UNBOUNDED))
        await _settle()
        assert model.calls == [["a"]]  # a lone call goes at once
        waiting = [asyncio.ensure_future(coalescer.submit(x, UNBOUNDED)) for x in (["bb", "c"], ["ddd"], ["ee", "f", "g"])]
        await _settle()
        model.release.set()
        results = await asyncio.gather(first, *waiting)
        assert model.calls == [["a"], ["bb", "c", "ddd", "ee", "f", "g"]]
        # Each caller: its own vectors in its own order, its own token counts.
        assert [r.vectors[:, 0].tolist() for r in results] == [[1], [2, 1], [3], [2, 1, 1]]
        assert [r.token_counts.tolist() for r in results] == [[1], [2, 1], [3], [2, 1, 1]]

    asyncio.run(main())


def test_merged_calls_stay_within_the_input_limit_and_never_split_a_caller():
    async def main():
        model, coalescer, blocker = await _busy()
        sizes = [5, 9, 3, 16, 1, 7]
        calls = [asyncio.ensure_future(coalescer.submit([f"{k}"] * n, UNBOUNDED)) for k, n in enumerate(sizes)]
        await _settle()
        model.release.set()
        results = await asyncio.gather(blocker, *calls)
        assert [len(c) for c in model.calls[1:]] == [14, 3, 16, 8]  # 5+9 | 3 (16 would not fit) | 16 | 1+7
        assert all(len(c) <= LIMIT for c in model.calls)
        assert [len(r.token_counts) for r in results[1:]] == sizes

    asyncio.run(main())


def test_callers_that_fill_a_merged_call_leave_without_waiting_for_a_slot():
    async def main():
        model, coalescer, blocker = await _busy()
        partial = asyncio.ensure_future(coalescer.submit(["p"] * 10, UNBOUNDED))
        await _settle()
        assert len(model.calls) == 1  # 10 of 16 inputs: it waits for the slot
        filling = asyncio.ensure_future(coalescer.submit(["f"] * 6, UNBOUNDED))
        await _settle()
        assert [len(c) for c in model.calls] == [1, 16]  # full: it left while the slot was still taken
        more = [asyncio.ensure_future(coalescer.submit(["m"] * 7, UNBOUNDED)) for _ in range(3)]
        await _settle()
        assert [len(c) for c in model.calls] == [1, 16, 14]  # 7+7 (the third would not fit); 7 waits
        model.release.set()
        results = await asyncio.gather(blocker, partial, filling, *more)
        assert [len(c) for c in model.calls] == [1, 16, 14, 7]
        assert [len(r.token_counts) for r in results] == [1, 10, 6, 7, 7, 7]

    asyncio.run(main())


def test_a_rejected_input_fails_only_its_own_caller():
    async def main():
        model, coalescer, blocker = await _busy()
        good = asyncio.ensure_future(coalescer.submit(["ok", "fine"], UNBOUNDED))
        bad = asyncio.ensure_future(coalescer.submit(["short", "LONG"], UNBOUNDED))
        other = asyncio.ensure_future(coalescer.submit(["yes"], UNBOUNDED))
        await _settle()
        model.release.set()
        await blocker
        rejected = await bad
        assert rejected.vectors is None and rejected.too_long == [1]  # its own position
        assert (await good).vectors[:, 0].tolist() == [2, 4]
        assert (await other).vectors[:, 0].tolist() == [3]
        assert model.calls[2] == ["ok", "fine", "yes"]  # the others went again without it

    asyncio.run(main())


def test_expired_and_departed_callers_are_dropped_unsent():
    async def main():
        dropped: list[tuple[int, str]] = []
        sends: list[int] = []
        model, coalescer, blocker = await _busy(on_drop=lambda n, reason: dropped.append((n, reason)),
                                                on_send=sends.append)
        expiring = asyncio.ensure_future(coalescer.submit(["late", "late"], Deadline.after(0.01)))
        leaving = asyncio.ensure_future(coalescer.submit(["gone", "gone", "gone"], UNBOUNDED))
        staying = asyncio.ensure_future(coalescer.submit(["here"], UNBOUNDED))
        await _settle()
        leaving.cancel()
        await asyncio.sleep(0.05)
        model.release.set()
        with pytest.raises(Expired):
            await expiring
        assert (await staying).vectors[:, 0].tolist() == [4]
        await blocker
        assert model.calls == [["x"], ["here"]]
        assert sorted(dropped) == sorted([(2, DEADLINE), (3, CANCELLED)])
        assert sends == [1, 1]

    asyncio.run(main())


def test_a_caller_that_leaves_while_queued_stops_counting_as_waiting_at_once():
    """The proxy refuses calls past a bound on waiting callers: one that left must not hold a place in it until the
    merged call ahead of it returns."""
    async def main():
        dropped: list[tuple[int, str]] = []
        model, coalescer, blocker = await _busy(on_drop=lambda n, reason: dropped.append((n, reason)))
        leaving = [asyncio.ensure_future(coalescer.submit([f"gone {i}"], UNBOUNDED)) for i in range(3)]
        staying = asyncio.ensure_future(coalescer.submit(["here"], UNBOUNDED))
        await _settle()
        assert coalescer.waiting == 4
        for call in leaving:
            call.cancel()
        await _settle()
        assert coalescer.waiting == 1 and dropped == [(1, CANCELLED)] * 3  # while the call ahead is still out
        model.release.set()
        assert (await staying).vectors[:, 0].tolist() == [4]
        await blocker
        assert model.calls == [["x"], ["here"]] and dropped == [(1, CANCELLED)] * 3  # counted once

    asyncio.run(main())


def test_keyed_coalescers_keep_no_key_once_its_callers_are_done():
    """Keys come from callers (model names, options, metadata): one is held only while it has callers queued or in
    flight, whether they were answered, left or ran out of time."""
    async def main():
        models: dict[str, _Model] = {}

        def make(key: str) -> Coalescer:
            models[key] = _Model()
            return Coalescer(models[key].send, max_inputs=LIMIT, max_in_flight=1, split=ShardResult.part)

        keyed = KeyedCoalescers(make)
        answered = asyncio.ensure_future(keyed.submit("a", ["x"], UNBOUNDED))
        queued = asyncio.ensure_future(keyed.submit("a", ["y"], UNBOUNDED))
        leaving = asyncio.ensure_future(keyed.submit("b", ["z"], UNBOUNDED))
        expiring = asyncio.ensure_future(keyed.submit("c", ["w"], Deadline.after(0.01)))
        await _settle()
        assert len(keyed) == 3 and keyed.waiting == 1
        leaving.cancel()
        with pytest.raises(asyncio.TimeoutError):
            await expiring
        await _settle()
        assert len(keyed) == 3, "the calls of b and c are still out"
        for model in models.values():
            model.release.set()
        await asyncio.gather(answered, queued)
        await _settle()
        assert len(keyed) == 0 and keyed.waiting == 0

    asyncio.run(main())


def test_a_failed_call_fails_its_callers_and_the_coalescer_goes_on():
    async def main():
        model = _Model(fail=True)
        coalescer = Coalescer(model.send, max_inputs=LIMIT, max_in_flight=1, split=ShardResult.part)
        first = asyncio.ensure_future(coalescer.submit(["a"], UNBOUNDED))
        await _settle()
        second = asyncio.ensure_future(coalescer.submit(["b"], UNBOUNDED))
        model.release.set()
        for call in (first, second):
            with pytest.raises(RuntimeError, match="replica gone"):
                await call
        model.fail = False
        assert (await coalescer.submit(["cc"], UNBOUNDED)).vectors[:, 0].tolist() == [2]

    asyncio.run(main())


class _Ignored:
    """Metrics nobody reads here: every counter and histogram takes its values and keeps none."""

    def __getattr__(self, name: str) -> _Ignored:
        return self

    def __call__(self, *args, **kwargs) -> None:
        return None


class _RerankReplicas:
    """A model deployment's handle as the router's fanout calls it: `compute.remote(shard)`, awaited; each
    call answers a score per document once released."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.compute = self
        self.queries: set[str] = set()

    def remote(self, request):
        self.queries.add(request.options.query)

        async def answer() -> ShardResult:
            await self.release.wait()
            n = len(request.inputs)
            return ShardResult(np.zeros(n, dtype=np.float32), np.ones(n, dtype=np.int64))

        return _Response(answer())


class _Response:
    def __init__(self, coroutine) -> None:
        self._task = asyncio.ensure_future(coroutine)

    def __await__(self):
        return self._task.__await__()

    def cancel(self) -> None:
        self._task.cancel()


N = 10_000


def test_the_router_keeps_no_rerank_query_once_its_calls_are_done():
    """A rerank call's options (its query) key the router's coalescing: 10,000 distinct queries leave nothing
    keyed once answered (a plain dict of coalescers grew with every new query, forever)."""
    from embedding_service.config import RouterSettings, TracingSettings
    from embedding_service.observability.tracing import service_tracer
    from embedding_service.router.call_observer import ObservedCall
    from embedding_service.router.catalog import ModelCatalog
    from embedding_service.router.fanout import Fanout
    from embedding_service.router.validation import Job
    from embedding_service.wire.messages import RerankOptions

    async def main():
        replicas = _RerankReplicas()
        fanout = Fanout(ModelCatalog({"reranker": replicas}), RouterSettings(coalesce_max_in_flight=4), _Ignored(),
                        service_tracer(TracingSettings(), "router"))

        async def rerank(query: str) -> None:
            job = Job("reranker", ["a document", "another"], RerankOptions(query=query), False, 1)
            async for _ in fanout.results(job, UNBOUNDED, ObservedCall("Rerank", _Ignored())):
                pass

        calls = [asyncio.ensure_future(rerank(f"query {i}")) for i in range(N)]
        while len(replicas.queries) < N and not any(c.done() for c in calls):
            await asyncio.sleep(0.01)
        assert len(fanout.coalescers) == N, "every distinct query is keyed while its call is out"
        replicas.release.set()
        await asyncio.gather(*calls)
        await _settle()
        assert len(replicas.queries) == N
        assert len(fanout.coalescers) == 0 and fanout.coalescers.waiting == 0

    asyncio.run(main())
