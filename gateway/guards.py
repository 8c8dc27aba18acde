"""What every request meets before a route: the API key and the body bounds on /v1/, /v2/ and ROOT_ROUTES (one
body's size, and the bytes of every body held at once), and OpenAI's error objects for whatever fails (validation,
unknown paths, the unexpected)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from embedding_service.wire.bearer import bearer_key, known_key
from gateway import embeddings, errors
from gateway.body_budget import BodyBudget, HeldBody
from gateway.openai_schema import EmbeddingRequest
from gateway.settings import GatewaySettings

logger = logging.getLogger("gateway")
# TEI's and vLLM's routes at the root (classify_routes.py, tokenize_routes.py), guarded as /v1/ and /v2/ are.
ROOT_ROUTES = frozenset({"/predict", "/tokenize", "/detokenize", "/decode"})
# OpenAI's file upload: its body is not held (the body budget's), but streamed to the storage root (uploads.py).
UPLOAD_PATH = "/v1/files"


class Guard:
    """Pure ASGI middleware (BaseHTTPMiddleware costs a task, streams and events per request): the API key
    and the declared body size of every /v1/, /v2/ and ROOT_ROUTES request, refused before the app reads it; then
    its body's bytes, taken from `bodies` (shared by every Guard of the app) as they arrive and given back once it is
    answered."""

    def __init__(self, app, settings: GatewaySettings, bodies: BodyBudget) -> None:
        self.app = app
        self.keys = [k.encode() for k in settings.api_keys]
        self.max_body_bytes = settings.max_body_bytes
        self.bodies = bodies
        self.retry_after_s = settings.retry_after_s

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and (scope["path"].startswith(("/v1/", "/v2/")) or scope["path"] in ROOT_ROUTES):
            upload = scope["path"] == UPLOAD_PATH and scope["method"] == "POST"
            refusal = self._refusal(Headers(scope=scope), upload)
            if refusal is not None:
                await refusal.response()(scope, receive, send)
                return
            if upload:  # streamed to the storage root as it arrives, bounded by its own limit (uploads.py)
                await self.app(scope, receive, send)
                return
            held = self.bodies.holder()
            try:
                await self.app(scope, self._counted(receive, held), send)
            finally:
                held.give_back()
            return
        await self.app(scope, receive, send)

    def _counted(self, receive, held: HeldBody):
        """`receive`, taking each chunk of the body from the budget; OpenAIError 429 raised to the route reading it
        when the chunk does not fit."""

        async def counted():
            message = await receive()
            if not held.take(len(message.get("body", b""))):
                raise self._busy()
            return message

        return counted

    def _busy(self) -> errors.OpenAIError:
        if not self.bodies.refusals:
            logger.warning("request bodies held reached max_body_bytes_in_flight (%d bytes): refusing requests with "
                           "429 until some are answered", self.bodies.limit)
        self.bodies.refusals += 1
        return errors.bodies_in_flight(self.bodies.limit, self.retry_after_s)

    def _refusal(self, headers: Headers, upload: bool = False) -> errors.OpenAIError | None:
        if self.keys:
            given = bearer_key(headers.get("authorization"))
            if given is None or not known_key(given, self.keys):
                return errors.unauthorized("missing or invalid API key (Authorization: Bearer <key>)")
        if upload:
            return None
        length = headers.get("content-length")
        if length is not None and length.isdigit():
            if int(length) > self.max_body_bytes:
                return errors.body_too_large(self.max_body_bytes)
            if not self.bodies.fits(int(length)):  # refused before a byte of it is read
                return self._busy()
        return None


def install(app: FastAPI, settings: GatewaySettings) -> None:
    app.add_middleware(Guard, settings=settings, bodies=app.state.bodies)
    app.add_exception_handler(errors.OpenAIError, errors.openai_error_handler)

    @app.exception_handler(embeddings.ClientGone)
    async def _gone(request: Request, exc: embeddings.ClientGone) -> Response:
        # The caller left mid-body (any route that reads one): counted as 499, not a 500 of the gateway's.
        return embeddings.gone()

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
