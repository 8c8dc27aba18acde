"""The router's methods that run on a model's replicas, as one table: for each, the kind of model it needs, the
request field its inputs are in and their limit, how its request becomes a job (router/validation.py), and how its
reply is put together from the shards' results (router/replies.py). The router runs every one of them with one
runner for unary calls and one for streams (router/deployment.py); how a job is cut into shards is the same for
all (router/fanout.py: by token length).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from embedding_service.config import Limits
from embedding_service.kinds import KINDS, Kind
from embedding_service.router import replies
from embedding_service.router.catalog import ModelCatalog
from embedding_service.router.validation import (
    Job,
    build_classify_job,
    build_job,
    build_rerank_job,
    build_sparse_job,
    check_query_tokens,
)
from embedding_service.wire.deadline import Deadline
from embedding_service.wire.messages import ModelInfo


async def check_rerank_query(catalog: ModelCatalog, job: Job, limits: Limits, deadline: Deadline) -> None:
    """A rerank query within max_query_tokens: counted once per call, here, before any replica scores a pair (a
    rerank replica always sends its tokenizer; without one nothing is counted)."""
    tokens = await catalog.text_tokens(job.model, job.options.query, deadline)
    if tokens is not None:
        check_query_tokens(tokens, job.model, limits)


@dataclass(frozen=True)
class MethodSpec:
    name: str
    kind: Kind
    field: str  # the request's repeated field of inputs
    max_inputs: Callable[[Limits], int]
    build: Callable[[Any, ModelInfo, Limits], Job]
    # Unary: the reply assembled from every shard (a replies.Reply); stream: None.
    reply: type[replies.Reply] | None = None
    # Stream: one chunk per finished shard; unary: None.
    chunk: Callable[..., Any] | None = None
    # Checks of the job that need the model's replicas' answers (its tokenizer), before any shard runs.
    check: Callable[[ModelCatalog, Job, Limits, Deadline], Awaitable[None]] | None = None

    @property
    def stream(self) -> bool:
        return self.chunk is not None


def _unary_inputs(limits: Limits) -> int:
    return limits.max_inputs_per_request


def _stream_inputs(limits: Limits) -> int:
    return limits.max_inputs_per_stream


METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in (
    MethodSpec("Embed", "embedding", "inputs", _unary_inputs, build_job, reply=replies.EmbedReply),
    MethodSpec("EmbedStream", "embedding", "inputs", _stream_inputs, build_job, chunk=replies.embed_chunk),
    MethodSpec("Rerank", "rerank", "documents", lambda limits: limits.max_documents_per_rerank, build_rerank_job,
               reply=replies.RerankReply, check=check_rerank_query),
    MethodSpec("RerankStream", "rerank", "documents", lambda limits: limits.max_documents_per_rerank_stream,
               build_rerank_job, chunk=replies.rerank_chunk, check=check_rerank_query),
    MethodSpec("EmbedSparse", "sparse", "inputs", _unary_inputs, build_sparse_job, reply=replies.SparseReply),
    MethodSpec("Classify", "classify", "inputs", _unary_inputs, build_classify_job, reply=replies.ClassifyReply),
    MethodSpec("ClassifyStream", "classify", "inputs", _stream_inputs, build_classify_job,
               chunk=replies.classify_chunk),
)}
# Each kind's methods, as the registry lists them, are in the table (and nothing else is).
assert sorted(METHODS) == sorted(m for entry in KINDS.values() for m in entry.methods), "kinds.py's methods"
