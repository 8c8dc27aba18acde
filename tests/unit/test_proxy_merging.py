"""Small Embed calls merged in Serve's proxy (proxy/merging.py), driven directly for what cannot be timed on purpose
through the real proxy: a caller that leaves while it waits, the queue bound, a lone call, the merged deadline."""

from __future__ import annotations

import asyncio
import time

import grpc

from embedding_client.errors import read_details
from embedding_client.v1 import embedding_pb2 as pb
from embedding_service.config import ProxySettings
from embedding_service.proxy.call_context import Detached
from embedding_service.proxy.handlers import merged_unary
from embedding_service.proxy.merging import EmbedMerging, Outcome
from embedding_service.wire.messages import MERGED_KEY
from embedding_service.wire.reasons import Reason
from tests.helpers.grpc_context import Context
from tests.helpers.texts import text_inputs


class _Caller(Context):
    """A caller's gRPC context; once `finished` (its call over, gRPC has freed it) touching it fails."""

    finished = False

    def __getattribute__(self, name):
        if name != "finished" and not name.startswith("_") and object.__getattribute__(self, "finished"):
            raise AssertionError(f"the context of a finished call was touched: {name}")
        return object.__getattribute__(self, name)

    def peer(self):
        return "ipv4:127.0.0.1:50000"

    def auth_context(self):
        return {"transport_security_type": [b"insecure"]}

    def peer_identities(self):
        return None

    def peer_identity_key(self):
        return None


def test_a_merged_call_never_touches_the_context_of_a_caller_who_has_gone():
    """Its first caller's deadline passes while the merged call is out; the call reads what Serve reads of
    that caller after it, from what was taken while it was there."""
    read: list = []

    async def main():
        gates = [asyncio.Event(), asyncio.Event()]

        async def send(request, context, extra, deadline, arrived) -> Outcome:
            await gates[len(read)].wait()
            read.append((context.peer(), context.auth_context(), context.invocation_metadata(), extra))
            reply = pb.EmbedResponse(model="m")
            for i, _ in enumerate(request.inputs):
                reply.embeddings.add(index=i, tokens=1)
            return Outcome(reply.SerializeToString())

        merging = EmbedMerging(ProxySettings(coalesce_max_in_flight=1), send, Detached)

        def call(text: str, context):
            return asyncio.ensure_future(merged_unary(
                merging, pb.EmbedRequest(model="m", inputs=text_inputs([text])), context, "Embed"))

        busy = call("busy", _Caller(metadata=[("x-key", "k")], remaining=30))
        await asyncio.sleep(0.05)
        leaving = _Caller(metadata=[("x-key", "k")], remaining=0.3)
        staying = _Caller(metadata=[("x-key", "k")], remaining=30)
        calls = [call("leaves", leaving), call("stays", staying)]
        await asyncio.sleep(0.05)
        gates[0].set()  # the busy call ends; the two leave merged, held at the second gate
        await busy
        assert await calls[0] == b"" and leaving.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        leaving.finished = True  # its call is over: gRPC has freed its context
        gates[1].set()
        return await calls[1], staying

    reply, staying = asyncio.run(main())
    assert read[1][3] == ((MERGED_KEY, "2"),)  # the merged call, led by the caller who left
    assert read[1][0] == "ipv4:127.0.0.1:50000" and ("x-key", "k") in read[1][2]
    part = pb.EmbedResponse.FromString(reply)
    assert staying.code() is None and [(e.index, e.tokens) for e in part.embeddings] == [(0, 1)]
    assert part.usage.total_tokens == 1


def test_calls_past_the_proxys_queue_bound_are_refused_with_a_retry_delay():
    async def main():
        gate = asyncio.Event()

        async def send(request, context, extra, deadline, arrived) -> Outcome:
            await gate.wait()
            return Outcome(pb.EmbedResponse(model="m").SerializeToString())

        merging = EmbedMerging(ProxySettings(coalesce_max_in_flight=1, max_queued_calls=2), send, Detached)
        contexts = [_Caller(remaining=30) for _ in range(4)]
        calls = [asyncio.ensure_future(merged_unary(
            merging, pb.EmbedRequest(model="m", inputs=text_inputs([f"call {k}"])), c, "Embed"))
            for k, c in enumerate(contexts)]
        await asyncio.sleep(0.05)  # one out, two waiting: the fourth is refused at once
        refused = contexts[3].code()
        gate.set()
        await asyncio.gather(*calls)
        return refused, contexts

    refused, contexts = asyncio.run(main())
    assert refused == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = read_details(contexts[3].trailing_metadata())
    assert details.reason == Reason.OVERLOADED.name and details.retry_after_s
    assert all(c.code() is None for c in contexts[:3])


def test_a_lone_call_goes_as_it_came_and_a_waiting_caller_gets_its_own_deadline():
    sent: list[tuple[pb.EmbedRequest, tuple]] = []
    release = asyncio.Event

    async def main():
        gate = release()

        async def send(request, context, extra, deadline, arrived) -> Outcome:
            sent.append((request, extra))
            await gate.wait()
            return Outcome(pb.EmbedResponse(model="m").SerializeToString())

        merging = EmbedMerging(ProxySettings(coalesce_max_in_flight=1, coalesce_max_inputs=32), send,
                               Detached)
        first = pb.EmbedRequest(model="m", inputs=text_inputs(["first"]))
        lone = asyncio.ensure_future(merged_unary(merging, first, _Caller(remaining=30), "Embed"))
        await asyncio.sleep(0.05)
        late = _Caller(remaining=0.2)  # queued behind the one in flight; its deadline passes first
        waited = await merged_unary(merging, pb.EmbedRequest(model="m", inputs=text_inputs(["late"])),
                                    late, "Embed")
        gate.set()
        await lone
        return first, waited, late

    first, waited, late = asyncio.run(main())
    assert [(r, extra) for r, extra in sent] == [(first, ())]  # the lone call as it came; the late one never sent
    assert waited == b"" and late.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert read_details(late.trailing_metadata()).reason == Reason.TIMEOUT.name


def test_calls_that_wait_leave_as_one_with_their_count_and_the_last_deadline():
    seen: list[tuple[pb.EmbedRequest, tuple, float | None, float]] = []

    async def main():
        gate = asyncio.Event()

        async def send(request, context, extra, deadline, arrived) -> Outcome:
            seen.append((request, extra, None if deadline is None else deadline.remaining(), time.monotonic() - arrived))
            await gate.wait()
            reply = pb.EmbedResponse(model="m", dimensions=2)
            for i, _ in enumerate(request.inputs):
                reply.embeddings.add(index=i, values=[float(i), 0.0], tokens=i + 1)
            return Outcome(reply.SerializeToString())

        merging = EmbedMerging(ProxySettings(coalesce_max_in_flight=1, coalesce_max_inputs=32), send,
                               Detached)

        def call(texts, remaining):
            return merged_unary(merging, pb.EmbedRequest(model="m", inputs=text_inputs(texts)),
                                _Caller(remaining=remaining), "Embed")

        first = asyncio.ensure_future(call(["a"], 30))
        await asyncio.sleep(0.05)
        waiting = [asyncio.ensure_future(call(["b", "c"], 10)), asyncio.ensure_future(call(["d"], 20))]
        await asyncio.sleep(0.05)
        gate.set()
        return [await first] + [await w for w in waiting]

    replies = [pb.EmbedResponse.FromString(r) for r in asyncio.run(main())]
    merged, extra, remaining, waited = seen[1]
    assert [x.text for x in merged.inputs] == ["b", "c", "d"] and extra == ((MERGED_KEY, "2"),)
    assert 19 < remaining <= 20
    assert 0.04 < waited < 1, "the service's bound counts from the last caller's arrival: it waited 0.05 s"
    assert [[(e.index, e.values[0], e.tokens) for e in r.embeddings] for r in replies[1:]] == \
        [[(0, 0.0, 1), (1, 1.0, 2)], [(0, 2.0, 3)]]
    assert [r.usage.total_tokens for r in replies[1:]] == [3, 3]
