"""The tokenizer REST schema: vLLM's /tokenize and /detokenize (TokenizeCompletionRequest, TokenizeResponse,
DetokenizeRequest, DetokenizeResponse of vllm/entrypoints/openai/protocol.py) and text-embeddings-inference's
/tokenize and /decode (TokenizeRequest, SimpleToken, DecodeRequest of its docs/openapi.json), fields in their order.
Each takes `model` (TEI serves one model; none here: the service's default model).

The requests are validated with the gateway's settings as pydantic's context: their list fields are checked within
their bounds by bounded_lists and peer_lists, not by pydantic's unions.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationInfo, field_validator

from gateway import bounded_lists, peer_lists


class VllmTokenizeRequest(BaseModel):
    """vLLM's TokenizeCompletionRequest (its chat form, `messages`, is not served)."""

    model_config = ConfigDict(extra="ignore")  # as vLLM, which warns of fields it does not know and goes on

    model: StrictStr | None = None
    prompt: StrictStr
    add_special_tokens: StrictBool = True
    return_token_strs: StrictBool | None = False


class VllmTokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class TeiTokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # as TEI's server, which ignores fields it does not know

    inputs: StrictStr | list[StrictStr]
    add_special_tokens: StrictBool = True
    # TEI's sentence-transformers prompt before the text: not served by the service's Tokenize, so refused (400)
    # rather than dropped.
    prompt_name: StrictStr | None = None
    model: StrictStr | None = None

    @field_validator("inputs", mode="plain", json_schema_input_type=StrictStr | list[StrictStr])
    @classmethod
    def _inputs_by_their_json_type(cls, value: object, info: ValidationInfo) -> str | list[str]:
        return bounded_lists.texts(value, "inputs", info.context.max_inputs)


class SimpleToken(BaseModel):
    id: int
    text: str = Field(description="the input's text the token covers; a special token's own string")
    special: bool
    start: int | None = Field(description="its first byte in the input's UTF-8, as TEI's; null for a special token")
    stop: int | None = Field(description="the byte after its last; null for a special token")


# One list of tokens per input, a single string included.
TeiTokenizeResponse = list[list[SimpleToken]]


class DetokenizeRequest(BaseModel):
    """vLLM's DetokenizeRequest."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None
    tokens: list[StrictInt]

    @field_validator("tokens", mode="plain", json_schema_input_type=list[StrictInt])
    @classmethod
    def _bounded_ids(cls, value: object, info: ValidationInfo) -> list[int]:
        return peer_lists.id_sequence(value, "tokens", info.context.max_detokenize_token_ids)


class DetokenizeResponse(BaseModel):
    prompt: str


InputIds = list[StrictInt] | list[list[StrictInt]]


class DecodeRequest(BaseModel):
    """TEI's DecodeRequest."""

    model_config = ConfigDict(extra="ignore")

    ids: InputIds
    skip_special_tokens: StrictBool = True  # TEI's default; vLLM's /detokenize keeps them
    model: StrictStr | None = None

    @field_validator("ids", mode="plain", json_schema_input_type=InputIds)
    @classmethod
    def _bounded_ids(cls, value: object, info: ValidationInfo) -> list:
        settings = info.context
        return peer_lists.id_sequences(value, "ids", settings.max_inputs, settings.max_detokenize_token_ids)


# One text per sequence, a single sequence included.
DecodeResponse = list[str]
