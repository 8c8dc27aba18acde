"""The continuous batcher: batches form when the model is free, from what queued meanwhile."""

from __future__ import annotations

import asyncio
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embedding_service.batching.continuous import ContinuousBatcher
from embedding_service.batching.waiters import CANCELLED, DEADLINE, Expired
from embedding_service.model.forward import plan_passes
from embedding_service.wire.deadline import Deadline


class _Model:
    """Records each batch; the first batch blocks until released, as a long forward would."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.batches: list[list[str]] = []
        self.started = threading.Event()
        self.release = threading.Event()
        self.fail_on = fail_on

    def __call__(self, items: list[str]) -> list[str]:
        self.batches.append(list(items))
        self.started.set()
        self.release.wait(10)
        if self.fail_on in items:
            raise RuntimeError("forward failed")
        return [i.upper() for i in items]


async def _until(condition) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition never held")


def test_arrivals_during_a_forward_form_the_next_batch_in_order():
    async def main():
        model = _Model()
        batcher = ContinuousBatcher(model, max_size=100)
        first = asyncio.create_task(batcher.submit("a"))
        await asyncio.to_thread(model.started.wait, 10)
        assert model.batches == [["a"]]  # an idle model starts a lone item at once
        rest = [asyncio.create_task(batcher.submit(x)) for x in "bcdef"]
        await _until(lambda: batcher.queued == 5)  # the event loop kept accepting during the forward
        model.release.set()
        assert await first == "A"
        assert await asyncio.gather(*rest) == list("BCDEF")
        assert model.batches == [["a"], list("bcdef")]
        batcher.close()

    asyncio.run(main())


def test_batches_respect_the_size_budget_and_keep_the_overflow_for_the_next():
    async def main():
        model = _Model()
        batcher = ContinuousBatcher(model, max_size=5, size=len)
        blocker = asyncio.create_task(batcher.submit("x"))
        await asyncio.to_thread(model.started.wait, 10)
        items = ["aa", "bb", "cc", "dddddddd", "e"]  # sizes 2, 2, 2, 8 (alone: over budget), 1
        tasks = [asyncio.create_task(batcher.submit(i)) for i in items]
        await _until(lambda: batcher.queued == len(items))
        model.release.set()
        assert await asyncio.gather(blocker, *tasks) == ["X", "AA", "BB", "CC", "DDDDDDDD", "E"]
        assert model.batches[1:] == [["aa", "bb"], ["cc"], ["dddddddd"], ["e"]]
        batcher.close()

    asyncio.run(main())


def test_a_failed_batch_fails_its_callers_only_and_the_batcher_goes_on():
    async def main():
        model = _Model(fail_on="bad")
        batcher = ContinuousBatcher(model, max_size=10)
        blocker = asyncio.create_task(batcher.submit("x"))
        await asyncio.to_thread(model.started.wait, 10)
        doomed = [asyncio.create_task(batcher.submit(i)) for i in ("bad", "ok")]
        cancelled = asyncio.create_task(batcher.submit("gone"))
        await _until(lambda: batcher.queued == 3)
        cancelled.cancel()
        model.release.set()
        assert await blocker == "X"
        for task in doomed:
            with pytest.raises(RuntimeError, match="forward failed"):
                await task
        assert ["gone"] not in model.batches and all("gone" not in b for b in model.batches)
        assert await batcher.submit("later") == "LATER"
        batcher.close()

    asyncio.run(main())


def test_an_idle_wait_gathers_arrivals_when_asked():
    async def main():
        model = _Model()
        model.release.set()
        batcher = ContinuousBatcher(model, max_size=10, max_wait_s=0.2)
        tasks = [asyncio.create_task(batcher.submit(i)) for i in "ab"]
        await asyncio.sleep(0.01)
        tasks.append(asyncio.create_task(batcher.submit("c")))
        assert await asyncio.gather(*tasks) == ["A", "B", "C"]
        assert model.batches == [["a", "b", "c"]]
        batcher.close()

    asyncio.run(main())


def test_expired_and_abandoned_items_are_dropped_unrun_and_reported():
    async def main():
        model = _Model()
        dropped: list[tuple[str, str]] = []
        batcher = ContinuousBatcher(model, max_size=3, on_drop=lambda item, reason: dropped.append((item, reason)))
        blocker = asyncio.create_task(batcher.submit("x"))
        await asyncio.to_thread(model.started.wait, 10)
        expired = asyncio.create_task(batcher.submit("late", deadline=Deadline.after(0.05)))
        abandoned = asyncio.create_task(batcher.submit("gone"))
        kept = [asyncio.create_task(batcher.submit(i, deadline=Deadline.after(60))) for i in "abc"]
        await _until(lambda: batcher.queued == 5)
        abandoned.cancel()
        await asyncio.sleep(0.1)  # the short deadline passes while the model is busy
        model.release.set()
        assert await blocker == "X"
        with pytest.raises(Expired):
            await expired
        assert await asyncio.gather(*kept) == ["A", "B", "C"]
        # Dropped items took no room: the next batch held all three live ones.
        assert model.batches == [["x"], ["a", "b", "c"]]
        assert sorted(dropped) == [("gone", CANCELLED), ("late", DEADLINE)]
        assert issubclass(Expired, TimeoutError)  # the router maps it to DEADLINE_EXCEEDED
        batcher.close()

    asyncio.run(main())


def test_the_queue_depth_it_reports_counts_waiting_units_held_and_dropped_ones_leaving():
    async def main():
        model = _Model()
        depths: list[int] = []
        batcher = ContinuousBatcher(model, max_size=5, size=len, on_depth=depths.append)
        first = asyncio.create_task(batcher.submit("a"))
        await asyncio.to_thread(model.started.wait, 10)
        assert depths[-1] == 0  # "a" went straight into a batch
        waiting = [asyncio.create_task(batcher.submit(x)) for x in ("bbb", "cc", "dddd")]
        gone = asyncio.create_task(batcher.submit("eeeee"))
        await _until(lambda: depths[-1] == 14)
        gone.cancel()
        model.release.set()
        assert await first == "A"
        # The next batch takes bbb+cc (5 units); dddd is held over; the cancelled one is still queued.
        assert await waiting[0] == "BBB"
        await _until(lambda: len(model.batches) == 3)
        assert await asyncio.gather(*waiting) == ["BBB", "CC", "DDDD"]
        await _until(lambda: depths[-1] == 0)  # the held item ran, the cancelled one was dropped
        assert 9 in depths  # after bbb+cc left: dddd (held) and eeeee (not yet dropped)
        batcher.close()

    asyncio.run(main())


# ---- forward passes within a padded-token budget -------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(1, 600), max_size=200), st.integers(1, 64), st.integers(1, 9000))
def test_token_budget_passes_never_exceed_the_budget(lengths, max_sequences, max_tokens):
    passes = plan_passes(lengths, max_sequences, max_tokens)
    assert sorted(k for p in passes for k in p) == list(range(len(lengths)))  # each sequence once
    for p in passes:
        longest = max(lengths[k] for k in p)
        assert [lengths[k] for k in p] == sorted((lengths[k] for k in p), reverse=True)
        assert len(p) <= max_sequences
        # longest x count within the budget; only a sequence longer than the budget runs alone past it
        assert longest * len(p) <= max_tokens or len(p) == 1


def test_a_replica_runs_long_inputs_in_smaller_passes_with_the_same_vectors(reference_models):
    import numpy as np

    from embedding_service.model.forward import forward_sorted
    from embedding_service.model.runtimes import TorchRuntime
    from embedding_service.model.tokenization import InputEncoder
    from tests.helpers.models import TINY, TINY_DIM

    model = reference_models[TINY]
    shapes = []

    class Recorded(TorchRuntime):
        def embed(self, features):
            shapes.append(tuple(features["input_ids"].shape))
            return super().embed(features)

    texts = ["word " * n for n in (1, 3, 30, 2, 25, 5, 28, 4, 6, 7)]
    encoder = InputEncoder(model)
    vectors, padded = forward_sorted(Recorded(model), encoder, encoder.prepare(texts, "end").sequences, None,
                                     max_sequences=8, max_tokens=64, device="cpu", dimension=TINY_DIM)
    assert all(rows * width <= 64 for rows, width in shapes)
    assert len(shapes) > 2  # the budget, not the 8-sequence bound (2 passes), cut them
    assert padded == sum(rows * width for rows, width in shapes)
    assert np.abs(vectors - model.encode(texts)).max() < 1e-5
