"""The kinds of model the service serves, each one entry here: which replica class serves it (read by the
application builder), its proto enum and the gRPC methods it answers (read by the router), its name (read by the
configuration). Adding a kind is one class in model/ and one entry here (docs/architecture.md: adding a kind).

Nothing here imports the model's libraries: the replica class is named by its import path, which only the
builder resolves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from embedding_client.v1 import embedding_pb2 as pb

Kind = Literal["embedding", "rerank", "sparse", "classify"]


@dataclass(frozen=True)
class KindEntry:
    replica: str  # "module:Class" of the replica (a model.replica.ServedKind)
    proto: int  # pb.ModelKind
    methods: tuple[str, ...]  # the EmbedService methods a model of the kind answers
    summary: str  # what it is, for the configuration's description


KINDS: dict[Kind, KindEntry] = {
    "embedding": KindEntry("embedding_service.model.deployment:EmbeddingModel", pb.MODEL_KIND_EMBEDDING,
                           ("Embed", "EmbedStream"), "a SentenceTransformer"),
    "rerank": KindEntry("embedding_service.model.scoring:RerankModel", pb.MODEL_KIND_RERANK,
                        ("Rerank", "RerankStream"), "a CrossEncoder"),
    "sparse": KindEntry("embedding_service.model.scoring:SparseModel", pb.MODEL_KIND_SPARSE, ("EmbedSparse",),
                        "a SparseEncoder, SPLADE-style"),
    "classify": KindEntry("embedding_service.model.classify:ClassifyModel", pb.MODEL_KIND_CLASSIFY,
                          ("Classify", "ClassifyStream"), "a transformers sequence classifier (one text or a pair)"),
}
assert set(KINDS) == set(get_args(Kind)), "every kind has one entry"


def kinds_described() -> str:
    """Every kind with what it is and its methods, for the configuration's description."""
    return "; ".join(f"{name}: {e.summary} ({', '.join(e.methods)})" for name, e in KINDS.items())
