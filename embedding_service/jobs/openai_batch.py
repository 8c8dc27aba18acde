"""OpenAI's batch files, line for line: an input line read and checked, an output or error line written as
OpenAI writes them (`custom_id`, `response.status_code`, `response.body`).

A batch's endpoint is /v1/embeddings (OpenAI's body) or /v1/rerank (Cohere's v2 body, as the gateway's /v1/rerank
takes it). A line that cannot be run (not JSON, a wrong body, too many inputs) is an error line of its own, with the
status and error body the endpoint would have answered; only a file that cannot be a batch fails it (no lines, too
many, a custom_id twice, several models), with OpenAI's `errors.data`.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

import orjson

from embedding_service.wire.refusals import too_many_characters
from embedding_service.wire.rest_bodies import error_body

if TYPE_CHECKING:
    from embedding_service.config import JobLimits, Limits

EMBEDDINGS = "/v1/embeddings"
RERANK = "/v1/rerank"
ENDPOINTS = (EMBEDDINGS, RERANK)
KIND_OF_ENDPOINT = {EMBEDDINGS: "embedding", RERANK: "rerank"}  # the model kind an endpoint's lines run on
RERANK_KEYS = frozenset({"model", "query", "documents", "top_n", "return_documents", "raw_scores", "truncate",
                         "priority"})
OUTPUT_DTYPES = ("float", "int8", "uint8", "binary", "ubinary")
MAX_CUSTOM_ID = 512


@dataclass(frozen=True)
class Line:
    """A line that runs: its model, and its inputs and options as the endpoint's columns (openai_input.SCHEMAS)."""

    custom_id: str
    model: str
    row: dict


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


def parse_line(raw: bytes, endpoint: str, lines: JobLimits, calls: Limits) -> Line | BadLine:
    """One line of the input file, checked as its endpoint (the batch's) checks a body: within the batch's bound on
    a line's inputs (`lines`) and the service's own bounds on one call (`calls`: characters of an input, a query and
    each document; documents of a rerank)."""
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
    row = (_embedding_row(custom_id, body, min(lines.max_inputs_per_line, calls.max_inputs_per_request), calls)
           if endpoint == EMBEDDINGS else _rerank_row(custom_id, body, calls))
    return row if isinstance(row, BadLine) else Line(custom_id, model, row)


def _too_large(custom_id: str, what: str, text: str, calls: Limits, param: str) -> BadLine | None:
    """A text past the service's bound on one input's characters (as the gateway's routes refuse it), or None."""
    if len(text) <= calls.max_chars_per_input:
        return None
    return _bad(custom_id, too_many_characters(what, len(text), calls.max_chars_per_input), param, "input_too_large")


def _embedding_row(custom_id: str, body: dict, max_inputs: int, calls: Limits) -> dict | BadLine:
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
    for i, text in enumerate(inputs):
        if (refused := _too_large(custom_id, f"input {i}", text, calls, "input")) is not None:
            return refused
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        return _bad(custom_id, "encoding_format must be float or base64", "encoding_format")
    dimensions = body.get("dimensions")
    if dimensions is not None and not _positive(dimensions):
        return _bad(custom_id, "dimensions must be a positive integer", "dimensions")
    dtype = body.get("output_dtype", "float")
    if dtype not in OUTPUT_DTYPES:
        return _bad(custom_id, f"output_dtype must be one of {', '.join(OUTPUT_DTYPES)}", "output_dtype")
    return {"inputs": inputs, "dimensions": dimensions, "output_dtype": dtype, "base64": encoding == "base64"}


def _rerank_row(custom_id: str, body: dict, calls: Limits) -> dict | BadLine:
    """Cohere's v2 rerank body as the gateway's /v1/rerank takes it (its unknown keys refused: an option not served
    must not be dropped without a word)."""
    unknown = sorted(set(body) - RERANK_KEYS)
    if unknown:
        return _bad(custom_id, f"unknown field {unknown[0]!r}", unknown[0])
    query = body.get("query")
    if not isinstance(query, str) or not query:
        return _bad(custom_id, "query must be a non-empty string", "query")
    if (refused := _too_large(custom_id, "query", query, calls, "query")) is not None:
        return refused
    documents = body.get("documents")
    if not isinstance(documents, list) or not documents:
        return _bad(custom_id, "documents must be a non-empty array", "documents")
    if len(documents) > calls.max_documents_per_rerank:
        return _bad(custom_id, f"documents holds {len(documents)} items; at most {calls.max_documents_per_rerank} "
                    "per line (limits.max_documents_per_rerank)", "documents")
    texts = []
    for i, document in enumerate(documents):
        text = document.get("text") if isinstance(document, dict) else document
        if not isinstance(text, str) or not text:
            return _bad(custom_id, f'documents[{i}] must be a non-empty string or an object with a "text"',
                        "documents")
        if (refused := _too_large(custom_id, f"document {i}", text, calls, "documents")) is not None:
            return refused
        texts.append(text)
    top_n = body.get("top_n")
    if top_n is not None and not (_positive(top_n) and top_n <= len(texts)):
        return _bad(custom_id, f"top_n must be between 1 and the {len(texts)} documents", "top_n")
    flags = {key: body.get(key, default) for key, default in
             (("return_documents", False), ("raw_scores", False), ("truncate", True))}
    for key, value in flags.items():
        if not isinstance(value, bool):
            return _bad(custom_id, f"{key} must be a boolean", key)
    return {"query": query, "documents": texts, "top_n": top_n, "return_documents": flags["return_documents"],
            "activation": not flags["raw_scores"], "truncate": flags["truncate"]}


def _positive(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def result_line(custom_id: str | None, status_code: int, body: dict) -> bytes:
    """An output (2xx) or error line of OpenAI's batch output files."""
    return orjson.dumps({
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": {"status_code": status_code, "request_id": f"req_{uuid.uuid4().hex}", "body": body},
        "error": None,
    }) + b"\n"
