"""What every request meets before a route: the API key and the body bound on /v1/, and OpenAI's error
objects for whatever fails (validation, unknown paths, the unexpected)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from embedding_service.wire.bearer import bearer_key, known_key
from gateway import errors
from gateway.openai_schema import EmbeddingRequest
from gateway.settings import GatewaySettings


def install(app: FastAPI, settings: GatewaySettings) -> None:
    keys = [k.encode() for k in settings.api_keys]

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        if request.url.path.startswith("/v1/"):
            if keys:
                given = bearer_key(request.headers.get("authorization"))
                if given is None or not known_key(given, keys):
                    return errors.unauthorized("missing or invalid API key (Authorization: Bearer <key>)").response()
            length = request.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > settings.max_body_bytes:
                return errors.body_too_large(settings.max_body_bytes).response()
        return await call_next(request)

    app.add_exception_handler(errors.OpenAIError, errors.openai_error_handler)

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
