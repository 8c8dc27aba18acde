"""The REST response bodies written once: what the gateway's /v1/embeddings (OpenAI's) and /v1/rerank (Cohere's v2)
return is what a batch job writes in each output line's `response.body`, and both write OpenAI's error object the
same way."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterable

import numpy as np


def embeddings_body(vectors: Iterable[np.ndarray], base64_out: bool, model: str, prompt_tokens: int) -> dict:
    """The body of /v1/embeddings: each vector as numbers (floats, or ints of a compact type), or base64 of its
    little-endian bytes."""
    data = []
    for index, vector in enumerate(vectors):
        if base64_out:
            value: object = base64.b64encode(vector.astype(vector.dtype.newbyteorder("<"), copy=False)
                                             .tobytes()).decode("ascii")
        else:
            value = vector.tolist()
        data.append({"object": "embedding", "index": index, "embedding": value})
    usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
    return {"object": "list", "data": data, "model": model, "usage": usage}


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def rerank_body(model: str, ranked: Iterable[tuple[int, float, str | None]], total_tokens: int) -> dict:
    """The body of /v1/rerank (Cohere's v2): the ranked (index, relevance_score, document or None) results."""
    results = []
    for index, score, document in ranked:
        result: dict = {"index": index, "relevance_score": score}
        if document is not None:
            result["document"] = {"text": document}
        results.append(result)
    return {"id": str(uuid.uuid4()), "model": model, "results": results,
            "meta": {"api_version": {"version": "2"}, "billed_units": {"search_units": 1}},
            "usage": {"total_tokens": total_tokens}}
