"""POST /v1/embed and /v2/embed: Cohere's embed API over the service's Embed, as the official cohere SDK calls them
(cohere.ClientV2(...).embed and cohere.Client(...).embed).

A request is one Embed call per vector encoding its embedding_types need (cohere_vectors), made at once, each with
the same texts, prompt, truncation and dimensions; its input_type is one of the model's prompts (cohere_prompts), whose
names the gateway keeps from the service's ListModels (model_prompts). The calls are not merged with other requests'
(coalescing.py keys neither prompt nor truncation, and the SDK sends up to 96 texts a call already). Auth, body
bounds, error objects and metrics are the other routes' (guards.py, errors.py, metrics.py).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from embedding_client import EmbeddingError
from embedding_client.v1 import embedding_pb2 as pb
from embedding_service.wire.deadline import Deadline
from gateway import cohere_prompts, cohere_vectors, errors
from gateway.cohere_schema import CohereEmbedRequest, EmbedByTypeResponse, EmbedFloatsResponse
from gateway.routes import ERROR_RESPONSES, read_body
from gateway.upstream import loop_deadline

router = APIRouter()

# Cohere's `truncate` as the service's policy; Cohere's default is END.
TRUNCATION = {"NONE": pb.TRUNCATION_POLICY_REJECT, "START": pb.TRUNCATION_POLICY_START,
              "END": pb.TRUNCATION_POLICY_END, None: pb.TRUNCATION_POLICY_END}
# The request field an error of the service names (by the service's name, or the OpenAI route's that errors.py gives
# it), as Cohere's request names it.
_COHERE_PARAMS = {"input": "texts", "inputs": "texts", "dimensions": "output_dimension", "prompt_name": "input_type",
                  "encoding": "embedding_types", "encoding_format": "embedding_types", "truncation": "truncate"}


def _documented(schema) -> dict:
    # The body is parsed by hand (bounded, OpenAI errors); document it all the same.
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema.model_json_schema()}}}}


@router.post("/v2/embed", response_model=EmbedByTypeResponse, responses=ERROR_RESPONSES,
             openapi_extra=_documented(CohereEmbedRequest))
async def embed_v2(request: Request) -> Response:
    return await _embed(request, "2")


@router.post("/v1/embed", response_model=EmbedFloatsResponse | EmbedByTypeResponse, responses=ERROR_RESPONSES,
             openapi_extra=_documented(CohereEmbedRequest))
async def embed_v1(request: Request) -> Response:
    return await _embed(request, "1")


async def _embed(request: Request, api_version: str) -> Response:
    state = request.app.state
    body: CohereEmbedRequest = await read_body(request, CohereEmbedRequest)  # its texts bounded
    deadline = Deadline.after(state.settings.request_timeout_s)
    model, prompt = await model_and_prompt(state, body, deadline)
    message = pb.EmbedRequest(model=model, inputs=[pb.EmbedInput(text=t) for t in body.texts],
                              truncation=TRUNCATION[body.truncate], prompt_name=prompt)
    if body.output_dimension is not None:
        message.dimensions = body.output_dimension
    types = body.embedding_types or ["float"]
    replies = await embed_each_encoding(state, message, cohere_vectors.encodings(types), deadline)
    payload = render(body.texts, body.embedding_types, replies, api_version)
    return Response(orjson.dumps(payload), media_type="application/json")


async def model_and_prompt(state, body: CohereEmbedRequest, deadline: Deadline) -> tuple[str, str]:
    """The model to call ("" for the service's default) and the prompt_name its input_type takes. Without an
    input_type the service is not asked about the model first: its Embed call answers for it."""
    if body.input_type is None:
        return body.model or "", cohere_prompts.AS_IS

    def list_models():
        return state.client.call("ListModels", pb.ListModelsRequest(), deadline=loop_deadline(deadline))

    try:
        found = await state.model_prompts.of(body.model or "", list_models)
    except EmbeddingError as err:
        raise errors.from_service(err, state.settings.retry_after_s) from None
    if found is None:
        raise errors.model_not_found(body.model or "(the service's default)")
    name, prompts = found
    return name, cohere_prompts.prompt_name(name, body.input_type, prompts, state.settings.cohere_input_type_prompts)


async def embed_each_encoding(state, message: pb.EmbedRequest, encodings: Sequence[int],
                              deadline: Deadline) -> dict[int, pb.EmbedResponse]:
    """One Embed call of `message` per encoding, all at once; the others are cancelled once one fails."""

    async def embed(encoding: int) -> tuple[int, pb.EmbedResponse]:
        request = pb.EmbedRequest()
        request.CopyFrom(message)
        request.encoding = encoding
        try:
            return encoding, await state.client.call("Embed", request, deadline=loop_deadline(deadline))
        except EmbeddingError as err:
            raise in_cohere_terms(errors.from_service(err, state.settings.retry_after_s)) from None

    calls = [asyncio.ensure_future(embed(e)) for e in encodings]
    try:
        return dict(await asyncio.gather(*calls))
    finally:
        for call in calls:
            call.cancel()  # a no-op for those done; stops the rest when one failed or the caller left


def in_cohere_terms(error: errors.OpenAIError) -> errors.OpenAIError:
    """The service's error, its `param` named as Cohere's request names that field."""
    error.param = _COHERE_PARAMS.get(error.param, error.param)
    return error


def render(texts: list[str], embedding_types: list[str] | None, replies: dict[int, pb.EmbedResponse],
           api_version: str) -> dict:
    """Cohere's reply: embeddings by type (v1 without embedding_types: the float vectors as a plain list), the texts,
    and the tokens billed, counted once (every reply embedded the same texts)."""
    types = embedding_types or ["float"]
    tokens = replies[cohere_vectors.encoding(types[0])].usage.prompt_tokens
    meta = {"api_version": {"version": api_version}, "billed_units": {"input_tokens": tokens}}
    reply: dict = {"id": str(uuid.uuid4())}
    if embedding_types is None and api_version == "1":
        reply["embeddings"] = cohere_vectors.vectors(replies[cohere_vectors.encoding("float")].embeddings, "float")
        reply["response_type"] = "embeddings_floats"
    else:
        reply["embeddings"] = cohere_vectors.by_type(replies, types)
        reply["response_type"] = "embeddings_by_type"
    reply["texts"] = texts
    reply["meta"] = meta
    return reply
