"""The service's methods as the proxy runs them, around the handlers Serve makes for them.

Serve's handler factory is wrapped while the service's methods register (registration.py); for each method,
`guarded` takes the handler Serve makes and returns what gRPC runs. Each call's key is checked first
(state.py), before its request is read; its one request is read then (parsing.py); and then:

- Embed: concurrent small calls may leave as one (merging.py), else as any unary call;
- another unary call (ListModels, GetModel, Rerank, EmbedSparse, Classify, Tokenize, Detokenize): through
  Serve's handler, sent again while its router is lost (resends.py);
- a server stream (EmbedStream, RerankStream, ClassifyStream): the same, going on elsewhere with the inputs it
  has not returned;
- WatchNodes: answered here from this proxy's relay of the router's view (nodes_relay.py), bounded per caller.

Whatever the call comes to, its status reaches the caller through state.ProxyState.finish.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable

from embedding_service.proxy import serve_internals
from embedding_service.proxy.merging import EmbedMerging, MergeFailed, MergingFull
from embedding_service.proxy.nodes_relay import caller_identity
from embedding_service.proxy.parsing import one_request
from embedding_service.proxy.resends import send_stream, send_unary
from embedding_service.proxy.state import this_proxy
from embedding_service.wire.auth import given_key, peer_host
from embedding_service.wire.reasons import Reason, ServiceError

# The one method merged in the proxy (merging.py).
MERGED_METHOD = "Embed"


def guarded(original: Callable, **keywords) -> Callable:
    """What gRPC runs for one method: Serve's handler factory `original`, called with `keywords`, wrapped."""
    unary_keywords = serve_internals.unary_request_keywords(keywords)
    if unary_keywords is None:
        return original(**keywords)  # a unary-request slot: never run (the methods read their requests as streams)
    inner = original(**unary_keywords)
    method = keywords["service_method"].rsplit("/", 1)[-1]
    if method == "WatchNodes":
        return watch_nodes
    if inspect.isasyncgenfunction(inner):
        return _server_stream(inner, method)
    return _unary(inner, method)


def _server_stream(inner: Callable, method: str) -> Callable:
    async def server_stream(requests, context):
        if not this_proxy().admitted(context, True, method):
            return
        request = await one_request(requests, context, True, method)
        if request is None:
            return
        async for message in send_stream(inner, request, context, method):
            yield message

    return server_stream


def _unary(inner: Callable, method: str) -> Callable:
    merging = this_proxy().merging(
        lambda r, c, extra, deadline, arrived: send_unary(inner, r, c, method, extra, deadline, arrived)) \
        if method == MERGED_METHOD else None

    async def unary(requests, context) -> bytes:
        if not this_proxy().admitted(context, False, method):
            return b""
        request = await one_request(requests, context, False, method)
        if request is None:
            return b""
        if merging is not None and merging.takes(request):
            return await merged_unary(merging, request, context, method)
        outcome = await send_unary(inner, request, context, method)
        this_proxy().finish(outcome, context, False, method)
        return outcome.reply

    return unary


async def merged_unary(merging: EmbedMerging, request, context, method: str) -> bytes:
    """An Embed call that may leave with others (merging.py): its own part of the reply, or its status."""
    proxy = this_proxy()
    try:
        part = await merging.embed(request, context)
    except asyncio.TimeoutError:
        proxy.refuse(ServiceError(Reason.TIMEOUT, "the call's deadline passed while it waited in Serve's "
                                  "proxy to leave with others; retry with a longer deadline"), context, False, method)
        return b""
    except MergingFull:
        proxy.refuse(ServiceError(Reason.OVERLOADED, f"Serve's proxy holds {merging.settings.max_queued_calls} "
                                  "calls waiting already (args.proxy.max_queued_calls); retry after the "
                                  "RetryInfo delay"), context, False, method)
        return b""
    except MergeFailed as failed:
        proxy.finish(failed.outcome, context, False, method)
        return failed.outcome.reply
    proxy.finish(part.outcome, context, False, method)
    return part.reply()


async def watch_nodes(requests, context):
    """WatchNodes from this proxy's relay of the router's view (nodes_relay.py), bounded per caller."""
    proxy = this_proxy()
    if not proxy.admitted(context, True, "WatchNodes") or await one_request(requests, context, True, "WatchNodes") \
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
