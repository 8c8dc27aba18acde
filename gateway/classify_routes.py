"""The gateway's classification routes over the service's Classify: vLLM's POST /v1/classify and
text-embeddings-inference's POST /predict. Auth, body bounds, error objects and metrics are the embeddings route's
(guards.py, errors.py, metrics.py); a request that names no model gets the service's default classification model."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import Response

from embedding_client.v1 import embedding_pb2 as pb
from gateway import errors, peer_lists
from gateway.classify_schema import ClassificationResponse, PredictRequest, PredictResponse, VllmClassifyRequest
from gateway.peer_calls import call_naming, documented, json_reply, read_body, truncation
from gateway.routes import ERROR_RESPONSES, call

classify = APIRouter()


async def _get_model(request: Request, name: str) -> pb.Model:
    return (await call(request, "GetModel", pb.GetModelRequest(name=name))).model


def _probs(result: pb.Classification, count: int) -> list[float]:
    probs = [0.0] * count
    for label in result.labels:
        probs[label.label_id] = label.score
    return probs


def _labels_cut(model: str) -> errors.OpenAIError:
    return errors.invalid_request(
        f"the model '{model}' has more labels than the service returns per input (its limits.max_labels_per_result), "
        "so /v1/classify cannot return every label's score; /predict returns the highest of them", "model",
        "too_many_labels")


@classify.post("/v1/classify", response_model=ClassificationResponse, responses=ERROR_RESPONSES,
               openapi_extra=documented(VllmClassifyRequest))
async def create_classification(request: Request) -> Response:
    body: VllmClassifyRequest = await read_body(request, VllmClassifyRequest)  # its input bounded
    texts = [body.input] if isinstance(body.input, str) else body.input
    message = pb.ClassifyRequest(model=body.model or "", inputs=[pb.ClassifyInput(text=t) for t in texts],
                                 raw_scores=body.use_activation is False,
                                 truncation=truncation(body.truncate_prompt_tokens == -1))
    reply: pb.ClassifyResponse = await call_naming(request, "Classify", message, "input")
    count = await request.app.state.label_counts.of(reply, lambda name: _get_model(request, name))
    if count is None:
        raise _labels_cut(reply.model)
    data = [{"index": c.index, "label": c.labels[0].label if c.labels else None, "probs": _probs(c, count),
             "num_classes": count} for c in reply.classifications]
    tokens = reply.usage.prompt_tokens
    return json_reply({"id": f"classify-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                       "model": reply.model, "data": data,
                       "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0,
                                 "prompt_tokens_details": None}})


def _classify_inputs(inputs: str | list) -> list[pb.ClassifyInput]:
    """TEI's inputs (validated by peer_lists.predict_inputs) as the service's: texts and [text, text_pair]s."""
    sequences = [[inputs]] if isinstance(inputs, str) else [inputs] if peer_lists.is_one_input(inputs) else inputs
    return [pb.ClassifyInput(text=s[0], text_pair=s[1] if len(s) == 2 else "") for s in sequences]


def _truncation(body: PredictRequest) -> int:
    if body.truncate and body.truncation_direction.lower() == "left":  # the service says whether it serves it
        return pb.TRUNCATION_POLICY_START
    return truncation(body.truncate)


@classify.post("/predict", response_model=PredictResponse, responses=ERROR_RESPONSES,
               openapi_extra=documented(PredictRequest))
async def predict(request: Request) -> Response:
    body: PredictRequest = await read_body(request, PredictRequest)  # its inputs bounded
    message = pb.ClassifyRequest(model=body.model or "", inputs=_classify_inputs(body.inputs),
                                 raw_scores=body.raw_scores, truncation=_truncation(body))
    reply: pb.ClassifyResponse = await call_naming(request, "Classify", message, "inputs")
    predictions = [[{"score": label.score, "label": label.label} for label in c.labels]
                   for c in reply.classifications]
    return json_reply(predictions[0] if peer_lists.is_one_input(body.inputs) else predictions)
