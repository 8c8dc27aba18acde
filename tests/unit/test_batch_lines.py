"""An OpenAI batch's lines are bounded as the calls they stand for: the service's own bounds on one call (an
input's, a query's and a document's characters; a rerank's documents) refuse a line with the error the gateway's
routes give, and the batch's own bound on a line's inputs."""

from __future__ import annotations

import orjson
import pytest

from embedding_service.config import JobLimits, Limits
from embedding_service.jobs.openai_batch import EMBEDDINGS, RERANK, BadLine, Line, parse_line

CALLS = Limits(max_chars_per_input=50, max_documents_per_rerank=3)
LINES = JobLimits(max_inputs_per_line=4)


def _line(url: str, **body) -> bytes:
    return orjson.dumps({"custom_id": "c", "method": "POST", "url": url, "body": {"model": "m", **body}})


@pytest.mark.parametrize(("url", "body", "param", "code"), [
    (EMBEDDINGS, {"input": "x" * 51}, "input", "input_too_large"),
    (EMBEDDINGS, {"input": ["ok", "x" * 51]}, "input", "input_too_large"),
    (EMBEDDINGS, {"input": ["a"] * 5}, "input", None),
    (RERANK, {"query": "q" * 51, "documents": ["d"]}, "query", "input_too_large"),
    (RERANK, {"query": "q", "documents": ["d", {"text": "x" * 51}]}, "documents", "input_too_large"),
    (RERANK, {"query": "q", "documents": ["d"] * 4}, "documents", None),
])
def test_a_line_past_a_bound_is_an_error_line_naming_its_param(url, body, param, code):
    line = parse_line(_line(url, **body), url, LINES, CALLS)
    assert isinstance(line, BadLine) and line.status_code == 400
    error = line.body["error"]
    assert (error["param"], error["code"]) == (param, code), error["message"]


@pytest.mark.parametrize(("url", "body"), [
    (EMBEDDINGS, {"input": ["x" * 50] * 4}),
    (RERANK, {"query": "q" * 50, "documents": ["d" * 50] * 3}),
])
def test_a_line_at_its_bounds_runs(url, body):
    assert isinstance(parse_line(_line(url, **body), url, LINES, CALLS), Line)


def test_a_line_takes_no_more_inputs_than_a_call():
    calls = Limits(max_inputs_per_request=2)
    line = parse_line(_line(EMBEDDINGS, input=["a", "b", "c"]), EMBEDDINGS, LINES, calls)
    assert isinstance(line, BadLine) and line.body["error"]["param"] == "input"
    assert isinstance(parse_line(_line(EMBEDDINGS, input=["a", "b"]), EMBEDDINGS, LINES, calls), Line)
