"""The gateway's rerank and sparse routes: Cohere's v2 rerank at /v1/rerank and /v2/rerank (Jina's and
vLLM's clients send the same shape), and sparse vectors at /v1/embeddings/sparse, over the service's Rerank
and EmbedSparse. Auth, body bounds, error objects and metrics are the embeddings route's (guards.py,
errors.py, metrics.py)."""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from embedding_client.v1 import embedding_pb2 as pb
from embedding_service.wire.rest_bodies import rerank_body
from gateway import errors
from gateway.routes import ERROR_RESPONSES, call, read_body
from gateway.scoring_schema import (
    RerankRequest,
    RerankResponse,
    SparseEmbeddingRequest,
    SparseEmbeddingResponse,
)

scoring = APIRouter()


def _documented(schema) -> dict:
    # The body is parsed by hand (bounded, OpenAI errors); document it all the same.
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema.model_json_schema()}}}}


def _truncation(truncate: bool) -> int:
    return pb.TRUNCATION_POLICY_END if truncate else pb.TRUNCATION_POLICY_REJECT


def _positive(value: int, param: str) -> int:
    """A count the proto carries as int32; its upper bound is the service's to check."""
    if not 1 <= value <= 2**31 - 1:
        raise errors.invalid_request(f"{param} must be a positive integer", param)
    return value


def _json(payload: dict) -> Response:
    return Response(orjson.dumps(payload), media_type="application/json")


async def _rerank(request: Request) -> Response:
    body: RerankRequest = await read_body(request, RerankRequest)  # its documents' texts, bounded
    message = pb.RerankRequest(model=body.model or "", query=body.query, documents=body.documents,
                               return_documents=body.return_documents, activation=not body.raw_scores,
                               truncation=_truncation(body.truncate))
    if body.top_n is not None:
        message.top_n = _positive(body.top_n, "top_n")
    reply: pb.RerankResponse = await call(request, "Rerank", message)
    ranked = ((r.index, r.score, r.document if body.return_documents else None) for r in reply.results)
    return _json(rerank_body(reply.model, ranked, reply.usage.total_tokens))


for path in ("/v1/rerank", "/v2/rerank"):
    scoring.add_api_route(path, _rerank, methods=["POST"], response_model=RerankResponse, responses=ERROR_RESPONSES,
                          openapi_extra=_documented(RerankRequest), name=f"rerank {path}")


@scoring.post("/v1/embeddings/sparse", response_model=SparseEmbeddingResponse, responses=ERROR_RESPONSES,
              openapi_extra=_documented(SparseEmbeddingRequest))
async def create_sparse_embeddings(request: Request) -> Response:
    body: SparseEmbeddingRequest = await read_body(request, SparseEmbeddingRequest)  # its input bounded
    texts = [body.input] if isinstance(body.input, str) else body.input
    message = pb.EmbedSparseRequest(model=body.model or "", inputs=texts, return_tokens=body.return_tokens,
                                    truncation=_truncation(body.truncate))
    if body.top_k is not None:
        message.top_k = _positive(body.top_k, "top_k")
    reply: pb.EmbedSparseResponse = await call(request, "EmbedSparse", message)
    data = []
    for e in reply.embeddings:
        item = {"object": "sparse_embedding", "index": e.index, "indices": list(e.indices), "values": list(e.values),
                "active_terms": e.active_terms}
        if body.return_tokens:
            item["terms"] = list(e.terms)
        data.append(item)
    tokens = reply.usage.prompt_tokens
    return _json({"object": "list", "data": data, "model": reply.model,
                  "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})
