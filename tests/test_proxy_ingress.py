"""The wrapper around Serve's proxy handlers, driven directly for what the real proxy cannot be made to do
on purpose (Serve's own handler raising). The paths it can do are tested through the real proxy
(test_errors.py, test_overload.py, test_run_command.py)."""

from __future__ import annotations

import asyncio

import grpc
from ray.serve._private.proxy_request_response import gRPCStreamingType

from embedding_service.error_reasons import STATUS_DETAILS_KEY, Reason, ServiceError, read_details
from embedding_service.proxy_ingress import TIMEOUT_KEY, _CallContext, _explain_serve_failure, _guarded


class Context:
    """Records what a handler writes on a gRPC servicer context."""

    def __init__(self, metadata=(), remaining: float | None = None) -> None:
        self._metadata, self._remaining = tuple(metadata), remaining
        self._code, self._details, self._trailers = None, "", ()

    def invocation_metadata(self):
        return self._metadata

    def time_remaining(self):
        return self._remaining

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._trailers

    def set_code(self, code):
        self._code = code

    def set_details(self, details):
        self._details = details

    def set_trailing_metadata(self, metadata):
        self._trailers = tuple(metadata)


def serve_factory(behaviour):
    """Stands in for Serve's handler factory: its handlers do `behaviour(request, context)`."""

    def factory(service_method, streaming_type):
        if streaming_type == gRPCStreamingType.UNARY_STREAM:
            async def stream(request, context):
                for item in await behaviour(request, context):
                    yield item
            return stream

        async def unary(request, context):
            return await behaviour(request, context)
        return unary

    return factory


def test_serve_raising_becomes_a_retryable_status_not_unknown():
    async def broken(request, context):
        raise RuntimeError("a bug inside Serve's proxy")

    async def main():
        unary = _guarded(serve_factory(broken), "/s/M", gRPCStreamingType.UNARY_UNARY)
        context = Context()
        assert await unary(b"request", context) == b""
        stream = _guarded(serve_factory(broken), "/s/S", gRPCStreamingType.UNARY_STREAM)
        stream_context = Context()
        assert [m async for m in stream(b"request", stream_context)] == []
        return context, stream_context

    context, stream_context = asyncio.run(main())
    for ctx in (context, stream_context):
        assert ctx.code() == grpc.StatusCode.UNAVAILABLE
        details = read_details(ctx.trailing_metadata())
        assert details.reason == Reason.SERVICE_UNAVAILABLE.name and details.retry_after_s
        assert "RuntimeError" not in ctx.details()


def test_the_callers_deadline_travels_and_cannot_be_forged():
    context = _CallContext(Context(metadata=[("a", "1"), (TIMEOUT_KEY, "999999")], remaining=2.5))
    assert context.invocation_metadata() == (("a", "1"), (TIMEOUT_KEY, "2500"))
    assert _CallContext(Context(metadata=[(TIMEOUT_KEY, "5")])).invocation_metadata() == ()  # no deadline: none


def test_serves_own_refusals_get_reasons_and_the_routers_are_kept():
    full = Context()
    full.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
    full.set_details("Request dropped due to backpressure (num_queued_requests=64, max_queued_requests=64).")
    _explain_serve_failure(full, stream=False, method="Embed")
    assert read_details(full.trailing_metadata()).reason == Reason.OVERLOADED.name

    ours = Context()
    error = ServiceError(Reason.MODEL_UNAVAILABLE, "no replica")
    ours.set_code(error.code)
    ours.set_trailing_metadata([(STATUS_DETAILS_KEY, error.status_bytes())])
    _explain_serve_failure(ours, stream=False, method="Embed")
    assert read_details(ours.trailing_metadata()).reason == Reason.MODEL_UNAVAILABLE.name

    stream = Context()
    stream.set_code(grpc.StatusCode.INTERNAL)
    stream.set_details(ServiceError(Reason.INTERNAL, "a bug").stream_details())  # the router's own, on a stream
    _explain_serve_failure(stream, stream=True, method="EmbedStream")
    assert stream.code() == grpc.StatusCode.INTERNAL and stream.trailing_metadata() == ()
