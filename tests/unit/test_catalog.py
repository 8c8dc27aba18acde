"""The router's catalog while a model has no replica (its only one is being replaced, in an upgrade): a router
that has not yet asked the model for its description waits for a replica at most until each caller's deadline.
Found in the upgrade test on a loaded machine: a call waited there 92 s, 47 s past its 45 s bound, until the
model's new replica started. The handle here stands in for Serve's deployment handle, whose replica is not
there yet until the test says so; the whole path is run by tests/test_upgrade.py."""

from __future__ import annotations

import asyncio
import time

import pytest
import ray

from embedding_service.router.catalog import ModelCatalog
from embedding_service.wire.deadline import Deadline
from embedding_service.wire.messages import ModelInfo
from embedding_service.wire.reasons import Reason, ServiceError

INFO = ModelInfo(name="m", dimension=4, max_sequence_length=16, prompts={}, device="cpu", backend="torch",
                 vocab_size=10, source="test")


class Method:
    def __init__(self, answers: list) -> None:
        self.answers, self.asked, self.replica = answers, 0, asyncio.Event()

    def remote(self, *args):
        self.asked += 1
        answer = self.answers.pop(0)

        async def reply():
            await self.replica.wait()
            if isinstance(answer, BaseException):
                raise answer
            return answer

        return reply()


class Handle:
    def __init__(self, answers: list) -> None:
        self.describe = Method(answers)


def test_callers_wait_for_a_missing_replica_until_their_own_deadlines_and_share_one_question():
    async def main():
        handle = Handle([INFO])
        catalog = ModelCatalog({"m": handle})
        started = time.monotonic()
        short = asyncio.ensure_future(catalog.info("m", Deadline.after(0.2)))
        long = asyncio.ensure_future(catalog.info("m", Deadline.after(30)))
        with pytest.raises(TimeoutError):
            await short
        waited = time.monotonic() - started
        assert not long.done()  # the first caller's deadline did not end the question the other waits on
        handle.describe.replica.set()  # the new replica starts
        assert await long == INFO
        assert await catalog.info("m", Deadline.after(0)) == INFO  # known now: no wait, even with no time left
        return waited, handle.describe.asked

    waited, asked = asyncio.run(main())
    assert 0.2 <= waited < 1.0 and asked == 1


def test_a_question_no_replica_could_answer_is_asked_again_by_the_next_call():
    gone = ray.exceptions.ActorUnavailableError("the replica stopped", b"\x00" * 16)

    async def main():
        handle = Handle([gone, INFO])
        handle.describe.replica.set()
        catalog = ModelCatalog({"m": handle})
        with pytest.raises(ServiceError) as refused:
            await catalog.info("m", Deadline.after(5))
        return refused.value, await catalog.info("m", Deadline.after(5)), handle.describe.asked

    refused, info, asked = asyncio.run(main())
    assert refused.reason == Reason.MODEL_UNAVAILABLE and refused.retry_after_s
    assert info == INFO and asked == 2
