"""Python client of the embedding service (gRPC): sync and asyncio, several targets, retries, numpy out.

    from embedding_client import EmbedClient
    with EmbedClient(["10.0.0.1:9000", "10.0.0.2:9000"]) as client:
        vectors = client.embed(["first text", "second text"]).vectors   # float32, one row per input
        ranked = client.rerank("a query", ["a document", "another"]).results  # with a rerank model served
        sparse = client.embed_sparse(["first text"]).vectors                  # with a sparse model served
        labels = client.classify(["a text", ("premise", "hypothesis")]).classifications  # a classifier served
        ids = client.tokenize(["first text"]).inputs[0].ids                   # any served model's tokenizer

Also: the generated stubs (`embedding_client.v1`), typed errors (`embedding_client.errors`), a local
fallback (`embedding_client.fallback`), and a bulk command line (`python -m embedding_client`).
"""

from embedding_client.aio import AsyncEmbedClient, ClientStats, EmbedResult, RetryPolicy, Usage
from embedding_client.classifying import Classification, ClassifyResult, LabelScore
from embedding_client.errors import (
    AlreadyExists,
    DeadlineExceeded,
    EmbeddingError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from embedding_client.fallback import LocalFallback
from embedding_client.jobs import Job, JobFailed
from embedding_client.scoring import Ranked, RerankResult, SparseResult, SparseVector
from embedding_client.sync import EmbedClient
from embedding_client.tokenizing import DetokenizeResult, Tokenized, TokenizeResult

__all__ = [
    "AlreadyExists", "AsyncEmbedClient", "Classification", "ClassifyResult", "ClientStats", "DeadlineExceeded", "DetokenizeResult",
    "EmbedClient", "EmbedResult", "EmbeddingError", "FailedPrecondition", "InvalidArgument", "Job", "JobFailed",
    "LabelScore",
    "LocalFallback", "NotFound", "PermissionDenied", "Ranked", "RerankResult", "ResourceExhausted", "RetryPolicy",
    "SparseResult", "SparseVector", "TokenizeResult", "Tokenized", "Unauthenticated", "Unavailable", "Usage",
]
