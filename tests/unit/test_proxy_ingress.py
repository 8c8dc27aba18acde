"""The wrapper around Serve's proxy handlers (proxy/handlers.py, resends.py, call_context.py), driven directly
for what the real proxy cannot be made to do on purpose (Serve's own handler raising, a router lost on cue). What it
can do is tested through the real proxy (test_errors.py, test_overload.py, test_run_command.py, test_upgrade.py) and
against Ray's own gRPC server (test_ray_internals.py)."""

from __future__ import annotations

import asyncio
import inspect
import time

import grpc
import numpy as np
import pytest
from ray.serve._private.proxy_request_response import gRPCStreamingType

from embedding_client.errors import STATUS_DETAILS_KEY, read_details
from embedding_client.v1 import embedding_pb2 as pb
from embedding_service.config import AuthSettings
from embedding_service.proxy import call_context, handlers, resends, state
from embedding_service.wire import node_env
from embedding_service.wire.deadline import ELAPSED_KEY, TIMEOUT_KEY, Deadline
from embedding_service.wire.messages import MERGED_KEY
from embedding_service.wire.reasons import Reason, ServiceError
from tests.helpers.grpc_context import Context


def serve_factory(behaviour, stream: bool):
    """Stands in for Serve's handler factory, called as Serve calls it: its handlers do
    `behaviour(request, context)` (a stream yields what it returns)."""

    def factory(service_method, streaming_type):
        if stream:
            async def handler(request, context):
                for item in await behaviour(request, context):
                    yield item
            return handler

        async def unary(request, context):
            return await behaviour(request, context)
        return unary

    return factory


def guarded(behaviour, method: str, stream: bool):
    """The proxy's handler as gRPC runs it (the methods are registered request-streaming: it reads its one request
    from the call), taking the request itself here."""
    kind = gRPCStreamingType.STREAM_STREAM if stream else gRPCStreamingType.STREAM_UNARY
    handler = handlers.guarded(serve_factory(behaviour, stream),
                                service_method=f"/embedding_service.v1.EmbedService/{method}", streaming_type=kind)
    if stream:
        async def server_stream(request, context):
            async for message in handler(_requests(request), context):
                yield message
        return server_stream

    async def unary(request, context):
        return await handler(_requests(request), context)
    return unary


async def _requests(*requests):
    for request in requests:
        yield request


async def _stream(handler, request, context) -> list:
    return [m async for m in handler(request, context)]


def _router_lost(context) -> None:
    """What Serve sets when the router replica it sent the call to died mid-call: INTERNAL, Ray's text."""
    context.set_code(grpc.StatusCode.INTERNAL)
    context.set_details("ray.exceptions.ActorDiedError: The actor died unexpectedly before finishing this task.")


def test_serve_raising_becomes_a_retryable_status_not_unknown():
    async def broken(request, context):
        raise RuntimeError("a bug inside Serve's proxy")

    async def main():
        context = Context()
        assert await guarded(broken, "Embed", stream=False)(pb.EmbedRequest(), context) == b""
        stream_context = Context()
        assert await _stream(guarded(broken, "EmbedStream", stream=True), pb.EmbedStreamRequest(), stream_context) == []
        return context, stream_context

    context, stream_context = asyncio.run(main())
    for ctx in (context, stream_context):
        assert ctx.code() == grpc.StatusCode.UNAVAILABLE
        details = read_details(ctx.trailing_metadata())
        assert details.reason == Reason.SERVICE_UNAVAILABLE.name and details.retry_after_s
        assert "RuntimeError" not in ctx.details()


def test_the_callers_deadline_travels_and_cannot_be_forged():
    forged = [("a", "1"), (TIMEOUT_KEY, "999999"), (ELAPSED_KEY, "999999"), (MERGED_KEY, "1" * 4301)]
    attempt = call_context.Attempt(Context(metadata=forged, remaining=2.5))
    assert attempt.invocation_metadata() == (("a", "1"), (TIMEOUT_KEY, "2500"))
    assert call_context.Attempt(Context(metadata=[(TIMEOUT_KEY, "5")])).invocation_metadata() == ()  # no deadline: none


def test_serves_own_refusals_get_reasons_and_the_routers_are_kept():
    async def refused(request, context):
        context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
        context.set_details("Request dropped due to backpressure (num_queued_requests=64, max_queued_requests=64).")
        return b""

    async def routers_own(request, context):
        error = ServiceError(Reason.MODEL_UNAVAILABLE, "no replica")
        context.set_code(error.code)
        context.set_trailing_metadata([(STATUS_DETAILS_KEY, error.status_bytes())])
        return b""

    async def router_bug_on_a_stream(request, context):
        context.set_code(grpc.StatusCode.INTERNAL)
        context.set_details(ServiceError(Reason.INTERNAL, "a bug").stream_details())  # the router's own reason
        return []

    async def main():
        full, ours, stream = Context(), Context(), Context()
        await guarded(refused, "Embed", stream=False)(pb.EmbedRequest(), full)
        await guarded(routers_own, "Embed", stream=False)(pb.EmbedRequest(), ours)
        await _stream(guarded(router_bug_on_a_stream, "EmbedStream", stream=True), pb.EmbedStreamRequest(), stream)
        return full, ours, stream

    full, ours, stream = asyncio.run(main())
    assert read_details(full.trailing_metadata()).reason == Reason.OVERLOADED.name
    assert read_details(ours.trailing_metadata()).reason == Reason.MODEL_UNAVAILABLE.name
    # Not taken for a lost router (no resend) and not rewritten: the router said why.
    assert stream.code() == grpc.StatusCode.INTERNAL and stream.trailing_metadata() == ()


def _chunk(indexes, n: int) -> bytes:
    chunk = pb.EmbedStreamResponse(model="m", dimensions=1)
    for i in indexes:
        chunk.embeddings.add(index=i, float32_le=np.float32([i / n]).tobytes(), tokens=1)
    return chunk.SerializeToString()


def test_a_stream_whose_router_is_lost_goes_on_elsewhere_with_only_the_inputs_not_yet_returned():
    texts = [f"input {i}" for i in range(10)]
    asked: list[list[str]] = []

    async def routers(request, context):
        asked.append([e.text for e in request.inputs])
        n = len(request.inputs)
        if len(asked) == 1:  # the first router returns 0-3, then dies
            _router_lost(context)
            return [_chunk(range(4), n)]
        return [_chunk(range(0, n, 2), n), _chunk(range(1, n, 2), n)]  # the second returns the rest whole

    async def main():
        context = Context(remaining=30)
        request = pb.EmbedStreamRequest(inputs=[pb.EmbedInput(text=t) for t in texts])
        return context, await _stream(guarded(routers, "EmbedStream", stream=True), request, context)

    context, messages = asyncio.run(main())
    assert asked == [texts, texts[4:]]  # sent again with the six inputs the caller has not had
    returned = [e for m in messages for e in pb.EmbedStreamResponse.FromString(m).embeddings]
    assert sorted(e.index for e in returned) == list(range(10))  # each input once, under its own index
    assert [e.index for e in returned][4:] == [4, 6, 8, 5, 7, 9]
    assert context.code() in (None, grpc.StatusCode.OK) and read_details(context.trailing_metadata()).reason is None


def _classified(indexes) -> bytes:
    chunk = pb.ClassifyStreamResponse(model="c")
    for i in indexes:
        chunk.classifications.add(index=i, labels=[pb.LabelScore(label="yes", label_id=0, score=i / 10)], tokens=1)
    return chunk.SerializeToString()


def test_a_classify_stream_whose_router_is_lost_goes_on_with_only_the_inputs_not_yet_classified():
    """Returned out of order before the router died (2, 0, 5): the rest go again, pairs kept, and their results
    come back under their own indexes in the caller's request."""
    inputs = [pb.ClassifyInput(text=f"premise {i}", text_pair=f"hypothesis {i}" if i % 2 else "") for i in range(7)]
    asked: list[list[pb.ClassifyInput]] = []

    async def routers(request, context):
        asked.append(list(request.inputs))
        if len(asked) == 1:
            _router_lost(context)
            return [_classified([2, 0]), _classified([5])]
        assert request.top_k == 2 and request.raw_scores  # the rest goes with the caller's options
        return [_classified(reversed(range(len(request.inputs))))]

    async def main():
        context = Context(remaining=30)
        request = pb.ClassifyStreamRequest(model="c", inputs=inputs, top_k=2, raw_scores=True)
        return context, await _stream(guarded(routers, "ClassifyStream", stream=True), request, context)

    context, messages = asyncio.run(main())
    assert asked == [inputs, [inputs[i] for i in (1, 3, 4, 6)]]
    returned = [c for m in messages for c in pb.ClassifyStreamResponse.FromString(m).classifications]
    assert [c.index for c in returned] == [2, 0, 5, 6, 4, 3, 1]  # each input once, under its own index
    assert [round(c.labels[0].score, 3) for c in returned][3:] == [0.3, 0.2, 0.1, 0.0]  # the resent call's own
    assert context.code() in (None, grpc.StatusCode.OK) and read_details(context.trailing_metadata()).reason is None


def test_a_classify_stream_returned_whole_before_its_router_was_lost_is_not_sent_again():
    asked = []

    async def router(request, context):
        asked.append(len(request.inputs))
        _router_lost(context)
        return [_classified([1, 0])]

    async def main():
        context = Context(remaining=30)
        request = pb.ClassifyStreamRequest(inputs=[pb.ClassifyInput(text="a"), pb.ClassifyInput(text="b")])
        return context, await _stream(guarded(router, "ClassifyStream", stream=True), request, context)

    context, messages = asyncio.run(main())
    assert asked == [2] and len(messages) == 1
    assert context.code() is None  # the caller has every result: the lost router is not its failure


def test_every_stream_but_watch_nodes_can_go_on_elsewhere():
    """A server-streaming method added to the proto needs its entry in resends.RESUMABLE: its inputs, and results
    that carry their input's index. WatchJob sends its whole job at each change: sent again whole."""
    service = pb.DESCRIPTOR.services_by_name["EmbedService"]
    streams = [m for m in service.methods if m.server_streaming and m.name not in ("WatchNodes", "WatchJob")]
    assert {m.name for m in streams} >= {"EmbedStream", "RerankStream", "ClassifyStream"}
    by_request = {t.DESCRIPTOR.full_name: (t, entry) for t, entry in resends.RESUMABLE.items()}
    for method in streams:
        assert method.input_type.full_name in by_request, method.name
        _, (inputs, chunk, results) = by_request[method.input_type.full_name]
        assert chunk.DESCRIPTOR.full_name == method.output_type.full_name, method.name
        assert method.input_type.fields_by_name[inputs].is_repeated, method.name
        assert "index" in chunk.DESCRIPTOR.fields_by_name[results].message_type.fields_by_name, method.name


@pytest.mark.parametrize("method, request_", [
    ("Classify", pb.ClassifyRequest(inputs=[pb.ClassifyInput(text="a")])),
    ("Tokenize", pb.TokenizeRequest(inputs=["a"])),
    ("Detokenize", pb.DetokenizeRequest(inputs=[pb.TokenIds(ids=[101, 102])])),
])
def test_classify_tokenize_and_detokenize_are_sent_again_whole_when_their_router_is_lost(method, request_):
    seen = []

    async def lost_once(request, context):
        seen.append(request)
        if len(seen) == 1:
            _router_lost(context)
            return b""
        return b"the reply"

    async def main():
        context = Context(remaining=30)
        return context, await guarded(lost_once, method, stream=False)(request_, context)

    context, reply = asyncio.run(main())
    assert reply == b"the reply" and seen == [request_, request_] and context.code() is None


def test_a_unary_call_whose_router_is_lost_is_sent_again_and_given_up_on_after_the_resends():
    tries = {"Embed": 0, "ListModels": 0}

    seen: list[dict] = []

    async def lost_once(request, context):
        tries["Embed"] += 1
        seen.append(dict(context.invocation_metadata()))
        if tries["Embed"] == 1:
            _router_lost(context)
            return b""
        context.set_code(grpc.StatusCode.OK)
        return b"the reply"

    async def always_lost(request, context):
        tries["ListModels"] += 1
        _router_lost(context)
        return b""

    async def main():
        ok, lost = Context(remaining=30), Context(remaining=30)
        reply = await guarded(lost_once, "Embed", stream=False)(pb.EmbedRequest(), ok)
        await guarded(always_lost, "ListModels", stream=False)(pb.ListModelsRequest(), lost)
        return reply, ok, lost

    reply, ok, lost = asyncio.run(main())
    assert reply == b"the reply" and ok.code() == grpc.StatusCode.OK
    assert tries == {"Embed": 2, "ListModels": 1 + resends.RESENDS}
    # The resent call carries what the service has spent on it, so its bound counts from the first arrival.
    assert ELAPSED_KEY not in seen[0] and int(seen[1][ELAPSED_KEY]) >= resends.RESEND_PAUSE_S[0] * 1000
    assert lost.code() == grpc.StatusCode.UNAVAILABLE  # retryable, with the service's reason and a delay
    details = read_details(lost.trailing_metadata())
    assert details.reason == Reason.SERVICE_UNAVAILABLE.name and details.retry_after_s


def test_a_call_with_no_time_left_for_a_resend_is_answered_at_once():
    async def lost(request, context):
        _router_lost(context)
        return b""

    async def main():
        context = Context(remaining=0.1)  # less than the pause before a resend
        await guarded(lost, "Embed", stream=False)(pb.EmbedRequest(), context)
        return context

    assert asyncio.run(main()).code() == grpc.StatusCode.UNAVAILABLE


def test_the_unary_request_slots_are_left_as_serve_made_them():
    """The methods are registered request-streaming (the key is checked before a request is read): gRPC runs only
    their request-streaming slots, each with Serve's handler of the unary-request kind it stands for."""
    asked = []

    def factory(service_method, streaming_type):
        asked.append(streaming_type)
        return "not run"

    assert handlers.guarded(factory, service_method="/s/M", streaming_type=gRPCStreamingType.UNARY_UNARY) == "not run"
    assert inspect.isasyncgenfunction(guarded(lambda r, c: None, "EmbedStream", stream=True))
    handlers.guarded(factory, service_method="/s/M", streaming_type=gRPCStreamingType.STREAM_STREAM)
    assert asked == [gRPCStreamingType.UNARY_UNARY, gRPCStreamingType.UNARY_STREAM]


def test_the_services_bound_counts_from_the_calls_arrival_and_the_callers_deadline_still_wins():
    def left(bound_s, metadata):
        return Deadline.within(bound_s, metadata).remaining()

    assert 44 < left(45, []) <= 45
    assert 14 < left(45, [(ELAPSED_KEY, "30000")]) <= 15  # sent again 30 s after it arrived
    assert left(45, [(ELAPSED_KEY, "50000")]) == 0  # spent more than the bound: expired, not unbounded
    assert 1 < left(45, [(TIMEOUT_KEY, "2000"), (ELAPSED_KEY, "30000")]) <= 2
    assert 9 < left(None, [(TIMEOUT_KEY, "10000"), (ELAPSED_KEY, "30000")]) <= 10  # no bound: the caller's
    assert left(None, [(ELAPSED_KEY, "bad")]) is None


def test_a_call_that_waited_in_the_proxy_tells_the_router_how_long():
    """A call that waited to leave merged (behind a call stuck on a model with no replica, say) must not get the
    service's whole bound again at the router: its caller's own deadline would pass first, unanswered."""
    seen: list[tuple] = []

    async def inner(request, attempt):
        seen.append(dict(attempt.invocation_metadata()))
        return b""

    async def main() -> None:
        waited = time.monotonic() - 2.0
        await resends.send_unary(inner, pb.EmbedRequest(), Context(remaining=100), "Embed", arrived=waited)
        await resends.send_unary(inner, pb.EmbedRequest(), Context(remaining=30), "Embed")  # just arrived

    asyncio.run(main())
    assert 2000 <= int(seen[0][ELAPSED_KEY]) < 3000 and ELAPSED_KEY not in seen[1]
    assert 42 < Deadline.within(45, list(seen[0].items())).remaining() <= 43  # the bound less the 2 s it waited


def test_a_caller_without_a_valid_key_is_answered_before_its_request_is_read(monkeypatch):
    """The proxy checks the key first: a refused caller's request is never read (nor routed); a caller with a key
    is served. Without keys configured, a caller off loopback is refused the same way."""
    monkeypatch.setenv(node_env.AUTH_SETTINGS_ENV, node_env.encode_auth_settings(AuthSettings(api_keys_env="K")))
    monkeypatch.setenv("K", "the-key")
    monkeypatch.setattr(state, "_proxy", None)
    read, routed = [], []

    async def requests():
        read.append(True)
        yield pb.ListModelsRequest()

    async def router(request, context):
        routed.append(request)
        return b"ok"

    async def call(metadata, peer="ipv4:10.1.2.3:5000"):
        context = Context(metadata=metadata, peer=peer)
        kind = gRPCStreamingType.STREAM_UNARY
        handler = handlers.guarded(serve_factory(router, False), service_method="/x/ListModels", streaming_type=kind)
        return await handler(requests(), context), context

    async def main():
        for metadata, reason in (((), Reason.API_KEY_MISSING), ((("authorization", "Bearer nope"),), Reason.API_KEY_INVALID)):
            reply, context = await call(metadata)
            assert reply == b"" and context.code() == grpc.StatusCode.UNAUTHENTICATED
            assert read_details(context.trailing_metadata()).reason == reason.name
        assert read == [] and routed == []
        reply, context = await call((("authorization", "Bearer the-key"),))
        assert reply == b"ok" and read == [True] and len(routed) == 1

    asyncio.run(main())
    monkeypatch.delenv(node_env.AUTH_SETTINGS_ENV)
    monkeypatch.setattr(state, "_proxy", None)
    read.clear()

    async def remote():
        reply, context = await call(())
        assert read_details(context.trailing_metadata()).reason == Reason.LOOPBACK_ONLY.name and read == []
        reply, context = await call((), peer="ipv6:[::1]:5000")
        assert reply == b"ok"

    asyncio.run(remote())
    monkeypatch.setattr(state, "_proxy", None)
