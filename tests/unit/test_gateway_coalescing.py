"""Coalescing in the gateway on its own (EmbedCoalescing, an in-process upstream): an expired or departed caller is
dropped unsent, and a merged call's failure reaches every caller in it."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from embedding_client.errors import EmbeddingError, Unavailable, error_of
from embedding_client.v1 import embedding_pb2 as pb
from embedding_service.wire.deadline import Deadline
from gateway.coalescing import EmbedCoalescing


class _Upstream:
    """Stands in for the gRPC service: records each call's inputs; the first call waits for `release`."""

    def __init__(self) -> None:
        self.sent: list[list[str]] = []
        self.release = asyncio.Event()

    async def call(self, request: pb.EmbedRequest, deadline: Deadline) -> pb.EmbedResponse:
        self.sent.append([i.text for i in request.inputs])
        if len(self.sent) == 1:
            await self.release.wait()
        response = pb.EmbedResponse(model=request.model)
        for k, item in enumerate(request.inputs):
            response.embeddings.add(index=k, float32_le=np.float32([len(item.text)]).tobytes(), tokens=len(item.text))
        response.usage.prompt_tokens = sum(len(i.text) for i in request.inputs)
        return response


def test_an_expired_or_departed_caller_is_dropped_unsent():
    async def scenario():
        upstream = _Upstream()
        coalescing = EmbedCoalescing(upstream.call, max_inputs=32, max_in_flight=1)
        loop = asyncio.get_running_loop()
        far = Deadline.after(30)

        def submit(text: str, deadline: Deadline):
            return loop.create_task(coalescing.embed("m", [pb.EmbedInput(text=text)], None, deadline))

        first = submit("first", far)
        await asyncio.sleep(0.01)
        expiring = submit("expiring", Deadline.after(0.05))
        leaving = submit("leaving", far)
        waiting = submit("waiting!", far)
        await asyncio.sleep(0.01)
        leaving.cancel()
        await asyncio.sleep(0.1)  # past the expiring caller's deadline
        upstream.release.set()
        replies = await asyncio.gather(first, waiting)
        with pytest.raises(TimeoutError):
            await expiring
        assert upstream.sent == [["first"], ["waiting!"]]
        assert [r.prompt_tokens for r in replies] == [5, 8]

    asyncio.run(scenario())


def test_a_failure_of_a_merged_call_reaches_every_caller_in_it():
    async def scenario():
        gate = asyncio.Event()
        sent = []

        async def call(request, deadline):
            sent.append(len(request.inputs))
            await gate.wait()
            raise _rpc_error(grpc.StatusCode.UNAVAILABLE)

        coalescing = EmbedCoalescing(call, max_inputs=32, max_in_flight=1)
        far = Deadline.after(30)
        tasks = [asyncio.create_task(coalescing.embed("m", [pb.EmbedInput(text=str(i))], None, far)) for i in range(5)]
        await asyncio.sleep(0.01)
        gate.set()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(o, Unavailable) for o in outcomes)
        assert sent == [1, 4]  # not sent again per caller: only INVALID_ARGUMENT may be one caller's

    asyncio.run(scenario())


def _rpc_error(code: grpc.StatusCode) -> EmbeddingError:
    return error_of(code, "scripted")
