"""The gateway's routes: OpenAI's embeddings and models under /v1, and the operator's /metrics, /healthz,
/readyz. They reach the service through the app's state (app.py): its client and its Embed coalescing."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from embedding_client import EmbeddingError
from embedding_client.v1 import embedding_pb2 as pb
from gateway import embeddings, errors
from gateway.openai_schema import CreateEmbeddingResponse, EmbeddingRequest, ErrorResponse, Model, ModelList

OWNER = "embedding-service"
ERROR_RESPONSES = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 503, 504)}

openai = APIRouter(prefix="/v1")
operations = APIRouter()


async def read_body(request: Request, schema=EmbeddingRequest):
    """The request's JSON body as `schema`, read within the body bound; OpenAI's 400 when it does not fit."""
    settings = request.app.state.settings
    return embeddings.parse(await embeddings.read_body(request.receive, settings.max_body_bytes), settings, schema)


@openai.post(
    embeddings.PATH.removeprefix("/v1"),
    response_model=CreateEmbeddingResponse,
    responses=ERROR_RESPONSES,
    # The body is parsed by hand (bounded, OpenAI errors); document it all the same.
    openapi_extra={"requestBody": {"required": True,
                                   "content": {"application/json": {"schema": EmbeddingRequest.model_json_schema()}}}},
)
async def create_embeddings(request: Request) -> Response:
    """Reached only where the app sees the path with a prefix (a root_path): app.py serves POST /v1/embeddings
    before FastAPI routes."""
    return Response(await embeddings.reply(request.app.state, request.receive), media_type="application/json")


async def call(request: Request, method: str, message):
    """EmbedService.<method> with the client's retries; the service's errors as OpenAI's."""
    try:
        return await request.app.state.client.call(method, message)
    except EmbeddingError as err:
        raise errors.from_service(err, request.app.state.settings.retry_after_s) from None


def _model(m: pb.Model) -> dict:
    return Model(id=m.name, created=0, owned_by=OWNER).model_dump()


@openai.get("/models", response_model=ModelList, responses=ERROR_RESPONSES)
async def list_models(request: Request) -> dict:
    listing = await call(request, "ListModels", pb.ListModelsRequest())
    return {"object": "list", "data": [_model(m) for m in listing.models]}


@openai.get("/models/{model:path}", response_model=Model, responses=ERROR_RESPONSES)
async def get_model(request: Request, model: str) -> dict:
    try:
        return _model((await call(request, "GetModel", pb.GetModelRequest(name=model))).model)
    except errors.OpenAIError as exc:
        if exc.status == 404:
            raise errors.model_not_found(model) from None
        raise


@operations.get("/metrics", include_in_schema=False)
async def prometheus_metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@operations.get("/healthz")
async def liveness() -> dict:
    return {"status": "ok"}


@operations.get("/readyz")
async def readiness(request: Request) -> JSONResponse:
    state = request.app.state
    if state.draining.is_set():
        return JSONResponse({"status": "draining"}, status_code=503)
    ready = state.client.serving()
    return JSONResponse({"status": "ready" if ready else "not ready"}, status_code=200 if ready else 503)
