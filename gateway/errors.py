"""OpenAI error objects and their HTTP statuses: the one place they are decided."""

from __future__ import annotations

import logging

import grpc
from fastapi import Request
from fastapi.responses import JSONResponse

from embedding_client.errors import EmbeddingError
from embedding_service.wire.reasons import Reason
from embedding_service.wire.rest_bodies import error_body

logger = logging.getLogger("gateway")

# Which request field an INVALID_ARGUMENT reason of the service is about.
_PARAM_BY_REASON = {
    Reason.NO_INPUTS: "input",
    Reason.EMPTY_INPUT: "input",
    Reason.INPUT_MISSING: "input",
    Reason.TOO_MANY_INPUTS: "input",
    Reason.INPUT_TOO_LARGE: "input",
    Reason.INPUT_TOO_LONG: "input",
    Reason.TOKEN_ID_OUT_OF_RANGE: "input",
    Reason.INVALID_DIMENSIONS: "dimensions",
    Reason.INVALID_ENCODING: "encoding_format",
    Reason.MODEL_NOT_FOUND: "model",
}
# The service's field names (in the error's metadata) that the REST requests name otherwise.
_REST_PARAMS = {"inputs": "input"}


class OpenAIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.type, self.param, self.code), status_code=self.status, headers=self.headers)


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, "invalid_request_error", param, code)


# ---- the Batch API's (batch_routes.py) -----------------------------------------


def batch_api_off() -> OpenAIError:
    return OpenAIError(404, "the Batch API is not configured on this gateway (jobs_storage_root)",
                       "invalid_request_error", None, "not_configured")


def no_such_object(kind: str, object_id: str) -> OpenAIError:
    """As OpenAI answers an id this key does not own, or that does not exist: the same 404 for both."""
    return OpenAIError(404, f"No {kind} found with id '{object_id}'.", "invalid_request_error", None, "not_found")


def key_bound_reached(bound: str, limit: int) -> OpenAIError:
    """A key's bound on its batches or files: 429 for its running batches (it frees itself), else 400."""
    return OpenAIError(429 if "running" in bound else 400, f"this key holds as many as {bound} allows ({limit})",
                       "invalid_request_error", None, bound)


def file_too_large(limit: int) -> OpenAIError:
    return OpenAIError(413, f"the file is larger than {limit} bytes (the batch input file bound)",
                       "invalid_request_error", "file", "file_too_large")


def idempotency_key_reused(job_id: str) -> OpenAIError:
    """422, as the IETF's Idempotency-Key draft answers a key sent again with another request."""
    return OpenAIError(422, f"Idempotency-Key was sent before with another request (batch {job_id}); a new batch "
                       "needs a new key", "invalid_request_error", None, "idempotency_key_reused")


def unauthorized(message: str) -> OpenAIError:
    return OpenAIError(401, message, "invalid_request_error", None, "invalid_api_key")


def body_too_large(limit: int) -> OpenAIError:
    return OpenAIError(413, f"request body exceeds {limit} bytes", "invalid_request_error", None, "request_too_large")


def model_not_found(model: str) -> OpenAIError:
    return OpenAIError(404, f"The model '{model}' does not exist", "invalid_request_error", "model", "model_not_found")


def timeout() -> OpenAIError:
    return OpenAIError(504, "the embedding service did not answer in time", "timeout", None, "timeout")


def overloaded(queued: int, retry_after_s: int) -> OpenAIError:
    """The gateway's own merging queue is full: a 429 the SDKs retry after Retry-After, as the service's full
    queues answer."""
    return OpenAIError(429, f"the gateway holds {queued} requests waiting for the embedding service already; "
                       "retry after the Retry-After delay", "rate_limit_error", None, "rate_limit_exceeded",
                       {"Retry-After": str(max(retry_after_s, 1))})


def too_many_values(counted: int, limit: int) -> OpenAIError:
    """A body that would parse into more objects than max_json_values (json_body.py)."""
    return invalid_request(f"the request body holds more than {limit} JSON values ({counted} counted; "
                           "max_json_values): send fewer inputs or token ids per request")


def bodies_in_flight(limit: int, retry_after_s: int) -> OpenAIError:
    """The bodies of other requests fill max_body_bytes_in_flight: a 429 the SDKs retry after Retry-After."""
    return OpenAIError(429, f"the gateway holds {limit} bytes of request bodies already (max_body_bytes_in_flight); "
                       "retry after the Retry-After delay", "rate_limit_error", None, "rate_limit_exceeded",
                       {"Retry-After": str(max(retry_after_s, 1))})


def from_validation(problems: list[dict], known_params) -> OpenAIError:
    """A pydantic/FastAPI validation failure as OpenAI's 400, naming the request field when it is one."""
    first = problems[0] if problems else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = loc[0] if loc and loc[0] in known_params else None
    return invalid_request(first.get("msg", "invalid request body"), param)


def from_service(err: EmbeddingError, retry_after_s: int) -> OpenAIError:
    """The OpenAI error of a failed gRPC call (the client library's typed error)."""
    code, message = err.code, err.message
    reason = Reason[err.reason] if err.reason in Reason.__members__ else None
    retry_after = {"Retry-After": str(max(retry_after_s, int(round(err.retry_after_s or 0))))}
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        if reason == Reason.REQUEST_TOO_LARGE:
            return OpenAIError(413, message, "invalid_request_error", None, "request_too_large")
        field = err.metadata.get("field")  # the request field by its proto name, where the service names one
        param = _REST_PARAMS.get(field, field) if field else _PARAM_BY_REASON.get(reason)
        return OpenAIError(400, message, "invalid_request_error", param, reason.name.lower() if reason else None)
    if reason == Reason.WRONG_MODEL_KIND:  # the caller named a model of another kind: its own error
        return OpenAIError(400, message, "invalid_request_error", "model", "wrong_model_kind")
    if code == grpc.StatusCode.NOT_FOUND:
        return OpenAIError(404, message, "invalid_request_error", "model", "model_not_found")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return OpenAIError(429, message, "rate_limit_error", None, "rate_limit_exceeded", retry_after)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return OpenAIError(503, "the embedding service is unavailable; retry later", "service_unavailable", None,
                           "service_unavailable", retry_after)
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        # MODEL_REFUSED: the model's replicas missed their accuracy check; the operator must act, not the caller.
        return OpenAIError(503, message, "service_unavailable", "model", reason.name.lower() if reason else None)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return timeout()
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        # The gateway's own upstream key, not the user's: the operator must fix it.
        logger.error("the embedding service refused the gateway: %s (%s); check GATEWAY_UPSTREAM_API_KEY",
                     message, err.reason)
        return OpenAIError(500, "the gateway is not allowed to call the embedding service", "api_error", None,
                           "upstream_unauthorized")
    return OpenAIError(502, "the embedding service failed; see its logs", "api_error", None, "upstream_error")


async def openai_error_handler(request: Request, exc: OpenAIError) -> JSONResponse:
    return exc.response()
