"""OpenAI error objects and their HTTP statuses: the one place they are decided."""

from __future__ import annotations

import grpc
from fastapi import Request
from fastapi.responses import JSONResponse
from google.rpc import error_details_pb2, status_pb2

STATUS_DETAILS_KEY = "grpc-status-details-bin"

# Which request field an INVALID_ARGUMENT reason of the service is about.
_PARAM_BY_REASON = {
    "NO_INPUTS": "input",
    "EMPTY_INPUT": "input",
    "INPUT_MISSING": "input",
    "TOO_MANY_INPUTS": "input",
    "INPUT_TOO_LARGE": "input",
    "INPUT_TOO_LONG": "input",
    "TOKEN_ID_OUT_OF_RANGE": "input",
    "INVALID_DIMENSIONS": "dimensions",
    "INVALID_ENCODING": "encoding_format",
    "MODEL_NOT_FOUND": "model",
}


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
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, "invalid_request_error", param, code)


def unauthorized(message: str) -> OpenAIError:
    return OpenAIError(401, message, "invalid_request_error", None, "invalid_api_key")


def body_too_large(limit: int) -> OpenAIError:
    return OpenAIError(413, f"request body exceeds {limit} bytes", "invalid_request_error", None, "request_too_large")


def model_not_found(model: str) -> OpenAIError:
    return OpenAIError(404, f"The model '{model}' does not exist", "invalid_request_error", "model", "model_not_found")


def from_validation(problems: list[dict], known_params) -> OpenAIError:
    """A pydantic/FastAPI validation failure as OpenAI's 400, naming the request field when it is one."""
    first = problems[0] if problems else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = loc[0] if loc and loc[0] in known_params else None
    return invalid_request(first.get("msg", "invalid request body"), param)


def rich_status(err: grpc.RpcError) -> tuple[str | None, float | None]:
    """The service's ErrorInfo reason and RetryInfo delay, when it sent them."""
    metadata = err.trailing_metadata() or ()
    raw = next((v for k, v in metadata if k == STATUS_DETAILS_KEY), None)
    if raw is None:
        return None, None
    reason = delay = None
    for detail in status_pb2.Status.FromString(raw).details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            delay = retry.retry_delay.ToNanoseconds() / 1e9
    return reason, delay


def from_grpc(err: grpc.RpcError, retry_after_s: int) -> OpenAIError:
    code = err.code()
    message = err.details() or code.name.lower()
    reason, delay = rich_status(err)
    if reason is None and ":" in message:  # failed streams carry "REASON: message"
        reason = message.split(":", 1)[0]
    retry_after = {"Retry-After": str(max(retry_after_s, int(round(delay or 0))))}
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        if reason == "REQUEST_TOO_LARGE":
            return OpenAIError(413, message, "invalid_request_error", None, "request_too_large")
        return OpenAIError(400, message, "invalid_request_error", _PARAM_BY_REASON.get(reason or ""), (reason or "").lower() or None)
    if code == grpc.StatusCode.NOT_FOUND:
        return OpenAIError(404, message, "invalid_request_error", "model", "model_not_found")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return OpenAIError(429, message, "rate_limit_error", None, "rate_limit_exceeded", retry_after)
    if code == grpc.StatusCode.UNAVAILABLE:
        return OpenAIError(503, "the embedding service is unavailable; retry later", "service_unavailable", None, "service_unavailable", retry_after)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return OpenAIError(504, "the embedding service did not answer in time", "timeout", None, "timeout")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return unauthorized(message)
    return OpenAIError(502, "the embedding service failed; see its logs", "api_error", None, "upstream_error")


async def openai_error_handler(request: Request, exc: OpenAIError) -> JSONResponse:
    return exc.response()
