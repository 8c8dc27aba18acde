"""The classification REST schema: vLLM's /v1/classify (ClassificationRequest and ClassificationResponse of
vllm/entrypoints/pooling/classify/protocol.py) and text-embeddings-inference's /predict (PredictRequest, Prediction
of its docs/openapi.json), fields in their order.

The requests are validated with the gateway's settings as pydantic's context (embeddings.parse): their list fields are
checked within their bounds by bounded_lists and peer_lists, not by pydantic's unions.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationInfo, field_validator

from gateway import bounded_lists, peer_lists


class VllmClassifyRequest(BaseModel):
    """vLLM's ClassificationRequest (its completion form; the chat form, `messages`, is not served)."""

    # Unknown fields are refused: an option not served here (softmax, truncation_side, mm_processor_kwargs) must not
    # be dropped without a word.
    model_config = ConfigDict(extra="forbid")

    model: StrictStr | None = None
    input: StrictStr | list[StrictStr]
    # vLLM's default (null) refuses an input over the model's maximum; -1 cuts it to the maximum (its end, as
    # transformers' pipeline does; vLLM keeps the last tokens). Other counts are not served.
    truncate_prompt_tokens: Literal[-1] | None = None
    user: StrictStr | None = None
    priority: StrictInt | None = None  # vLLM's scheduling hint; every call is served alike here
    add_special_tokens: Literal[True] = True  # a model is always given its special tokens here
    # vLLM's: false returns the raw logits instead of the model's activation (softmax or sigmoid) of them.
    use_activation: StrictBool | None = None

    @field_validator("input", mode="plain", json_schema_input_type=StrictStr | list[StrictStr])
    @classmethod
    def _input_by_its_json_type(cls, value: object, info: ValidationInfo) -> str | list[str]:
        return bounded_lists.texts(value, "input", info.context.max_inputs)


class ClassificationData(BaseModel):
    index: int
    label: str | None = Field(description="the label of the highest score")
    probs: list[float] = Field(description="every label's score, in label-id order")
    num_classes: int


class ClassifyUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int
    completion_tokens: int = 0
    prompt_tokens_details: None = None


class ClassificationResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ClassificationData]
    usage: ClassifyUsage


PredictInput = StrictStr | list[StrictStr] | list[list[StrictStr]]


class PredictRequest(BaseModel):
    """TEI's PredictRequest, with `model` to name a classification model (TEI serves one; none here: the service's
    default classification model)."""

    model_config = ConfigDict(extra="ignore")  # as TEI's server, which ignores fields it does not know

    inputs: PredictInput
    # TEI's: false (its default; null here too) refuses an input over the model's maximum, true cuts it.
    truncate: StrictBool | None = None
    # Which end true cuts: right (the end; what the service serves) or left (refused by the service).
    truncation_direction: Literal["Left", "left", "Right", "right"] = "Right"
    raw_scores: StrictBool = False
    model: StrictStr | None = None

    @field_validator("inputs", mode="plain", json_schema_input_type=PredictInput)
    @classmethod
    def _inputs_by_their_json_type(cls, value: object, info: ValidationInfo) -> str | list:
        return peer_lists.predict_inputs(value, info.context.max_inputs)


class Prediction(BaseModel):
    score: float
    label: str


# One input: its labels, highest score first; a batch: a list of those.
PredictResponse = list[Prediction] | list[list[Prediction]]
