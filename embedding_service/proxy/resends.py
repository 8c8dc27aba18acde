"""Calls sent through Serve's handler, and sent again when their router replica was lost.

A call whose router replica stopped or died before answering (Serve force-kills a router that outlives its
grace in an upgrade, a node fails) is sent again to another router, at most RESENDS times within the
caller's deadline: a unary call whole, an EmbedStream, RerankStream or ClassifyStream with only the inputs it
has not yet returned (their indexes kept). The caller sees nothing of it but the time. Every call sent again
is counted (`embedding_proxy_calls_resent`); one lost past the resends gets the service's reason
(wire/serve_failures.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

from embedding_client.v1 import embedding_pb2 as pb
from embedding_service.observability.logs import service_logger
from embedding_service.proxy.call_context import Attempt
from embedding_service.proxy.merging import Outcome
from embedding_service.proxy.state import this_proxy
from embedding_service.wire.deadline import Deadline

logger = service_logger(__name__)

# Times a call whose router was lost is sent again, and the pause before each (Serve learns of a dead
# replica within a moment; a call sent at once may meet it again).
RESENDS = 2
RESEND_PAUSE_S = (0.2, 1.0)
# A call that waited here to leave merged longer than this tells the router how long (shorter: within any slack).
WAITED_S = 0.01


async def _resend_now(attempt: Attempt, tries: int, remaining: float | None, method: str) -> bool:
    """Whether to send the call again after this attempt lost its router (tries left, `remaining` seconds
    left to its caller); waits first."""
    if tries >= RESENDS or not attempt.router_lost():
        return False
    pause = RESEND_PAUSE_S[min(tries, len(RESEND_PAUSE_S) - 1)]
    if remaining is not None and remaining <= pause:
        return False
    logger.warning("%s: the call's router replica was lost; sending it to another (%d of %d)", method, tries + 1,
                   RESENDS)
    this_proxy().metrics.resent.inc(tags={"method": method})
    await asyncio.sleep(pause)
    return True


async def send_unary(inner: Callable, request, context, method: str, extra: tuple = (),
                     deadline: Deadline | None = None, arrived: float | None = None) -> Outcome:
    """One unary call through Serve's handler `inner`, sent again while its router is lost (within its deadline).
    `arrived`: when the call came to the proxy, for one that waited here to leave merged (else now): the service's
    bound counts from then."""
    if arrived is None:
        arrived = time.monotonic()
    for tries in range(RESENDS + 1):
        spent = time.monotonic() - arrived
        attempt = Attempt(context, spent if tries or spent >= WAITED_S else None, extra, deadline)
        try:
            reply = await inner(request, attempt)
        except Exception:
            logger.exception("Serve's proxy failed a call")
            return Outcome(b"", raised=True)
        remaining = context.time_remaining() if deadline is None else deadline.remaining()
        if await _resend_now(attempt, tries, remaining, method):
            continue
        return attempt.outcome(reply)
    raise AssertionError("unreachable")


async def send_stream(inner: Callable, request, context, method: str) -> AsyncIterator[bytes]:
    """A server stream through Serve's handler `inner`, its messages as they come; when its router is lost, it
    goes on elsewhere with the inputs not yet returned. Its status is set on the caller's `context`."""
    resume = StreamResume(request) if type(request) in RESUMABLE else None
    arrived = time.monotonic()
    for tries in range(RESENDS + 1):
        attempt = Attempt(context, time.monotonic() - arrived if tries else None)
        try:
            async for message in inner(resume.request if resume else request, attempt):
                yield resume.returned(message) if resume else message
        except Exception:
            this_proxy().serve_raised(context, True, method)
            return
        if await _resend_now(attempt, tries, context.time_remaining(), method):
            if resume is None or resume.rest():
                continue
            return  # every input was returned before the router was lost: the stream is whole
        this_proxy().finish(attempt.outcome(b""), context, True, method)
        return


# The streams that go on elsewhere with what they have not returned: request type -> (its list of inputs, the
# chunk type, the chunk's list of results, each with the index of its input).
RESUMABLE = {
    pb.EmbedStreamRequest: ("inputs", pb.EmbedStreamResponse, "embeddings"),
    pb.RerankStreamRequest: ("documents", pb.RerankStreamResponse, "results"),
    pb.ClassifyStreamRequest: ("inputs", pb.ClassifyStreamResponse, "classifications"),
}


class StreamResume:
    """A resumable stream's progress (RESUMABLE), so that it can go on elsewhere with only the inputs it has
    not returned."""

    def __init__(self, request) -> None:
        self.inputs, self.chunk, self.results = RESUMABLE[type(request)]
        self.original = request
        self.request = request
        self._positions: list[int] | None = None  # each input's index in the original; None: the original
        self._returned: set[int] = set()

    def returned(self, message: bytes) -> bytes:
        """A chunk as the caller gets it: each result under its input's index in the original request."""
        chunk = self.chunk.FromString(message)
        if self._positions is None:
            self._returned.update(e.index for e in getattr(chunk, self.results))
            return message
        for e in getattr(chunk, self.results):
            e.index = self._positions[e.index]
            self._returned.add(e.index)
        return chunk.SerializeToString()

    def rest(self) -> bool:
        """The request for the inputs not yet returned; False when none is left."""
        original = getattr(self.original, self.inputs)
        left = [i for i in range(len(original)) if i not in self._returned]
        if not left:
            return False
        request = type(self.original)()
        request.CopyFrom(self.original)
        inputs = getattr(request, self.inputs)
        del inputs[:]
        inputs.extend(original[i] for i in left)
        self.request, self._positions = request, left
        return True
