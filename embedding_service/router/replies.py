"""How each method's reply is put together from its shards' results: a unary call's whole reply (the results
placed by input position, then written once), or a stream's chunk per finished shard."""

from __future__ import annotations

import abc
from typing import Any

import numpy as np

from embedding_client.v1 import embedding_pb2 as pb
from embedding_service.router import convert
from embedding_service.router.fanout import Shard
from embedding_service.router.validation import Job, top_n
from embedding_service.wire.messages import ShardResult
from embedding_service.wire.refusals import ranked


class Reply(abc.ABC):
    """A unary reply being assembled: `add` each shard's result, then `message` with every input's tokens."""

    def __init__(self, job: Job, request: Any) -> None:
        self.job, self.request = job, request
        self.n = len(job.inputs)

    @abc.abstractmethod
    def add(self, shard: Shard, result: ShardResult) -> None:
        """Places one shard's results by their positions."""

    @abc.abstractmethod
    def message(self, counts: np.ndarray):
        """The whole reply, every input's tokens in `counts`."""


class _Rows(Reply):
    """Results that are rows of an array (vectors, scores), placed by position."""

    rows: np.ndarray | None = None

    def add(self, shard: Shard, result: ShardResult) -> None:
        if self.rows is None:
            self.rows = np.empty((self.n, *result.vectors.shape[1:]), dtype=result.vectors.dtype)
        self.rows[shard.positions] = result.vectors


class EmbedReply(_Rows):
    def message(self, counts: np.ndarray) -> pb.EmbedResponse:
        job = self.job
        response = pb.EmbedResponse(model=job.model, dimensions=job.dimension)
        convert.fill(response.embeddings, range(self.n), self.rows, counts, job.raw_bytes)
        return response


class RerankReply(_Rows):
    def __init__(self, job: Job, request: Any) -> None:
        super().__init__(job, request)
        self.keep = top_n(request, self.n)  # checked before any document is scored

    def message(self, counts: np.ndarray) -> pb.RerankResponse:
        order = ranked(self.rows, self.keep)
        response = pb.RerankResponse(model=self.job.model)
        convert.fill_scores(response.results, order, self.rows[order], counts[order],
                            self.request.documents if self.request.return_documents else None)
        return response


class SparseReply(Reply):
    def __init__(self, job: Job, request: Any) -> None:
        super().__init__(job, request)
        self.vectors: list = [None] * self.n

    def add(self, shard: Shard, result: ShardResult) -> None:
        for row, position in enumerate(shard.positions):
            self.vectors[position] = result.sparse[row]

    def message(self, counts: np.ndarray) -> pb.EmbedSparseResponse:
        response = pb.EmbedSparseResponse(model=self.job.model, dimensions=self.job.dimension)
        convert.fill_sparse(response.embeddings, range(self.n), self.vectors, counts)
        return response


class ClassifyReply(_Rows):
    def message(self, counts: np.ndarray) -> pb.ClassifyResponse:
        response = pb.ClassifyResponse(model=self.job.model)
        convert.fill_classifications(response.classifications, range(self.n), self.rows, counts,
                                     self.job.labels, self.job.top)
        return response


def embed_chunk(job: Job, request: Any, shard: Shard, result: ShardResult) -> pb.EmbedStreamResponse:
    chunk = pb.EmbedStreamResponse(model=job.model, dimensions=job.dimension)
    convert.fill(chunk.embeddings, shard.positions, result.vectors, result.token_counts, job.raw_bytes)
    return chunk


def rerank_chunk(job: Job, request: Any, shard: Shard, result: ShardResult) -> pb.RerankStreamResponse:
    chunk = pb.RerankStreamResponse(model=job.model)
    convert.fill_scores(chunk.results, shard.positions, result.vectors, result.token_counts,
                        request.documents if request.return_documents else None)
    return chunk


def classify_chunk(job: Job, request: Any, shard: Shard, result: ShardResult) -> pb.ClassifyStreamResponse:
    chunk = pb.ClassifyStreamResponse(model=job.model)
    convert.fill_classifications(chunk.classifications, shard.positions, result.vectors, result.token_counts,
                                 job.labels, job.top)
    return chunk
