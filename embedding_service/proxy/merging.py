"""Small Embed calls merged in the proxy: concurrent ones that would reach the router alike leave as one
call to it, and its reply is cut back per caller.

With many small calls, the work per call between the proxy and the router (Serve's routing, its transport,
the router's own admission) is most of what the service spends. A call goes at once while fewer than
`coalesce_max_in_flight` merged calls are out for its key; the calls that arrive meanwhile leave together
(batching/coalescing.py), at most `coalesce_max_inputs` inputs in one. A lone call goes exactly as it came.

Calls merge only when the router would treat them alike: the same request but for its inputs, the same
metadata but for what is per call (trace context, deadlines, Serve's request id), the same peer host (the
router serves unkeyed callers on loopback only). Each caller gets its own vectors in its own order, its own
token usage, and its own deadline (the merged call runs to the last of theirs). A merged call refused as
INVALID_ARGUMENT (an input too long, a token id out of range) is sent again per caller, so each gets the
error, with its own input's index, or the vectors it would have got alone; any other failure is every
caller's. The router counts each merged call as the calls it carries (MERGED_KEY). At most
`max_queued_calls` calls wait here; past that a call is refused at once (MergingFull), as a full queue refuses.

A call is sent from the merging's own task, which may outlive any of its callers (one whose deadline passed,
who left): what Serve reads of a caller's gRPC context is taken while the caller is there (`detach`), since the
context of a finished call must not be touched again (gRPC frees it: touching it crashed the proxy).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc

from embedding_client.v1 import embedding_pb2 as pb
from embedding_service.batching.coalescing import Coalescer, KeyedCoalescers
from embedding_service.config import ProxySettings
from embedding_service.wire.deadline import ELAPSED_KEY, TIMEOUT_KEY, Deadline
from embedding_service.wire.messages import MERGED_KEY

# Metadata that differs per call without changing what the router does with it.
_PER_CALL = frozenset({TIMEOUT_KEY, ELAPSED_KEY, MERGED_KEY, "traceparent", "tracestate", "request_id",
                       "user-agent", "grpc-accept-encoding", "grpc-encoding"})


@dataclass
class Outcome:
    """What the router's call came to: the reply's bytes and the status Serve set (code None: OK), or
    `raised` when Serve's handler raised."""

    reply: bytes
    code: grpc.StatusCode | None = None
    details: str | bytes | None = None
    trailers: tuple = ()
    raised: bool = False
    _parsed: pb.EmbedResponse | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return not self.raised and self.code in (None, grpc.StatusCode.OK)

    def parsed(self) -> pb.EmbedResponse:
        if self._parsed is None:
            self._parsed = pb.EmbedResponse.FromString(self.reply)
        return self._parsed


# The router's call: (request, the first caller's context, extra metadata, the merged deadline, when the last of its
# callers came to the proxy) -> Outcome.
Send = Callable[[pb.EmbedRequest, object, tuple, Deadline | None, float], Awaitable[Outcome]]


@dataclass(frozen=True)
class _Input:
    caller: _Caller
    item: pb.EmbedInput


@dataclass(eq=False)
class _Caller:
    request: pb.EmbedRequest
    context: object
    arrived: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class Part:
    """One caller's share of an outcome: rows [offset, offset + n) of a merged reply, or all of a lone one."""

    outcome: Outcome
    offset: int = 0
    n: int | None = None  # None: the caller's call went alone; its reply is as the router sent it

    def reply(self) -> bytes:
        if self.n is None or not self.outcome.ok:
            return self.outcome.reply
        whole = self.outcome.parsed()
        part = pb.EmbedResponse(model=whole.model, dimensions=whole.dimensions)
        part.timing.CopyFrom(whole.timing)
        end = self.offset + self.n
        rows = [e for e in whole.embeddings if self.offset <= e.index < end]
        part.embeddings.extend(rows)
        tokens = 0
        for e in part.embeddings:
            e.index -= self.offset
            tokens += e.tokens
        part.usage.prompt_tokens = part.usage.total_tokens = tokens
        return part.SerializeToString()


class MergingFull(Exception):
    """max_queued_calls calls are waiting already."""


class MergeFailed(Exception):
    """A merged call that did not succeed; every caller in it gets its outcome (or goes again alone)."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.code)
        self.outcome = outcome


def _isolate(exc: BaseException) -> bool:
    return isinstance(exc, MergeFailed) and exc.outcome.code == grpc.StatusCode.INVALID_ARGUMENT


class EmbedMerging:
    """Embed calls of at most `coalesce_max_inputs` inputs merged per key; `send` makes the router's call."""

    def __init__(self, settings: ProxySettings, send: Send, detach: Callable[[object], object],
                 on_send: Callable[[int], None] = lambda n: None,
                 on_drop: Callable[[int, str], None] = lambda inputs, reason: None) -> None:
        self.settings = settings
        self._send = send
        self._detach = detach  # a caller's context -> what the router's call may read of it later
        self._on_send = on_send
        self._on_drop = on_drop  # (inputs, CANCELLED or DEADLINE) of each caller dropped unsent
        self._coalescers: KeyedCoalescers[tuple, Part] = KeyedCoalescers(lambda key: self._new())

    def takes(self, request) -> bool:
        s = self.settings
        return s.coalesce_max_in_flight > 0 and isinstance(request, pb.EmbedRequest) and \
            0 < len(request.inputs) <= s.coalesce_max_inputs

    async def embed(self, request: pb.EmbedRequest, context) -> Part:
        """The caller's part; TimeoutError when its own deadline passes while it waits to leave, MergingFull
        when max_queued_calls are waiting."""
        if self._coalescers.waiting >= self.settings.max_queued_calls:
            raise MergingFull
        caller = _Caller(request, self._detach(context))
        return await self._coalescers.submit(_key(request, context), [_Input(caller, x) for x in request.inputs],
                                             Deadline.after(context.time_remaining()))

    def _new(self) -> Coalescer[Part]:
        s = self.settings
        return Coalescer(self._merged, s.coalesce_max_inputs, s.coalesce_max_in_flight, split=_split,
                         isolate=_isolate, on_send=self._on_send, on_drop=self._on_drop, where="in the proxy")

    async def _merged(self, inputs: list[_Input], deadline: Deadline) -> Part:
        first = inputs[0].caller
        # The service's bound counts from the last caller's arrival here (a merged call runs to the last deadline).
        arrived = max(x.caller.arrived for x in inputs)
        if all(x.caller is first for x in inputs):  # alone: as it came
            outcome = await self._send(first.request, first.context, (), None, arrived)
            if not outcome.ok:
                raise MergeFailed(outcome)
            return Part(outcome)
        merged = pb.EmbedRequest()
        merged.CopyFrom(first.request)
        del merged.inputs[:]
        merged.inputs.extend(x.item for x in inputs)
        callers = len({id(x.caller) for x in inputs})
        outcome = await self._send(merged, first.context, ((MERGED_KEY, str(callers)),), deadline, arrived)
        if not outcome.ok:
            raise MergeFailed(outcome)
        return Part(outcome, 0, len(inputs))


def _split(part: Part, offset: int, n: int) -> Part:
    return part if part.n is None else Part(part.outcome, offset, n)


def _key(request: pb.EmbedRequest, context) -> tuple:
    template = pb.EmbedRequest()
    template.CopyFrom(request)
    del template.inputs[:]
    metadata = tuple(sorted((k, v) for k, v in context.invocation_metadata() if k not in _PER_CALL))
    peer_host = context.peer().rpartition(":")[0]  # "ipv4:1.2.3.4:5" -> "ipv4:1.2.3.4"
    return template.SerializeToString(deterministic=True), metadata, peer_host
