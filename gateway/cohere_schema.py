"""Cohere's embed REST schema (POST /v1/embed and /v2/embed), fields in the order of Cohere's API reference.

The request is validated with the gateway's settings as pydantic's context (embeddings.parse): `texts` is bounded by
max_cohere_texts before its items are looked at (bounded_lists), and every other list is checked by hand, so a
large body costs one pass and one error. The responses are what the cohere SDK parses (its EmbedByTypeResponse and
EmbedFloatsResponse); here they document the routes in /openapi.json.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationInfo, field_validator

from gateway import bounded_lists
from gateway.cohere_prompts import INPUT_TYPES, InputType
from gateway.cohere_vectors import EMBEDDING_TYPES, EmbeddingType
from gateway.scoring_schema import ApiVersion

Truncate = Literal["NONE", "START", "END"]
# Cohere's fields that this gateway refuses, and why.
_NOT_SERVED = {
    "images": "images are not served: this gateway embeds texts only (send texts)",
    "inputs": "inputs are not served: this gateway embeds texts only (send texts)",
    "max_tokens": "max_tokens is not served: texts are cut at the model's maximum sequence length (truncate)",
}


class CohereEmbedRequest(BaseModel):
    # Unknown fields are refused, as rerank's are: an option not served here must not be dropped without a word.
    model_config = ConfigDict(extra="forbid")

    model: StrictStr | None = Field(None, description="a served embedding model; none: the service's default")
    texts: list[StrictStr] = Field(description="the texts to embed, at most max_cohere_texts (Cohere's: 96)")
    # Cohere's only ways to send images; refused by name rather than as unknown fields.
    images: list | None = None
    inputs: list | None = None
    input_type: InputType | None = Field(
        None, description="selects the model's prompt (cohere_input_type_prompts); none: the texts as they are")
    max_tokens: StrictInt | None = None  # Cohere's own cut per input: refused, as the service cuts at the model's
    output_dimension: StrictInt | None = Field(None, description="Matryoshka size: the service's `dimensions`")
    embedding_types: list[EmbeddingType] | None = Field(
        None, description="one or more; none: float (v1: a plain list of floats, response_type embeddings_floats)")
    truncate: Truncate | None = Field(
        None, description="NONE refuses a text over the model's maximum (400); START and END cut it; none: END")
    priority: StrictInt | None = None  # Cohere's scheduling hint; every call is served alike here

    @field_validator("texts", mode="plain", json_schema_input_type=list[StrictStr])
    @classmethod
    def _texts_bounded_first(cls, value: object, info: ValidationInfo) -> list[str]:
        settings = info.context
        if not isinstance(value, list):
            raise bounded_lists.problem("texts", "expected an array of strings")
        return bounded_lists.texts(value, "texts", min(settings.max_cohere_texts, settings.max_inputs))

    @field_validator("images", "inputs", "max_tokens", mode="plain")
    @classmethod
    def _not_served(cls, value: object, info: ValidationInfo) -> None:
        if value is not None:
            raise bounded_lists.problem(info.field_name, _NOT_SERVED[info.field_name])
        return value

    @field_validator("input_type", mode="plain", json_schema_input_type=InputType | None)
    @classmethod
    def _one_of_the_input_types(cls, value: object) -> str | None:
        if value is None or value in INPUT_TYPES:
            return value
        if value == "image":
            raise bounded_lists.problem("input_type", "'image' is not served: this gateway embeds texts only")
        raise bounded_lists.problem("input_type", f"expected one of {', '.join(INPUT_TYPES)}")

    @field_validator("output_dimension")
    @classmethod
    def _a_positive_int32(cls, value: int | None) -> int | None:
        # Its upper bound, the model's dimension, is the service's to check.
        if value is not None and not 1 <= value <= bounded_lists.INT32_MAX:
            raise bounded_lists.problem("output_dimension", "expected a positive integer")
        return value

    @field_validator("embedding_types", mode="plain", json_schema_input_type=list[EmbeddingType] | None)
    @classmethod
    def _known_types_once_each(cls, value: object) -> list[str] | None:
        if value is None:
            return None
        if not isinstance(value, list) or not value:
            raise bounded_lists.problem("embedding_types", f"expected an array of one or more of "
                                                           f"{', '.join(EMBEDDING_TYPES)}")
        for i, item in enumerate(value):  # stops at the first unknown item, however long the list
            if not isinstance(item, str) or item not in EMBEDDING_TYPES:
                raise bounded_lists.problem(f"embedding_types[{i}]", f"expected one of {', '.join(EMBEDDING_TYPES)}")
        return list(dict.fromkeys(value))


class BilledUnits(BaseModel):
    input_tokens: int = Field(description="tokens of the texts, prompts and special tokens included, after cutting")


class EmbedMeta(BaseModel):
    api_version: ApiVersion
    billed_units: BilledUnits


class EmbeddingsByType(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    float_: list[list[float]] | None = Field(None, alias="float")
    int8: list[list[int]] | None = Field(None, description="-128..127 per dimension")
    uint8: list[list[int]] | None = Field(None, description="0..255 per dimension")
    binary: list[list[int]] | None = Field(None, description="sign bits packed 8 to a byte, each byte minus 128")
    ubinary: list[list[int]] | None = Field(None, description="sign bits packed 8 to a byte, 0..255")
    base64: list[str] | None = Field(None, description="base64 of each vector's little-endian float32 bytes")


class EmbedByTypeResponse(BaseModel):
    response_type: Literal["embeddings_by_type"] = "embeddings_by_type"
    id: str
    embeddings: EmbeddingsByType
    texts: list[str]
    meta: EmbedMeta


class EmbedFloatsResponse(BaseModel):
    """/v1/embed's reply without embedding_types."""

    response_type: Literal["embeddings_floats"] = "embeddings_floats"
    id: str
    embeddings: list[list[float]]
    texts: list[str]
    meta: EmbedMeta
