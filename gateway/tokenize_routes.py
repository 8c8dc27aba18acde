"""The gateway's tokenizer routes over the service's Tokenize and Detokenize: POST /tokenize in vLLM's shape and in
text-embeddings-inference's, told apart by their fields (vLLM's `prompt`, TEI's `inputs`); vLLM's POST /detokenize
and TEI's POST /decode. Auth, body bounds, error objects and metrics are the embeddings route's (guards.py,
errors.py, metrics.py); a request that names no model gets the service's default model."""

from __future__ import annotations

from itertools import accumulate

from fastapi import APIRouter, Request
from fastapi.responses import Response

from embedding_client.v1 import embedding_pb2 as pb
from gateway import errors, peer_lists
from gateway.peer_calls import call_naming, documented, json_reply, read_body, read_json, validated
from gateway.routes import ERROR_RESPONSES
from gateway.tokenize_schema import (
    DecodeRequest,
    DecodeResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    TeiTokenizeRequest,
    TeiTokenizeResponse,
    VllmTokenizeRequest,
    VllmTokenizeResponse,
)

tokenizer = APIRouter()


def _tokenize_schema(data: object) -> type[VllmTokenizeRequest | TeiTokenizeRequest]:
    """vLLM's body names `prompt`, TEI's `inputs`."""
    if isinstance(data, dict) and ("prompt" in data) != ("inputs" in data):
        return VllmTokenizeRequest if "prompt" in data else TeiTokenizeRequest
    if isinstance(data, dict) and "messages" in data and "inputs" not in data:
        raise errors.invalid_request("chat messages are not tokenized here: send their text as prompt", "messages")
    raise errors.invalid_request('expected an object with "prompt" (vLLM\'s shape) or "inputs" (TEI\'s), not both')


def _byte_offset(text: str):
    """Code point offsets in `text` to offsets in its UTF-8, as TEI's are (Rust strings count bytes)."""
    if text.isascii():
        return lambda at: at
    # Bytes per code point by its value (a lone surrogate, which JSON allows, as 3).
    widths = (1 if o < 0x80 else 2 if o < 0x800 else 3 if o < 0x10000 else 4 for o in map(ord, text))
    return list(accumulate(widths, initial=0)).__getitem__


def tei_tokens(text: str, tokenized: pb.TokenizedInput) -> list[dict]:
    """One input's tokens as TEI's SimpleTokens: a special token with its own string and no offsets, any other with
    the text it covers and its byte offsets."""
    at = _byte_offset(text)
    return [{"id": i, "text": token, "special": True, "start": None, "stop": None} if special else
            {"id": i, "text": text[start:end], "special": False, "start": at(start), "stop": at(end)}
            for i, token, start, end, special in zip(tokenized.ids, tokenized.tokens, tokenized.starts,
                                                     tokenized.ends, tokenized.special)]


async def _vllm_tokenize(request: Request, body: VllmTokenizeRequest) -> Response:
    message = pb.TokenizeRequest(model=body.model or "", inputs=[body.prompt],
                                 add_special_tokens=body.add_special_tokens, return_tokens=bool(body.return_token_strs))
    reply: pb.TokenizeResponse = await call_naming(request, "Tokenize", message, "prompt")
    tokenized = reply.inputs[0]
    return json_reply({"count": len(tokenized.ids), "max_model_len": reply.max_sequence_length,
                       "tokens": list(tokenized.ids),
                       "token_strs": list(tokenized.tokens) if body.return_token_strs else None})


async def _tei_tokenize(request: Request, body: TeiTokenizeRequest) -> Response:
    if body.prompt_name is not None:
        raise errors.invalid_request("prompt_name is not served by /tokenize: put the prompt's text before the input",
                                     "prompt_name")
    texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
    message = pb.TokenizeRequest(model=body.model or "", inputs=texts, add_special_tokens=body.add_special_tokens,
                                 return_tokens=True, return_offsets=True)
    reply: pb.TokenizeResponse = await call_naming(request, "Tokenize", message, "inputs")
    return json_reply([tei_tokens(text, tokenized) for text, tokenized in zip(texts, reply.inputs)])


def _either(*schemas) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": {
        "oneOf": [s.model_json_schema() for s in schemas]}}}}}


@tokenizer.post("/tokenize", response_model=VllmTokenizeResponse | TeiTokenizeResponse, responses=ERROR_RESPONSES,
                openapi_extra=_either(VllmTokenizeRequest, TeiTokenizeRequest))
async def tokenize(request: Request) -> Response:
    data = await read_json(request)
    schema = _tokenize_schema(data)
    body = validated(data, request, schema)  # TEI's inputs bounded
    return await (_vllm_tokenize if schema is VllmTokenizeRequest else _tei_tokenize)(request, body)


@tokenizer.post("/detokenize", response_model=DetokenizeResponse, responses=ERROR_RESPONSES,
                openapi_extra=documented(DetokenizeRequest))
async def detokenize(request: Request) -> Response:
    body: DetokenizeRequest = await read_body(request, DetokenizeRequest)  # its tokens bounded
    # vLLM decodes with its tokenizer's default: special tokens kept.
    message = pb.DetokenizeRequest(model=body.model or "", inputs=[pb.TokenIds(ids=body.tokens)],
                                   skip_special_tokens=False)
    reply: pb.DetokenizeResponse = await call_naming(request, "Detokenize", message, "tokens")
    return json_reply({"prompt": reply.texts[0]})


@tokenizer.post("/decode", response_model=DecodeResponse, responses=ERROR_RESPONSES,
                openapi_extra=documented(DecodeRequest))
async def decode(request: Request) -> Response:
    body: DecodeRequest = await read_body(request, DecodeRequest)  # its ids bounded
    sequences = [body.ids] if peer_lists.is_one_sequence(body.ids) else body.ids
    message = pb.DetokenizeRequest(model=body.model or "", inputs=[pb.TokenIds(ids=ids) for ids in sequences],
                                   skip_special_tokens=body.skip_special_tokens)
    reply: pb.DetokenizeResponse = await call_naming(request, "Detokenize", message, "ids")
    return json_reply(list(reply.texts))
