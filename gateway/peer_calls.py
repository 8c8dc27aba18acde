"""What the routes in vLLM's and TEI's shapes share (classify_routes.py, tokenize_routes.py): bodies read and
validated within the gateway's bounds, the service called with its errors naming the route's own fields, replies
written by orjson."""

from __future__ import annotations

import orjson
from fastapi import Request
from fastapi.responses import Response
from pydantic import ValidationError

from embedding_client.v1 import embedding_pb2 as pb
from gateway import embeddings, errors, json_body
from gateway.routes import call


def documented(schema) -> dict:
    # The body is parsed by hand (bounded, OpenAI errors); document it all the same.
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema.model_json_schema()}}}}


def truncation(truncate: bool | None) -> int:
    """TEI's `truncate`: true cuts an input's end; false or absent refuses an input over the model's maximum."""
    return pb.TRUNCATION_POLICY_END if truncate else pb.TRUNCATION_POLICY_REJECT


async def read_json(request: Request) -> object:
    """The body's JSON, read within max_body_bytes and counted within max_json_values before it is parsed."""
    settings = request.app.state.settings
    raw = await embeddings.read_body(request.receive, settings.max_body_bytes)
    return json_body.load(raw, settings.max_json_values)


def validated(data: object, request: Request, schema):
    """`data` as `schema`, its list fields bounded by the settings (pydantic's context); OpenAI's 400 with the first
    problem only, naming the field."""
    try:
        return schema.model_validate(data, context=request.app.state.settings)
    except ValidationError as exc:
        raise errors.from_validation(exc.errors(include_url=False, include_input=False), schema.model_fields) from None


async def read_body(request: Request, schema):
    return validated(await read_json(request), request, schema)


async def call_naming(request: Request, method: str, message, inputs_field: str):
    """EmbedService.<method>, as routes.call; an error about the inputs (param `input`, as OpenAI's requests name
    them) names the route's own field instead."""
    try:
        return await call(request, method, message)
    except errors.OpenAIError as exc:
        if exc.param in ("input", "text_pair"):
            exc.param = inputs_field
        raise


def json_reply(payload: object) -> Response:
    return Response(orjson.dumps(payload), media_type="application/json")
