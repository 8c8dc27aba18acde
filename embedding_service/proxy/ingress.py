"""What runs inside Ray Serve's gRPC proxy: the service's methods as the proxy registers them.

serve-config.yaml names `add_EmbedServiceServicer_to_server` and `add_HealthServicer_to_server` from here in
`grpc_options.grpc_servicer_functions`. The health service is answered here, from the router's view that
each proxy follows over one stream (health_relay.py), and so is WatchNodes (nodes_relay.py). The embedding
service's handlers are Serve's own, with five changes at the edge, before a call costs the service anything:

- The caller's API key (or, with no keys configured, its being on loopback) is checked before gRPC reads
  the call's request: the methods are registered as request-streaming, so a request's bytes are read only
  when the handler asks for them, and a caller without a key costs the proxy its headers. args.auth reaches
  the proxy through the node's environment (wire/node_env.py); where it does not, the proxy serves callers on
  loopback only, and says so once at WARNING and in `embedding_proxy_keys_checked`.
- Metadata the service passes between its own processes (the deadline, time spent, merged calls) is taken
  from what the caller sent, never from the caller.
- Request bytes that do not parse get INVALID_ARGUMENT (MALFORMED_REQUEST) and a plain message. gRPC's own
  deserializer failure is UNKNOWN, with Python's exception in the message.
- The caller's deadline goes on to the router as metadata (wire/deadline.py; Serve does not pass it), so
  work for a caller who has left stops.
- A call whose router replica stopped or died before answering (Serve force-kills a router that outlives its
  grace in an upgrade, a node fails) is sent again to another router, at most RESENDS times within the
  caller's deadline: a unary call whole, an EmbedStream or RerankStream with only the inputs it has not
  yet returned (their indexes kept), a WatchNodes again (each message is a whole view). The caller sees
  nothing of it but the time.
- Serve's own failures (its queue full, no router replica, a router lost past the resends) get the service's
  reasons and a RetryInfo delay, as every other error.

Every call answered here without a router's answer is counted (`embedding_proxy_refusals`), every call sent
again too (`embedding_proxy_calls_resent`). When the proxy's gRPC server does not run with the service's
options (its node was started without the service's environment) it says so once at WARNING and in
`embedding_proxy_grpc_options_in_force`.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2_grpc

from embedding_client.errors import read_details
from embedding_client.v1 import embedding_pb2 as pb
from embedding_client.v1 import embedding_pb2_grpc
from embedding_service.config import AuthSettings, ProxySettings
from embedding_service.observability.logs import service_logger
from embedding_service.observability.metrics import ProxyMetrics, keep_gauges_set
from embedding_service.proxy import serve_internals
from embedding_service.proxy.health_relay import HealthRelay
from embedding_service.proxy.merging import EmbedMerging, MergeFailed, MergingFull, Outcome, Send
from embedding_service.proxy.nodes_relay import NodesRelay, caller_identity
from embedding_service.wire import node_env, status
from embedding_service.wire.auth import Authenticator, given_key, peer_host
from embedding_service.wire.deadline import Deadline
from embedding_service.wire.messages import INTERNAL_METADATA
from embedding_service.wire.reasons import Reason, ServiceError

logger = service_logger(__name__)

# Times a call whose router was lost is sent again, and the pause before each (Serve learns of a dead
# replica within a moment; a call sent at once may meet it again).
RESENDS = 2
# A call that waited here to leave merged longer than this tells the router how long (shorter: within any slack).
WAITED_S = 0.01
RESEND_PAUSE_S = (0.2, 1.0)

# What a failure that Serve itself reports (no reason of ours attached) means to a caller.
_SERVE_FAILURES = {
    grpc.StatusCode.RESOURCE_EXHAUSTED: (Reason.OVERLOADED, "the service's queues are full; retry after the RetryInfo delay"),
    grpc.StatusCode.UNAVAILABLE: (Reason.SERVICE_UNAVAILABLE, "no router replica can take the call now; retry shortly"),
    # Serve reports a router replica that died mid-call as INTERNAL with Ray's error text.
    grpc.StatusCode.INTERNAL: (Reason.SERVICE_UNAVAILABLE, "the call's router replica stopped before answering; retry"),
    grpc.StatusCode.UNKNOWN: (Reason.SERVICE_UNAVAILABLE, "the service failed to complete the call; retry"),
}


class _Proxy:
    """This proxy's metrics and its one report of the server options (made in the proxy on first use: the
    module is imported outside Ray too)."""

    def __init__(self) -> None:
        self.metrics = ProxyMetrics()
        self.options_in_force = True
        self.settings = node_env.proxy_settings() or ProxySettings()
        auth = node_env.auth_settings()
        self.keys_checked = auth is not None
        if auth is None:
            logger.warning(
                "Serve's gRPC proxy has no args.auth in its node's environment (%s): it serves callers on loopback "
                "only. Start every Ray node with what `python -m embedding_service node-env` prints (the run "
                "command and the rendered Kubernetes manifests set it).", node_env.AUTH_SETTINGS_ENV)
        self.auth = Authenticator(auth or AuthSettings(), require_keys=False)
        self.nodes = NodesRelay(self.settings, on_count=self.metrics.node_watchers.set)
        self._gauges: asyncio.Task | None = None

    def merging(self, send: Send) -> EmbedMerging:
        m = self.metrics
        return EmbedMerging(self.settings, send, _Detached, on_send=m.merged_callers.observe,
                            on_drop=lambda inputs, reason: m.inputs_dropped.inc(inputs, tags={"reason": reason}))

    def check_options(self) -> None:
        """Whether Serve built this proxy's server with the service's options; says so when it did not."""
        requested = node_env.requested_proxy_options()
        if requested is None:
            self.options_in_force = False
            logger.warning(
                "Serve's gRPC proxy runs with gRPC's default server options, not the service's (%s, "
                "proxy_max_streams_per_connection): a burst of more than 1,000 calls waiting for the proxy gets "
                "CANCELLED. This node was started without the service's environment (%s, %s): start every Ray "
                "node with what `python -m embedding_service node-env` prints (the run command and the rendered "
                "Kubernetes manifests set it).", node_env.SETTING, node_env.PROXY_OPTIONS_ENV,
                node_env.PRELOADED_MODULE)
        elif not serve_internals.server_options_in_force(requested):
            self.options_in_force = False
            logger.warning(
                "Serve's gRPC proxy runs with gRPC's default server options although this node's environment asks "
                "for the service's (%s): the module %s was not preloaded into the proxy's worker, so a burst of more "
                "than 1,000 calls waiting for the proxy gets CANCELLED. Check that the node's environment names it "
                "in Ray's preload setting (`python -m embedding_service node-env`).", node_env.SETTING,
                node_env.PRELOADED_MODULE)
        else:
            logger.info("Serve's gRPC proxy runs with the service's server options (%s)",
                        ", ".join(f"{key}={value}" for key, value in requested))
        if self._gauges is None:
            self._gauges = asyncio.get_running_loop().create_task(keep_gauges_set(self._report))

    def _report(self) -> None:
        self.metrics.options_in_force.set(1 if self.options_in_force else 0)
        self.metrics.keys_checked.set(1 if self.keys_checked else 0)
        self.metrics.node_watchers.set(self.nodes.watchers)

    def admitted(self, context, stream: bool, method: str) -> bool:
        """Whether the caller may call (its key, or loopback where no keys are configured); else it is answered."""
        try:
            self.auth.check(context.invocation_metadata(), context.peer())
        except ServiceError as error:
            self.refuse(error, context, stream, method)
            return False
        return True

    def refuse(self, error: ServiceError, context, stream: bool, method: str) -> None:
        """Answers the call with `error` here, in the proxy, and counts it."""
        status.apply(error, context, stream=stream)
        self.metrics.refusals.inc(tags={"method": method, "code": error.code.name, "reason": error.reason.name})


_proxy: _Proxy | None = None


def _this_proxy() -> _Proxy:
    global _proxy
    if _proxy is None:
        _proxy = _Proxy()
    return _proxy


def add_EmbedServiceServicer_to_server(servicer: Any, server: Any) -> None:  # noqa: N802 (gRPC's naming)
    proxy = _this_proxy()
    proxy.check_options()
    capture = _Capture()
    embedding_pb2_grpc.add_EmbedServiceServicer_to_server(servicer, capture)
    # Request-streaming: gRPC reads a request only when its handler asks, after the caller's key was checked.
    handlers = {name: _read_on_demand(h) for name, h in capture.handlers.items()}
    # Serve swaps each handler's behaviour for one made by its factory; ours wraps that, for these services only.
    with serve_internals.wrapped_handler_factory(server, _guarded):
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(capture.service, handlers),))
        server.add_registered_method_handlers(capture.service, handlers)


def add_HealthServicer_to_server(servicer: Any, server: Any) -> None:  # noqa: N802
    """grpc.health.v1 answered here, in the proxy, from the router's relayed view (health_relay.py)."""
    capture = _Capture()
    health_pb2_grpc.add_HealthServicer_to_server(HealthRelay(), capture)
    handlers = {name: _checked(name, h) for name, h in capture.handlers.items()}
    serve_internals.add_passthrough(server, capture.service)  # Serve runs these handlers as they are
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(capture.service, handlers),))
    server.add_registered_method_handlers(capture.service, handlers)


class _Capture:
    """Stands in for the server while the generated code lists its handlers."""

    def __init__(self) -> None:
        self.service = ""
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.service, self.handlers = service, handlers


def _rebuilt(handler: grpc.RpcMethodHandler, behaviour: Callable) -> grpc.RpcMethodHandler:
    """The handler with a lenient request parser and `behaviour`, built by grpc's own constructors."""
    make = grpc.unary_stream_rpc_method_handler if handler.response_streaming else grpc.unary_unary_rpc_method_handler
    return make(behaviour, request_deserializer=_lenient(handler.request_deserializer),
                response_serializer=handler.response_serializer)


def _read_on_demand(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """The handler registered as request-streaming (its behaviour is Serve's to set), with a lenient parser."""
    make = grpc.stream_stream_rpc_method_handler if handler.response_streaming else grpc.stream_unary_rpc_method_handler
    return make(handler.unary_stream or handler.unary_unary, request_deserializer=_lenient(handler.request_deserializer),
                response_serializer=handler.response_serializer)


async def _one_request(requests, context, stream: bool, method: str):
    """The call's one request, read now; None (and the call answered) when its bytes did not parse or it sent none."""
    request = None
    async for request in requests:
        break
    if request is None:
        _this_proxy().refuse(ServiceError(Reason.MALFORMED_REQUEST, "the call carried no request message"),
                             context, stream, method)
        return None
    return None if _refused_malformed(request, context, stream, method) else request


def _checked(method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler run here whose request bytes that do not parse get MALFORMED_REQUEST, as Serve-routed ones."""
    if handler.response_streaming:
        behaviour = handler.unary_stream

        async def server_stream(request, context):
            if not _refused_malformed(request, context, True, method):
                await behaviour(request, context)

        return _rebuilt(handler, server_stream)
    behaviour = handler.unary_unary

    async def unary(request, context):
        return None if _refused_malformed(request, context, False, method) else await behaviour(request, context)

    return _rebuilt(handler, unary)


class _Malformed:
    """A request whose bytes did not parse; the proxy answers it itself."""

    def __init__(self, error: ServiceError) -> None:
        self.error = error


def _refused_malformed(request, context, stream: bool, method: str) -> bool:
    """Answers a request whose bytes did not parse (MALFORMED_REQUEST); False for a parsed one."""
    if isinstance(request, _Malformed):
        _this_proxy().refuse(request.error, context, stream, method)
        return True
    return False


def _lenient(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    message_type = getattr(getattr(deserialize, "__self__", None), "DESCRIPTOR", None)
    name = message_type.full_name if message_type is not None else "request message"

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception:  # DecodeError, or whatever a parser raises on bad bytes
            return _Malformed(ServiceError(Reason.MALFORMED_REQUEST, f"the request bytes are not a valid {name}"))

    return parse


class _Attempt:
    """The call as Serve's handler sees it for one attempt: the caller's remaining time added to the metadata
    Serve forwards, and the status Serve sets kept here until the proxy decides what the caller sees.

    `extra`: metadata added to the caller's; `deadline`: the attempt's own (a merged call's, the last of its
    callers'), else the caller's."""

    def __init__(self, context, spent_s: float | None = None, extra: tuple = (),
                 deadline: Deadline | None = None) -> None:
        self._context = context
        metadata = [(k, v) for k, v in context.invocation_metadata() if k not in INTERNAL_METADATA]
        metadata.extend(extra)
        remaining = context.time_remaining() if deadline is None else deadline.remaining()
        if remaining is not None:
            metadata.append(Deadline.metadata_entry(remaining))
        if spent_s is not None:  # sent again, or after waiting here: the service's bound counts from its arrival
            metadata.append(Deadline.elapsed_entry(spent_s))
        self._metadata = tuple(metadata)
        self._code: grpc.StatusCode | None = None
        self._details: str | None = None
        self._trailers: tuple = ()

    def invocation_metadata(self):
        return self._metadata

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._trailers

    def set_code(self, code) -> None:
        self._code = code

    def set_details(self, details) -> None:
        self._details = details

    def set_trailing_metadata(self, metadata) -> None:
        self._trailers = tuple(metadata)

    def __getattr__(self, name: str):
        return getattr(self._context, name)

    def router_lost(self) -> bool:
        """Serve reported the router replica lost mid-call (INTERNAL, and no reason of the router's)."""
        return self._code == grpc.StatusCode.INTERNAL and read_details(self._trailers, _text(self._details)).reason is None

    def outcome(self, reply: bytes) -> Outcome:
        return Outcome(reply, self._code, self._details, self._trailers)

    def finish(self, context, stream: bool, method: str) -> None:
        _finish(self.outcome(b""), context, stream, method)


class _Detached:
    """What Serve's handler reads of a caller's gRPC context, taken while the caller is there: a call the
    merging sends may run on after that caller has gone, and a finished call's context must not be touched.
    It is only ever used inside an _Attempt, which keeps the status Serve writes."""

    def __init__(self, context) -> None:
        self._metadata = tuple(context.invocation_metadata())
        self._peer = context.peer()
        self._auth = context.auth_context()
        self._identities = context.peer_identities()
        self._identity_key = context.peer_identity_key()
        self._deadline = Deadline.after(context.time_remaining())

    def invocation_metadata(self):
        return self._metadata

    def peer(self):
        return self._peer

    def auth_context(self):
        return self._auth

    def peer_identities(self):
        return self._identities

    def peer_identity_key(self):
        return self._identity_key

    def time_remaining(self):
        return self._deadline.remaining()

    def set_compression(self, compression) -> None:
        pass  # the caller's call is answered by the _Attempt's status, compressed as gRPC's default


def _text(details) -> str:
    details = details or ""
    return details.decode(errors="replace") if isinstance(details, bytes) else details


def _finish(outcome: Outcome, context, stream: bool, method: str) -> None:
    """Serve's status onto the caller's call; a failure Serve reported on its own gets the service's reason."""
    if outcome.raised:
        reason, message = _SERVE_FAILURES[grpc.StatusCode.UNKNOWN]
        _this_proxy().refuse(ServiceError(reason, message), context, stream, method)
        return
    if outcome.code is not None:
        context.set_code(outcome.code)
    if outcome.details:
        context.set_details(outcome.details)
    if outcome.trailers:
        context.set_trailing_metadata(outcome.trailers)
    if outcome.code in _SERVE_FAILURES and read_details(outcome.trailers, _text(outcome.details)).reason is None:
        reason, message = _SERVE_FAILURES[outcome.code]
        _this_proxy().refuse(ServiceError(reason, message), context, stream, method)


def _serve_raised(context, stream: bool, method: str) -> None:
    """Serve's own handler raised (gRPC would answer UNKNOWN with the exception's class): our status instead."""
    logger.exception("Serve's proxy failed a call")
    _finish(Outcome(b"", raised=True), context, stream, method)


async def _resend_now(attempt: _Attempt, tries: int, remaining: float | None, method: str) -> bool:
    """Whether to send the call again after this attempt lost its router (tries left, `remaining` seconds
    left to its caller); waits first."""
    if tries >= RESENDS or not attempt.router_lost():
        return False
    pause = RESEND_PAUSE_S[min(tries, len(RESEND_PAUSE_S) - 1)]
    if remaining is not None and remaining <= pause:
        return False
    logger.warning("%s: the call's router replica was lost; sending it to another (%d of %d)", method, tries + 1,
                   RESENDS)
    _this_proxy().metrics.resent.inc(tags={"method": method})
    await asyncio.sleep(pause)
    return True


async def _send_unary(inner: Callable, request, context, method: str, extra: tuple = (),
                      deadline: Deadline | None = None, arrived: float | None = None) -> Outcome:
    """One unary call through Serve's handler, sent again while its router is lost (within its deadline).
    `arrived`: when the call came to the proxy, for one that waited here to leave merged (else now): the service's
    bound counts from then."""
    if arrived is None:
        arrived = time.monotonic()
    for tries in range(RESENDS + 1):
        spent = time.monotonic() - arrived
        attempt = _Attempt(context, spent if tries or spent >= WAITED_S else None, extra, deadline)
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


async def _merged_unary(merging: EmbedMerging, request, context, method: str) -> bytes:
    """An Embed call that may leave with others (merging.py): its own part of the reply, or its status."""
    try:
        part = await merging.embed(request, context)
    except asyncio.TimeoutError:
        _this_proxy().refuse(ServiceError(Reason.TIMEOUT, "the call's deadline passed while it waited in Serve's "
                                          "proxy to leave with others; retry with a longer deadline"),
                             context, False, method)
        return b""
    except MergingFull:
        _this_proxy().refuse(ServiceError(Reason.OVERLOADED, f"Serve's proxy holds {merging.settings.max_queued_calls} "
                                          "calls waiting already (args.proxy.max_queued_calls); retry after the "
                                          "RetryInfo delay"), context, False, method)
        return b""
    except MergeFailed as failed:
        _finish(failed.outcome, context, False, method)
        return failed.outcome.reply
    _finish(part.outcome, context, False, method)
    return part.reply()


# The streams that go on elsewhere with what they have not returned: request type -> (its list of inputs, the
# chunk type, the chunk's list of results, each with the index of its input).
_RESUMABLE = {
    pb.EmbedStreamRequest: ("inputs", pb.EmbedStreamResponse, "embeddings"),
    pb.RerankStreamRequest: ("documents", pb.RerankStreamResponse, "results"),
}


class _StreamResume:
    """An EmbedStream's or RerankStream's progress, so that it can go on elsewhere with only the inputs it has
    not returned."""

    def __init__(self, request) -> None:
        self.inputs, self.chunk, self.results = _RESUMABLE[type(request)]
        self.original = request
        self.request = request
        self._positions: list[int] | None = None  # each input's index in the original; None: the original
        self._returned: set[int] = set()

    def returned(self, message: bytes) -> bytes:
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


def _guarded(original: Callable, **keywords) -> Callable:
    unary_keywords = serve_internals.unary_request_keywords(keywords)
    if unary_keywords is None:
        return original(**keywords)  # a unary-request slot: never run (the methods read their requests as streams)
    inner = original(**unary_keywords)
    method = keywords["service_method"].rsplit("/", 1)[-1]
    if method == "WatchNodes":
        return _watch_nodes
    if inspect.isasyncgenfunction(inner):

        async def server_stream(requests, context):
            if not _this_proxy().admitted(context, True, method):
                return
            request = await _one_request(requests, context, True, method)
            if request is None:
                return
            resume = _StreamResume(request) if type(request) in _RESUMABLE else None
            arrived = time.monotonic()
            for tries in range(RESENDS + 1):
                attempt = _Attempt(context, time.monotonic() - arrived if tries else None)
                try:
                    async for message in inner(resume.request if resume else request, attempt):
                        yield resume.returned(message) if resume else message
                except Exception:
                    _serve_raised(context, True, method)
                    return
                if await _resend_now(attempt, tries, context.time_remaining(), method):
                    if resume is None or resume.rest():
                        continue
                    return  # every input was returned before the router was lost: the stream is whole
                attempt.finish(context, True, method)
                return

        return server_stream

    merging = _this_proxy().merging(
        lambda r, c, extra, deadline, arrived: _send_unary(inner, r, c, method, extra, deadline, arrived)) \
        if method == "Embed" else None

    async def unary(requests, context) -> bytes:
        if not _this_proxy().admitted(context, False, method):
            return b""
        request = await _one_request(requests, context, False, method)
        if request is None:
            return b""
        if merging is not None and merging.takes(request):
            return await _merged_unary(merging, request, context, method)
        outcome = await _send_unary(inner, request, context, method)
        _finish(outcome, context, False, method)
        return outcome.reply

    return unary


async def _watch_nodes(requests, context):
    """WatchNodes from this proxy's relay of the router's view (nodes_relay.py), bounded per caller."""
    proxy = _this_proxy()
    if not proxy.admitted(context, True, "WatchNodes") or await _one_request(requests, context, True, "WatchNodes") \
            is None:
        return
    metadata = context.invocation_metadata()
    caller = caller_identity(given_key(metadata) if proxy.auth.enabled else None, peer_host(context.peer()))
    try:
        proxy.nodes.admit(caller)
    except ServiceError as error:
        proxy.refuse(error, context, True, "WatchNodes")
        return
    try:
        async for view in proxy.nodes.watch(proxy.auth.is_admin(metadata, context.peer())):
            yield view.SerializeToString()
    finally:
        proxy.nodes.leave(caller)
