"""OpenAI embeddings and models schema, fields in the order of OpenAI's documentation.

The request is validated with the gateway's settings as pydantic's context (embeddings.parse): its `input` is checked
by bounded_lists within their bounds, not by pydantic's union.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationInfo, field_validator

from gateway import bounded_lists

TokenArray = list[StrictInt]
EmbeddingInput = StrictStr | list[StrictStr] | TokenArray | list[TokenArray]


class EmbeddingRequest(BaseModel):
    # Unknown fields are ignored, as OpenAI-compatible servers commonly do.
    model_config = ConfigDict(extra="ignore")

    input: EmbeddingInput
    model: StrictStr
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = None
    user: StrictStr | None = None
    # Extension, named and valued as Voyage AI's API names it: compact vectors (sentence-transformers'
    # quantize_embeddings types). A list of ints per vector, or base64 of its bytes with encoding_format base64.
    output_dtype: Literal["float", "int8", "uint8", "binary", "ubinary"] = "float"

    @field_validator("input", mode="plain", json_schema_input_type=EmbeddingInput)
    @classmethod
    def _input_by_its_json_type(cls, value: object, info: ValidationInfo) -> str | list:
        settings = info.context  # the gateway's settings
        return bounded_lists.embedding_input(value, settings.max_inputs, settings.max_token_ids)


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | list[int] | str = Field(
        description="floats (ints for a compact output_dtype), or base64 of little-endian float32 (of the bytes)")


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class CreateEmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorBody
