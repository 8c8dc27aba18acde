"""Coalescing REST calls into gRPC: concurrent small embedding requests for the same model and
dimensions and encoding leave the gateway as one Embed call, and its reply is split back per caller.

Measured: with 64 asyncio callers of one sentence each, every REST call was one gRPC call
through Serve's proxy and the router, whose per-call work was the limit (README, benchmark).
A request goes at once while fewer than `coalesce_max_in_flight` merged calls are out for its
key; the ones that arrive meanwhile leave together when one returns or as soon as they fill
`coalesce_max_inputs` (embedding_service.batching.coalescing). A merged call
refused as INVALID_ARGUMENT is sent again per caller, so each caller gets the exact error (or
vectors) it would have got alone. At most `coalesce_max_queued` requests wait; past that `embed` raises
CoalescingFull at once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from embedding_client.errors import InvalidArgument
from embedding_client.v1 import embedding_pb2 as pb
from embedding_service.batching.coalescing import Coalescer, KeyedCoalescers
from embedding_service.wire.deadline import Deadline


@dataclass(frozen=True)
class Reply:
    """One caller's part of an Embed reply: its embeddings in its input order, and its tokens."""

    model: str
    embeddings: Sequence[pb.Embedding]  # the i-th is the caller's input i
    prompt_tokens: int

    @classmethod
    def whole(cls, response: pb.EmbedResponse) -> Reply:
        return cls(response.model, response.embeddings, response.usage.prompt_tokens)


def _split(reply: Reply, offset: int, n: int) -> Reply:
    rows = reply.embeddings[offset : offset + n]
    return Reply(reply.model, rows, sum(e.tokens for e in rows))


def _input_specific(exc: BaseException) -> bool:
    return isinstance(exc, InvalidArgument)


class CoalescingFull(Exception):
    """max_queued requests are waiting to leave already."""


class EmbedCoalescing:
    """Embed calls, small ones merged per (model, dimensions, encoding).

    `call(request, deadline)` makes one Embed call (with retries) within `deadline`.
    """

    def __init__(self, call: Callable[[pb.EmbedRequest, Deadline], Awaitable[pb.EmbedResponse]], max_inputs: int,
                 max_in_flight: int, on_send: Callable[[int], None] = lambda callers: None,
                 max_queued: int = 1024) -> None:
        self._call = call
        self.max_inputs = max_inputs
        self.max_in_flight = max_in_flight
        self.max_queued = max_queued
        self._on_send = on_send
        self._coalescers: KeyedCoalescers[tuple[str, int | None, int], Reply] = KeyedCoalescers(
            lambda key: self._new(*key))

    async def embed(self, model: str, inputs: list[pb.EmbedInput], dimensions: int | None, deadline: Deadline,
                    encoding: int = pb.VECTOR_ENCODING_FLOAT32_LE) -> Reply:
        if self.max_in_flight == 0 or len(inputs) > self.max_inputs:
            return Reply.whole(await self._call(_request(model, inputs, dimensions, encoding), deadline))
        if self._coalescers.waiting >= self.max_queued:
            raise CoalescingFull
        return await self._coalescers.submit((model, dimensions, encoding), inputs, deadline)

    def _new(self, model: str, dimensions: int | None, encoding: int) -> Coalescer[Reply]:
        async def send(inputs: list[pb.EmbedInput], deadline: Deadline) -> Reply:
            return Reply.whole(await self._call(_request(model, inputs, dimensions, encoding), deadline))

        return Coalescer(send, self.max_inputs, self.max_in_flight, split=_split, isolate=_input_specific,
                         on_send=self._on_send, where="in the gateway")


def _request(model: str, inputs: list[pb.EmbedInput], dimensions: int | None, encoding: int) -> pb.EmbedRequest:
    request = pb.EmbedRequest(model=model, inputs=inputs, encoding=encoding)
    if dimensions is not None:
        request.dimensions = dimensions
    return request
