"""The rerank and sparse REST schema: Cohere's v2 rerank (which Jina's and vLLM's rerank also take) and the
gateway's sparse embeddings, fields in the order of Cohere's documentation.

The requests are validated with the gateway's settings as pydantic's context (embeddings.parse): their list fields are
checked by bounded_lists within their bounds, not by pydantic's unions.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationInfo, field_validator

from gateway import bounded_lists


class DocumentText(BaseModel):
    """A document as Cohere's v1 and Jina's APIs also send it: {"text": ...}."""

    model_config = ConfigDict(extra="ignore")
    text: StrictStr


class RerankRequest(BaseModel):
    # Unknown fields are refused: a rerank option not served here (relevant_spans, max_tokens_per_doc) must not be
    # dropped without a word.
    model_config = ConfigDict(extra="forbid")

    model: StrictStr | None = None
    query: StrictStr
    documents: list[StrictStr | DocumentText]  # their texts once validated
    top_n: StrictInt | None = None
    return_documents: StrictBool = False  # Jina's and Cohere v1's; Cohere v2 returns none
    # Cohere's relevance_score is the model's activation (sigmoid for one label), in [0, 1]; raw_scores (TEI's
    # name) returns the raw logits instead.
    raw_scores: StrictBool = False
    # TEI's: false refuses a query-document pair over the model's maximum instead of cutting it.
    truncate: StrictBool = True
    priority: StrictInt | None = None  # Cohere's scheduling hint; every call is served alike here

    @field_validator("documents", mode="plain", json_schema_input_type=list[StrictStr | DocumentText])
    @classmethod
    def _documents_by_their_json_type(cls, value: object, info: ValidationInfo) -> list[str]:
        return bounded_lists.documents(value, info.context.max_documents)


class RerankDocument(BaseModel):
    text: str


class RerankResult(BaseModel):
    index: int
    relevance_score: float
    document: RerankDocument | None = None


class ApiVersion(BaseModel):
    version: str = "2"


class BilledUnits(BaseModel):
    search_units: int


class RerankMeta(BaseModel):
    api_version: ApiVersion = ApiVersion()
    billed_units: BilledUnits


class RerankUsage(BaseModel):
    total_tokens: int


class RerankResponse(BaseModel):
    id: str
    model: str
    results: list[RerankResult]
    meta: RerankMeta
    usage: RerankUsage


class SparseEmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input: StrictStr | list[StrictStr]
    model: StrictStr | None = None
    top_k: StrictInt | None = None
    return_tokens: StrictBool = False
    truncate: StrictBool = True

    @field_validator("input", mode="plain", json_schema_input_type=StrictStr | list[StrictStr])
    @classmethod
    def _input_by_its_json_type(cls, value: object, info: ValidationInfo) -> str | list[str]:
        return bounded_lists.texts(value, "input", info.context.max_inputs)


class SparseEmbedding(BaseModel):
    object: Literal["sparse_embedding"] = "sparse_embedding"
    index: int
    indices: list[int] = Field(description="vocabulary ids of the active terms, ascending")
    values: list[float] = Field(description="their weights, in the order of indices")
    terms: list[str] | None = Field(None, description="their token strings, with return_tokens")
    active_terms: int = Field(description="terms above zero before top_k cut them")


class SparseUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class SparseEmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[SparseEmbedding]
    model: str
    usage: SparseUsage
