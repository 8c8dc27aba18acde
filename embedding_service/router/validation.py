"""Checks a request against the limits and the model before any work is done, and turns it into a Job."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from embedding_client.v1 import embedding_pb2 as pb
from embedding_service.config import Limits
from embedding_service.kinds import Kind
from embedding_service.wire.messages import (
    COMPACT_ENCODINGS,
    ClassifyOptions,
    EmbedOptions,
    Input,
    ModelInfo,
    Options,
    RerankOptions,
    SparseOptions,
)
from embedding_service.wire.reasons import Reason, ServiceError
from embedding_service.wire.refusals import pair_too_long, query_too_long, too_many_characters

_POLICIES = {
    pb.TRUNCATION_POLICY_UNSPECIFIED: "end",
    pb.TRUNCATION_POLICY_END: "end",
    pb.TRUNCATION_POLICY_START: "start",
    pb.TRUNCATION_POLICY_REJECT: "reject",
    pb.TRUNCATION_POLICY_WINDOWS: "windows",
}
_ENCODINGS = {pb.VECTOR_ENCODING_UNSPECIFIED, pb.VECTOR_ENCODING_FLOAT, pb.VECTOR_ENCODING_FLOAT32_LE,
              *COMPACT_ENCODINGS}


# Rerank, sparse and classification models truncate as their library does (END) or refuse (REJECT).
_SCORING_POLICIES = {pb.TRUNCATION_POLICY_UNSPECIFIED: "end", pb.TRUNCATION_POLICY_END: "end",
                     pb.TRUNCATION_POLICY_REJECT: "reject"}


@dataclass(frozen=True)
class Job:
    model: str
    inputs: list[Input]
    options: Options
    raw_bytes: bool  # VECTOR_ENCODING_FLOAT32_LE
    dimension: int  # of the vectors returned
    top: int | None = None  # labels kept per input (a classification's top_k)
    labels: tuple[str, ...] = ()  # a classification model's, by label id


def resolve_model_name(requested: str, known: list[str], default: str, kind: Kind | None = None) -> str:
    """The model a call names, or `default` (of the method's `kind`) when it names none."""
    if not requested and not default and kind is not None:
        raise ServiceError(Reason.NO_MODEL_OF_KIND, f"the call names no model and no {kind} model is served",
                           kind=kind)
    name = requested or default
    if name not in known:
        raise ServiceError(Reason.MODEL_NOT_FOUND, f"model {name!r} is not served; served models: {known}", model=name)
    return name


def check_kind(name: str, kind: Kind, needed: Kind, method: str) -> None:
    if kind != needed:
        raise ServiceError(Reason.WRONG_MODEL_KIND, f"model {name!r} is a {kind} model; {method} needs a {needed} model",
                           model=name, kind=kind, needed=needed)


def check_envelope(request, limits: Limits, max_inputs: int, field: str = "inputs") -> None:
    """Checks that need no model: size and count (of `field`, the request's inputs or documents)."""
    size = request.ByteSize()
    if size > limits.max_request_bytes:
        raise ServiceError(Reason.REQUEST_TOO_LARGE, f"request is {size} bytes; the limit is {limits.max_request_bytes}",
                           bytes=size, limit=limits.max_request_bytes)
    n = len(getattr(request, field))
    if n == 0:
        raise ServiceError(Reason.NO_INPUTS, f"{field} must contain at least one {field.rstrip('s')}", field=field)
    if n > max_inputs:
        raise ServiceError(Reason.TOO_MANY_INPUTS, f"{n} {field} in one call; the limit is {max_inputs}",
                           count=n, limit=max_inputs, field=field)


def output_shape(request, model: ModelInfo) -> tuple[int | None, bool]:
    """The request's Matryoshka size (None: the full dimension), within the model's, and whether to normalize."""
    dimensions = request.dimensions if request.HasField("dimensions") else None
    if dimensions is not None and not 1 <= dimensions <= model.dimension:
        raise ServiceError(
            Reason.INVALID_DIMENSIONS,
            f"dimensions must be between 1 and {model.dimension} for model {model.name!r}, got {dimensions}",
            dimensions=dimensions, max=model.dimension)
    return dimensions, request.normalize if request.HasField("normalize") else True


def build_job(request, model: ModelInfo, limits: Limits) -> Job:
    inputs = [_input(item, index, model, limits) for index, item in enumerate(request.inputs)]
    options = _options(request, model)
    return Job(model.name, inputs, options, raw_bytes=request.encoding == pb.VECTOR_ENCODING_FLOAT32_LE,
               dimension=options.dimensions or model.dimension)


def _input(item: pb.EmbedInput, index: int, model: ModelInfo, limits: Limits) -> Input:
    kind = item.WhichOneof("kind")
    if kind == "text":
        return text_within_limits(item.text, index, "input", limits)
    if kind == "token_ids":
        ids = np.asarray(item.token_ids.ids, dtype=np.int32)
        if ids.size == 0:
            raise ServiceError(Reason.EMPTY_INPUT, f"input {index} has no token ids", index=index)
        if ids.size > limits.max_token_ids_per_input:
            raise ServiceError(Reason.INPUT_TOO_LARGE, f"input {index} has {ids.size} token ids; the limit is "
                               f"{limits.max_token_ids_per_input}", index=index, limit=limits.max_token_ids_per_input)
        bad = np.flatnonzero((ids < 0) | (ids >= model.vocab_size))
        if bad.size:
            token = int(ids[bad[0]])
            raise ServiceError(Reason.TOKEN_ID_OUT_OF_RANGE, f"input {index} has token id {token} outside "
                               f"[0, {model.vocab_size}) of model {model.name!r}",
                               index=index, token_id=token, vocab_size=model.vocab_size)
        return ids
    raise ServiceError(Reason.INPUT_MISSING, f"input {index} has neither text nor token_ids", index=index)


def _options(request, model: ModelInfo) -> EmbedOptions:
    dimensions, normalize = output_shape(request, model)
    if request.truncation not in _POLICIES:
        raise ServiceError(Reason.INVALID_TRUNCATION, f"unknown truncation policy {request.truncation}")
    if request.encoding not in _ENCODINGS:
        raise ServiceError(Reason.INVALID_ENCODING, f"unknown vector encoding {request.encoding}")
    prompt_name = request.prompt_name or None
    if prompt_name is not None and prompt_name not in model.prompts:
        raise ServiceError(Reason.UNKNOWN_PROMPT, f"model {model.name!r} has no prompt {prompt_name!r}; its prompts: "
                           f"{sorted(model.prompts)}", prompt_name=prompt_name)
    return EmbedOptions(dimensions=dimensions, normalize=normalize, truncation=_POLICIES[request.truncation],
                        prompt_name=prompt_name, output=COMPACT_ENCODINGS.get(request.encoding, "float"))


def build_rerank_job(request, model: ModelInfo, limits: Limits) -> Job:
    """A Rerank or RerankStream: every document an input, scored against the query."""
    if not request.query:
        raise ServiceError(Reason.EMPTY_QUERY, "query is an empty string", field="query")
    if len(request.query) > limits.max_chars_per_input:
        raise ServiceError(Reason.INPUT_TOO_LARGE, too_many_characters("query", len(request.query),
                                                                       limits.max_chars_per_input),
                           field="query", limit=limits.max_chars_per_input)
    documents = [text_within_limits(d, i, "document", limits, "documents") for i, d in enumerate(request.documents)]
    options = RerankOptions(request.query, _scoring_policy(request.truncation, model), bool(request.activation))
    return Job(model.name, documents, options, raw_bytes=False, dimension=1)


def check_query_tokens(tokens: int, model: str, limits: Limits) -> None:
    """A rerank query within max_query_tokens (its content tokens by the model's tokenizer): every pair carries it,
    so an unbounded one would be tokenized and cut again for every document."""
    if tokens > limits.max_query_tokens:
        raise ServiceError(Reason.INPUT_TOO_LONG, query_too_long(tokens, limits.max_query_tokens, model),
                           field="query", tokens=tokens, max_tokens=limits.max_query_tokens)


def top_n(request, documents: int) -> int:
    """How many results a Rerank returns: its top_n, between 1 and the documents, or all of them."""
    if not request.HasField("top_n"):
        return documents
    if not 1 <= request.top_n <= documents:
        raise ServiceError(Reason.INVALID_TOP, f"top_n must be between 1 and the {documents} documents, got "
                           f"{request.top_n}", field="top_n", value=request.top_n, max=documents)
    return request.top_n


def build_sparse_job(request, model: ModelInfo, limits: Limits) -> Job:
    texts = [text_within_limits(t, i, "input", limits, "inputs") for i, t in enumerate(request.inputs)]
    k = limits.max_sparse_terms
    if request.HasField("top_k"):
        if not 1 <= request.top_k <= limits.max_sparse_terms:
            raise ServiceError(Reason.INVALID_TOP, f"top_k must be between 1 and {limits.max_sparse_terms}, got "
                               f"{request.top_k}", field="top_k", value=request.top_k, max=limits.max_sparse_terms)
        k = request.top_k
    options = SparseOptions(top_k=k, truncation=_scoring_policy(request.truncation, model),
                            return_tokens=bool(request.return_tokens))
    return Job(model.name, texts, options, raw_bytes=False, dimension=model.dimension)


def build_classify_job(request, model: ModelInfo, limits: Limits) -> Job:
    """A Classify or ClassifyStream: each input a text or a pair; every label scored, the top_k kept."""
    inputs = [_classify_input(item, i, limits) for i, item in enumerate(request.inputs)]
    most = min(len(model.labels) or model.dimension, limits.max_labels_per_result)
    top = most
    if request.HasField("top_k"):
        if not 1 <= request.top_k <= most:
            raise ServiceError(Reason.INVALID_TOP, f"top_k must be between 1 and {most} (model {model.name!r} has "
                               f"{model.dimension} labels; max_labels_per_result is {limits.max_labels_per_result}), "
                               f"got {request.top_k}", field="top_k", value=request.top_k, max=most)
        top = request.top_k
    options = ClassifyOptions(truncation=_scoring_policy(request.truncation, model), raw_scores=bool(request.raw_scores))
    return Job(model.name, inputs, options, raw_bytes=False, dimension=model.dimension, top=top,
               labels=model.labels)


def _classify_input(item, index: int, limits: Limits) -> Input:
    text = text_within_limits(item.text, index, "input", limits, "inputs")
    if not item.text_pair:
        return text
    if len(item.text_pair) > limits.max_chars_per_input:
        raise ServiceError(Reason.INPUT_TOO_LARGE, f"input {index}'s text_pair has {len(item.text_pair)} characters; "
                           f"the limit is {limits.max_chars_per_input}", index=index, field="text_pair",
                           limit=limits.max_chars_per_input)
    return (text, item.text_pair)


def text_within_limits(text: str, index: int, noun: str, limits: Limits, field: str | None = None) -> str:
    """A non-empty text within the character limit; `field` (its request field) goes in the error's metadata."""
    named = {} if field is None else {"field": field}
    if not text:
        raise ServiceError(Reason.EMPTY_INPUT, f"{noun} {index} is an empty string", index=index, **named)
    if len(text) > limits.max_chars_per_input:
        raise ServiceError(Reason.INPUT_TOO_LARGE, too_many_characters(f"{noun} {index}", len(text),
                                                                       limits.max_chars_per_input),
                           index=index, limit=limits.max_chars_per_input, **named)
    return text


def _scoring_policy(truncation: int, model: ModelInfo) -> str:
    if truncation in _SCORING_POLICIES:
        return _SCORING_POLICIES[truncation]
    if truncation in _POLICIES:
        raise ServiceError(Reason.INVALID_TRUNCATION, f"truncation {pb.TruncationPolicy.Name(truncation)} is not "
                           f"served for {model.kind} models: END or REJECT")
    raise ServiceError(Reason.INVALID_TRUNCATION, f"unknown truncation policy {truncation}")


def too_long(index: int, tokens: int, model: ModelInfo, truncation: str) -> ServiceError:
    """An input the replica found longer than the model (REJECT) or than its windows cover (WINDOWS) takes."""
    if truncation == "windows" and model.windows is not None:
        w = model.windows
        return ServiceError(
            Reason.INPUT_TOO_LONG,
            f"input {index} has {tokens} tokens; model {model.name!r} embeds at most {w.max_tokens} in "
            f"{w.max_windows} windows of {w.window_tokens} tokens overlapping by {w.overlap_tokens}",
            index=index, tokens=tokens, max_tokens=w.max_tokens)
    if model.kind == "rerank":
        return ServiceError(
            Reason.INPUT_TOO_LONG,
            pair_too_long(index, tokens, model.name, model.max_sequence_length, "truncation is REJECT"),
            index=index, tokens=tokens, max_tokens=model.max_sequence_length, field="documents")
    return ServiceError(
        Reason.INPUT_TOO_LONG,
        f"input {index} has {tokens} tokens; model {model.name!r} takes at most "
        f"{model.max_sequence_length} and truncation is REJECT",
        index=index, tokens=tokens, max_tokens=model.max_sequence_length)
