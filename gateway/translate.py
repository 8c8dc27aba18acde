"""OpenAI's embeddings request in, the service's EmbedInputs out; the service's reply back as OpenAI's JSON."""

from __future__ import annotations

import numpy as np

from embedding_client.encodings import OUTPUTS
from embedding_client.v1 import embedding_pb2 as pb
from embedding_service.wire.rest_bodies import embeddings_body
from gateway import errors
from gateway.bounded_lists import INT32_MAX
from gateway.coalescing import Reply
from gateway.openai_schema import EmbeddingRequest


def inputs(body: EmbeddingRequest) -> list[pb.EmbedInput]:
    """`input` as validated (bounded_lists.embedding_input: bounded, token ids in range): a string, strings, one
    array of token ids or arrays of them."""
    raw = body.input
    items = [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else raw
    return [pb.EmbedInput(text=item) if isinstance(item, str) else pb.EmbedInput(token_ids=pb.TokenIds(ids=item))
            for item in items]


def check_dimensions(body: EmbeddingRequest) -> None:
    if body.dimensions is not None and not 1 <= body.dimensions <= INT32_MAX:
        raise errors.invalid_request("dimensions must be a positive integer", "dimensions")


def encoding(body: EmbeddingRequest) -> int:
    """The wire encoding of the output_dtype asked for (OUTPUTS: the client library's outputs)."""
    return OUTPUTS[body.output_dtype][0]


def render(reply: Reply, output_dtype: str, base64_out: bool) -> dict:
    dtype = OUTPUTS[output_dtype][1]
    vectors = (np.frombuffer(e.float32_le if output_dtype == "float" else e.packed, dtype=dtype)
               for e in reply.embeddings)
    return embeddings_body(vectors, base64_out, reply.model, reply.prompt_tokens)
