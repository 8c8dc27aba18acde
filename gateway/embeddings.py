"""POST /v1/embeddings: OpenAI's embeddings request in, the service's vectors out as OpenAI's JSON.

The gateway's busiest route is served as plain ASGI ahead of FastAPI's routing, dependency solving and
middleware stack (app.py dispatches to it): those cost more gateway CPU per small request than the route's own
work. It keeps what every route gets: the API key and body bound (guards.Guard), the metrics and server span
(metrics.ObserveRequests), OpenAI's error objects (errors.py). The FastAPI route of the same path
(routes.py) documents it in /openapi.json, and serves it through this module where the app sees the path with a
prefix (uvicorn's root_path, behind a proxy that strips one).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import orjson
from pydantic import ValidationError
from starlette.responses import Response

from embedding_client import EmbeddingError
from embedding_client.v1 import embedding_pb2 as pb
from embedding_service.wire.deadline import Deadline
from gateway import errors, json_body, translate
from gateway.coalescing import CoalescingFull
from gateway.openai_schema import EmbeddingRequest

PATH = "/v1/embeddings"
JSON_HEADERS = [(b"content-type", b"application/json")]

logger = logging.getLogger("gateway")


def parse(raw: bytes | bytearray, settings, schema=EmbeddingRequest):
    """The request body as `schema`: JSON of at most settings.max_json_values values (json_body.py), its list fields
    by their JSON type within the settings' bounds (bounded_lists.py); OpenAI's 400 with the first problem only,
    naming the field."""
    data = json_body.load(raw, settings.max_json_values)
    try:
        return schema.model_validate(data, context=settings)
    except ValidationError as exc:
        raise errors.from_validation(exc.errors(include_url=False, include_input=False), schema.model_fields) from None


@dataclass(frozen=True)
class EmbedCall:
    """What one embeddings request asks of the service and how its reply is rendered: all that is kept of its body
    while it waits, as the body's bytes and Python objects are large next to it."""

    model: str
    inputs: list[pb.EmbedInput]
    dimensions: int | None
    encoding: int
    output_dtype: str
    base64: bool


def embed_call(state, raw: bytes | bytearray) -> EmbedCall:
    """The call one embeddings request body asks for, or an OpenAIError raised."""
    body: EmbeddingRequest = parse(raw, state.settings)
    translate.check_dimensions(body)
    return EmbedCall(body.model, translate.inputs(body), body.dimensions, translate.encoding(body), body.output_dtype,
                     body.encoding_format == "base64")


async def respond(state, call: EmbedCall) -> bytes:
    """The JSON reply to one embeddings call, or an OpenAIError raised."""
    deadline = Deadline.after(state.settings.request_timeout_s)
    try:
        reply = await state.embedding.embed(call.model, call.inputs, call.dimensions, deadline, call.encoding)
    except EmbeddingError as err:
        raise errors.from_service(err, state.settings.retry_after_s) from None
    except TimeoutError:  # its deadline passed while it waited to leave in a merged call
        raise errors.timeout() from None
    except CoalescingFull:
        raise refused(state) from None
    payload = translate.render(reply, call.output_dtype, call.base64)
    return orjson.dumps(payload)


async def reply(state, receive) -> bytes:
    """The JSON reply to the request whose body ASGI `receive` carries, read within the body bound; an
    OpenAIError or ClientGone raised. The route's whole work, here (EmbeddingsEndpoint) and in FastAPI's route.
    The body and what it parsed into are dropped before the call goes out."""
    return await respond(state, embed_call(state, await read_body(receive, state.settings.max_body_bytes)))


def refused(state) -> errors.OpenAIError:
    if not getattr(state, "refusing_logged", False):
        state.refusing_logged = True
        logger.warning("the gateway's merging queue is full (coalesce_max_queued %d): refusing requests with 429 "
                       "until it drains; see embedding_gateway_coalescing_refused_total",
                       state.settings.coalesce_max_queued)
    state.metrics.coalescing_refused.inc()
    return errors.overloaded(state.settings.coalesce_max_queued, state.settings.retry_after_s)


class ClientGone(Exception):
    """The caller disconnected before its body was read."""


# The status a request is counted with when its caller left before its body arrived: nginx's "client closed
# request". uvicorn sends nothing to a caller that has gone, so no client ever reads it.
CLIENT_GONE = 499


def gone() -> Response:
    """The answer to a request whose caller has gone (ClientGone), there only for the metrics and the span: here
    and in FastAPI's handler for the other routes (guards.install)."""
    return Response(status_code=CLIENT_GONE)


async def read_body(receive, limit: int) -> bytearray:
    """The whole body from ASGI `receive`, bounded by `limit` even without a Content-Length; as read, not copied
    into bytes (the parse takes either)."""
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        body += message.get("body", b"")
        if len(body) > limit:
            raise errors.body_too_large(limit)
        if not message.get("more_body", False):
            return body


class EmbeddingsEndpoint:
    """The route as an ASGI app over the gateway's state (app.state: settings, embedding, metrics)."""

    def __init__(self, state) -> None:
        self.state = state

    async def __call__(self, scope, receive, send) -> None:
        try:
            try:
                content = await reply(self.state, receive)
            except ClientGone:
                await gone()(scope, receive, send)
                return
            except errors.OpenAIError as exc:
                await exc.response()(scope, receive, send)
                return
        except Exception:
            # What FastAPI's exception handler answers for the other routes (guards.install), logged here.
            logger.exception("POST %s failed in the gateway", PATH)
            await errors.OpenAIError(500, "internal error in the gateway", "api_error").response()(scope, receive,
                                                                                                     send)
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [*JSON_HEADERS, (b"content-length", str(len(content)).encode())]})
        await send({"type": "http.response.body", "body": content})
