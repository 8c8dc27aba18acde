"""OpenAI's batch files, line for line: an input line read and checked, an output or error line written as
OpenAI writes them (`custom_id`, `response.status_code`, `response.body`).

A line that cannot be run (not JSON, a wrong body, too many inputs) is an error line of its own, with the status
and error body /v1/embeddings would have answered; only a file that cannot be a batch fails it (no lines, too many,
a custom_id twice, several models), with OpenAI's `errors.data`.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import orjson

from embedding_service.wire.openai_bodies import error_body

EMBEDDINGS = "/v1/embeddings"
ENDPOINTS = (EMBEDDINGS,)
OUTPUT_DTYPES = ("float", "int8", "uint8", "binary", "ubinary")
MAX_CUSTOM_ID = 512


@dataclass(frozen=True)
class Line:
    """A line that runs: its inputs and options."""

    custom_id: str
    model: str
    inputs: list[str]
    dimensions: int | None
    output_dtype: str
    base64: bool


@dataclass(frozen=True)
class BadLine:
    """A line answered without running: its custom_id (when it has one), status and error body."""

    custom_id: str | None
    status_code: int
    body: dict


class FileRefused(Exception):
    """The file cannot be a batch: OpenAI's errors.data entry."""

    def __init__(self, code: str, message: str, line: int | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.data = {"code": code, "message": message, "param": param, "line": line}


def _bad(custom_id: str | None, message: str, param: str | None = None, code: str | None = None,
         status: int = 400) -> BadLine:
    return BadLine(custom_id, status, error_body(message, "invalid_request_error", param, code))


def parse_line(raw: bytes, endpoint: str, max_inputs: int) -> Line | BadLine:
    """One line of the input file, checked as /v1/embeddings checks its body."""
    try:
        line = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        return _bad(None, f"the line is not JSON: {error}", code="invalid_json")
    if not isinstance(line, dict):
        return _bad(None, "the line is not a JSON object", code="invalid_json")
    custom_id = line.get("custom_id")
    if not isinstance(custom_id, str) or not 1 <= len(custom_id) <= MAX_CUSTOM_ID:
        return _bad(None, f"custom_id must be a string of 1 to {MAX_CUSTOM_ID} characters", "custom_id")
    if line.get("method", "POST") != "POST":
        return _bad(custom_id, "method must be POST", "method")
    if line.get("url") != endpoint:
        return _bad(custom_id, f"url must be the batch's endpoint {endpoint}", "url", "mismatched_endpoint")
    body = line.get("body")
    if not isinstance(body, dict):
        return _bad(custom_id, "body must be a JSON object", "body")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return _bad(custom_id, "body.model must be a string", "model")
    value = body.get("input")
    inputs = [value] if isinstance(value, str) else value
    if not isinstance(inputs, list) or not inputs:
        return _bad(custom_id, "input must be a string or a non-empty array of strings", "input")
    if len(inputs) > max_inputs:
        return _bad(custom_id, f"input holds {len(inputs)} items; at most {max_inputs} per line", "input")
    if not all(isinstance(i, str) for i in inputs):
        return _bad(custom_id, "input must hold strings (token-id inputs are not taken in batch files)", "input")
    if any(not i for i in inputs):
        return _bad(custom_id, "input must not hold empty strings", "input")
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        return _bad(custom_id, "encoding_format must be float or base64", "encoding_format")
    dimensions = body.get("dimensions")
    if dimensions is not None and (not isinstance(dimensions, int) or isinstance(dimensions, bool) or dimensions < 1):
        return _bad(custom_id, "dimensions must be a positive integer", "dimensions")
    dtype = body.get("output_dtype", "float")
    if dtype not in OUTPUT_DTYPES:
        return _bad(custom_id, f"output_dtype must be one of {', '.join(OUTPUT_DTYPES)}", "output_dtype")
    return Line(custom_id, model, inputs, dimensions, dtype, encoding == "base64")


def result_line(custom_id: str | None, status_code: int, body: dict) -> bytes:
    """An output (2xx) or error line of OpenAI's batch output files."""
    return orjson.dumps({
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": {"status_code": status_code, "request_id": f"req_{uuid.uuid4().hex}", "body": body},
        "error": None,
    }) + b"\n"
