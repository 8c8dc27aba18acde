"""OpenAI's embeddings request in, the service's EmbedInputs out; the service's reply back as OpenAI's JSON."""

from __future__ import annotations

import base64

import numpy as np

from embedding_client.encodings import OUTPUTS
from embedding_client.v1 import embedding_pb2 as pb
from gateway import errors
from gateway.coalescing import Reply
from gateway.openai_schema import EmbeddingRequest

INT32_MAX = 2**31 - 1


def inputs(body: EmbeddingRequest, max_inputs: int) -> list[pb.EmbedInput]:
    raw = body.input
    if isinstance(raw, str):
        items: list = [raw]
    elif raw and all(isinstance(x, int) for x in raw):
        items = [raw]  # one token array
    else:
        items = list(raw)
    if len(items) > max_inputs:
        raise errors.invalid_request(f"{len(items)} inputs; at most {max_inputs} per request", "input")
    out = []
    for item in items:
        if isinstance(item, str):
            out.append(pb.EmbedInput(text=item))
        else:
            if any(not 0 <= t <= INT32_MAX for t in item):
                raise errors.invalid_request("token ids must be non-negative 32-bit integers", "input")
            out.append(pb.EmbedInput(token_ids=pb.TokenIds(ids=item)))
    return out


def check_dimensions(body: EmbeddingRequest) -> None:
    if body.dimensions is not None and not 1 <= body.dimensions <= INT32_MAX:
        raise errors.invalid_request("dimensions must be a positive integer", "dimensions")


def encoding(body: EmbeddingRequest) -> int:
    """The wire encoding of the output_dtype asked for (OUTPUTS: the client library's outputs)."""
    return OUTPUTS[body.output_dtype][0]


def render(reply: Reply, output_dtype: str, base64_out: bool) -> dict:
    dtype = OUTPUTS[output_dtype][1]
    data = []
    for index, e in enumerate(reply.embeddings):
        raw = e.float32_le if output_dtype == "float" else e.packed
        if base64_out:
            vector: object = base64.b64encode(raw).decode("ascii")
        else:
            vector = np.frombuffer(raw, dtype=dtype).tolist()
        data.append({"object": "embedding", "index": index, "embedding": vector})
    usage = {"prompt_tokens": reply.prompt_tokens, "total_tokens": reply.prompt_tokens}
    return {"object": "list", "data": data, "model": reply.model, "usage": usage}
