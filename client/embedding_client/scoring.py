"""Rerank and sparse calls of the asyncio client (AsyncEmbedClient inherits them): big jobs cut into calls
within the service's published limits (max_documents_per_rerank, max_inputs_per_request, max_request_bytes),
each call with the client's retries, targets and deadline.

A rerank of more documents than one call takes is scored call by call and ranked here, over every
document: the scores of one query on one model compare across calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from embedding_client.encodings import TRUNCATION
from embedding_client.planning import REQUEST_OVERHEAD, plan_calls
from embedding_client.v1 import embedding_pb2 as pb

# Rerank and sparse models truncate (END, as sentence-transformers does) or refuse (REJECT).
SCORING_TRUNCATION = {k: TRUNCATION[k] for k in ("end", "reject")}


@dataclass(frozen=True)
class Ranked:
    """One scored document: its position in the call, its score, the document when asked, its pair's tokens."""

    index: int
    score: float
    document: str | None
    tokens: int


@dataclass(frozen=True)
class RerankResult:
    model: str
    results: list[Ranked]  # highest score first (ties in document order), top_n of them when asked
    tokens: int  # of every query-document pair scored


@dataclass(frozen=True)
class SparseVector:
    indices: np.ndarray  # int32 vocabulary ids, ascending
    values: np.ndarray  # float32 weights, in the order of indices
    tokens: int
    active_terms: int  # terms above zero before top_k cut them
    terms: list[str] | None = None


@dataclass(frozen=True)
class SparseResult:
    model: str
    vectors: list[SparseVector]  # one per input, in input order
    dimensions: int  # the vocabulary's size
    tokens: int


def scoring_policy(truncation: str) -> int:
    """The proto value of a rerank, sparse or classify truncation ("end" or "reject")."""
    if truncation not in SCORING_TRUNCATION:
        raise ValueError(f"truncation must be one of {sorted(SCORING_TRUNCATION)}, not {truncation!r}")
    return SCORING_TRUNCATION[truncation]


class ScoringCalls:
    """Needs the client's `limits()`, `call()` and `deadline()`."""

    async def rerank(self, query: str, documents: Sequence[str], *, model: str = "", top_n: int | None = None,
                     return_documents: bool = False, activation: bool = False, truncation: str = "end",
                     timeout_s: float | None = None) -> RerankResult:
        """`documents` ranked by their score against `query` (raw logits, or the model's activation)."""
        policy = scoring_policy(truncation)
        documents = list(documents)
        if top_n is not None and not 1 <= top_n <= len(documents):
            raise ValueError(f"top_n must be between 1 and the {len(documents)} documents, got {top_n}")
        deadline = self.deadline(timeout_s)
        limits = await self.limits()
        sizes = [len(d.encode()) for d in documents]
        overhead = REQUEST_OVERHEAD + len(query.encode())
        runs = plan_calls(sizes, limits.max_documents_per_rerank, limits.max_request_bytes, overhead) or [(0, 0)]
        fields = {"model": model, "query": query, "activation": activation, "truncation": policy}
        if len(runs) == 1:  # one call: the service ranks and cuts
            request = pb.RerankRequest(documents=documents, return_documents=return_documents, **fields)
            if top_n is not None:
                request.top_n = top_n
            reply = await self.call("Rerank", request, deadline=deadline)
            return RerankResult(reply.model, [Ranked(r.index, r.score, r.document if return_documents else None,
                                                     r.tokens) for r in reply.results], reply.usage.total_tokens)
        scores = np.empty(len(documents), dtype=np.float32)
        counts = np.zeros(len(documents), dtype=np.int64)
        name = ""
        for start, end in runs:
            reply = await self.call("Rerank", pb.RerankRequest(documents=documents[start:end], **fields),
                                    deadline=deadline)
            for r in reply.results:
                scores[start + r.index] = r.score
                counts[start + r.index] = r.tokens
            name = reply.model
        order = np.argsort(-scores, kind="stable")[: top_n or len(documents)]
        ranked = [Ranked(int(i), float(scores[i]), documents[i] if return_documents else None, int(counts[i]))
                  for i in order]
        return RerankResult(name, ranked, int(counts.sum()))

    async def embed_sparse(self, texts: Sequence[str], *, model: str = "", top_k: int | None = None,
                           return_tokens: bool = False, truncation: str = "end",
                           timeout_s: float | None = None) -> SparseResult:
        """Sparse vectors of `texts`, in order: the active terms' vocabulary ids and weights."""
        policy = scoring_policy(truncation)
        texts = list(texts)
        deadline = self.deadline(timeout_s)
        limits = await self.limits()
        fields = {"model": model, "return_tokens": return_tokens, "truncation": policy}
        if top_k is not None:
            fields["top_k"] = top_k
        vectors: list[SparseVector] = []
        name, dimensions, tokens = "", 0, 0
        for start, end in plan_calls([len(t.encode()) for t in texts], limits.max_inputs_per_request,
                                     limits.max_request_bytes) or [(0, 0)]:
            reply = await self.call("EmbedSparse", pb.EmbedSparseRequest(inputs=texts[start:end], **fields),
                                    deadline=deadline)
            for e in reply.embeddings:
                vectors.append(SparseVector(np.array(e.indices, dtype=np.int32), np.array(e.values, dtype=np.float32),
                                            e.tokens, e.active_terms, list(e.terms) if return_tokens else None))
            name, dimensions, tokens = reply.model, reply.dimensions, tokens + reply.usage.total_tokens
        return SparseResult(name, vectors, dimensions, tokens)
