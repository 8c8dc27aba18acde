"""The FastAPI application: OpenAI's embeddings REST schema over the gRPC Embed API."""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import threading
from contextlib import asynccontextmanager

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from embedding_client import AsyncEmbedClient, EmbeddingError
from embedding_client.aio import OUTPUTS
from embedding_client.v1 import embedding_pb2 as pb
from embedding_service.tracing import Tracer, env_tracer
from gateway import errors
from gateway.coalescing import EmbedCoalescing, Reply
from gateway.metrics import GatewayMetrics, ObserveRequests
from gateway.openai_schema import CreateEmbeddingResponse, EmbeddingRequest, ErrorResponse, Model, ModelList
from gateway.settings import GatewaySettings
from gateway.upstream import upstream_client

INT32_MAX = 2**31 - 1
OWNER = "embedding-service"
ERROR_RESPONSES = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 503, 504)}


def _inputs(body: EmbeddingRequest, max_inputs: int) -> list[pb.EmbedInput]:
    raw = body.input
    if isinstance(raw, str):
        items: list = [raw]
    elif raw and all(isinstance(x, int) for x in raw):
        items = [raw]  # one token array
    else:
        items = list(raw)
    if len(items) > max_inputs:
        raise errors.invalid_request(f"{len(items)} inputs; at most {max_inputs} per request", "input")
    out = []
    for item in items:
        if isinstance(item, str):
            out.append(pb.EmbedInput(text=item))
        else:
            if any(not 0 <= t <= INT32_MAX for t in item):
                raise errors.invalid_request("token ids must be non-negative 32-bit integers", "input")
            out.append(pb.EmbedInput(token_ids=pb.TokenIds(ids=item)))
    return out


def _render(reply: Reply, output_dtype: str, base64_out: bool) -> dict:
    dtype = OUTPUTS[output_dtype][1]  # output_dtype names the client library's outputs
    data = []
    for index, e in enumerate(reply.embeddings):
        raw = e.float32_le if output_dtype == "float" else e.packed
        if base64_out:
            vector: object = base64.b64encode(raw).decode("ascii")
        else:
            vector = np.frombuffer(raw, dtype=dtype).tolist()
        data.append({"object": "embedding", "index": index, "embedding": vector})
    usage = {"prompt_tokens": reply.prompt_tokens, "total_tokens": reply.prompt_tokens}
    return {"object": "list", "data": data, "model": reply.model, "usage": usage}


def create_app(settings: GatewaySettings, draining: threading.Event | None = None,
               tracer: Tracer | None = None) -> FastAPI:
    """The gateway; `draining` set (by main.DrainingServer on SIGTERM) turns /readyz to 503.

    `tracer`: where its spans go; by default from the standard OTEL_* variables
    (off unless an OTLP endpoint is set).
    """
    client_holder: dict[str, AsyncEmbedClient] = {}
    embedding: dict[str, EmbedCoalescing] = {}
    draining = draining or threading.Event()
    metrics = GatewayMetrics()
    tracer = tracer or env_tracer("gateway")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        client = client_holder["client"] = upstream_client(settings, metrics, tracer)
        embedding["calls"] = EmbedCoalescing(
            lambda request, deadline: client.call("Embed", request, deadline=deadline), settings.coalesce_max_inputs,
            settings.coalesce_max_in_flight, on_send=metrics.coalesced_callers.observe)
        try:
            yield
        finally:
            await client_holder.pop("client").close()
            tracer.shutdown()

    app = FastAPI(title="embedding-service OpenAI gateway", version="1", lifespan=lifespan)
    app.add_exception_handler(errors.OpenAIError, errors.openai_error_handler)

    async def call(method: str, request):
        try:
            return await client_holder["client"].call(method, request)
        except EmbeddingError as err:
            raise errors.from_service(err, settings.retry_after_s) from None

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return errors.from_validation(list(exc.errors()), EmbeddingRequest.model_fields).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        return errors.OpenAIError(exc.status_code, str(exc.detail), kind).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return errors.OpenAIError(500, "internal error in the gateway", "api_error").response()

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        if request.url.path.startswith("/v1/"):
            if settings.api_keys:
                header = request.headers.get("authorization", "")
                key = header[7:] if header.lower().startswith("bearer ") else ""
                if not any(hmac.compare_digest(key.encode(), k.encode()) for k in settings.api_keys):
                    return errors.unauthorized("missing or invalid API key (Authorization: Bearer <key>)").response()
            length = request.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > settings.max_body_bytes:
                return errors.body_too_large(settings.max_body_bytes).response()
        return await call_next(request)

    @app.post(
        "/v1/embeddings",
        response_model=CreateEmbeddingResponse,
        responses=ERROR_RESPONSES,
        # The body is parsed by hand (bounded, OpenAI errors); document it all the same.
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": EmbeddingRequest.model_json_schema()}},
            }
        },
    )
    async def create_embeddings(request: Request) -> Response:
        raw = bytearray()
        async for part in request.stream():  # bounded even without Content-Length
            raw += part
            if len(raw) > settings.max_body_bytes:
                raise errors.body_too_large(settings.max_body_bytes)
        try:
            body = EmbeddingRequest.model_validate_json(bytes(raw))
        except ValidationError as exc:
            raise errors.from_validation(exc.errors(), EmbeddingRequest.model_fields) from None
        if body.dimensions is not None and not 1 <= body.dimensions <= INT32_MAX:
            raise errors.invalid_request("dimensions must be a positive integer", "dimensions")
        inputs = _inputs(body, settings.max_inputs)
        deadline = asyncio.get_running_loop().time() + settings.request_timeout_s
        try:
            reply = await embedding["calls"].embed(body.model, inputs, body.dimensions, deadline,
                                                   OUTPUTS[body.output_dtype][0])
        except EmbeddingError as err:
            raise errors.from_service(err, settings.retry_after_s) from None
        except TimeoutError:  # its deadline passed while it waited to leave in a merged call
            raise errors.timeout() from None
        payload = json.dumps(_render(reply, body.output_dtype, body.encoding_format == "base64"), separators=(",", ":"))
        return Response(payload, media_type="application/json")

    def _model(m: pb.Model) -> dict:
        return Model(id=m.name, created=0, owned_by=OWNER).model_dump()

    @app.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
    async def list_models() -> dict:
        listing = await call("ListModels", pb.ListModelsRequest())
        return {"object": "list", "data": [_model(m) for m in listing.models]}

    @app.get("/v1/models/{model:path}", response_model=Model, responses=ERROR_RESPONSES)
    async def get_model(model: str) -> dict:
        try:
            return _model((await call("GetModel", pb.GetModelRequest(name=model))).model)
        except errors.OpenAIError as exc:
            if exc.status == 404:
                raise errors.model_not_found(model) from None
            raise

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    async def liveness() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readiness() -> JSONResponse:
        if draining.is_set():
            return JSONResponse({"status": "draining"}, status_code=503)
        ready = client_holder["client"].serving()
        return JSONResponse({"status": "ready" if ready else "not ready"}, status_code=200 if ready else 503)

    # Added last, so outermost of the app's middleware: it sees every response, refusals included.
    app.add_middleware(ObserveRequests, metrics=metrics, tracer=tracer)
    return app
