"""Cohere's embedding types from the service's vector encodings: which encodings a request asks the service for, and
each reply's bytes as Cohere's lists.

Every type is the service's own encoding (embedding_client.encodings.OUTPUTS), asked for in an Embed call of its
own and never quantized here: int8 and uint8 place each dimension in the model's calibrated ranges, which only the
service knows (Model.quantization), and a local copy of its binary rule would be one more thing to keep equal.

- float: the little-endian float32 vector as floats; base64: those same bytes, base64-encoded (Cohere's "the float
  embedding bytes" appended), from the same call as float.
- int8, uint8: one byte per dimension, as signed (-128..127) and unsigned (0..255) ints.
- ubinary: the sign bits (1 above 0), packed 8 to a byte, first dimension in the highest bit, as unsigned ints;
  binary: the same byte minus 128, as a signed int (sentence-transformers' quantize_embeddings "binary", and vLLM's
  /v2/embed). Minus 128 flips only a byte's highest bit, the same bit in every vector, so Hamming distances between
  binary vectors are those between their ubinary ones; unpack binary with np.unpackbits((v + 128).astype(np.uint8)).
  Either way ceil(dimensions / 8) ints, the last byte's spare low bits 0.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Literal, get_args

import numpy as np

from embedding_client.encodings import OUTPUTS
from embedding_client.v1 import embedding_pb2 as pb

EmbeddingType = Literal["float", "int8", "uint8", "binary", "ubinary", "base64"]
EMBEDDING_TYPES: tuple[str, ...] = get_args(EmbeddingType)

# The client library's output each type is read from (base64 is float's bytes).
_OUTPUT_OF = {t: ("float" if t == "base64" else t) for t in EMBEDDING_TYPES}


def encoding(embedding_type: str) -> int:
    """The service's VectorEncoding that `embedding_type` is read from."""
    return OUTPUTS[_OUTPUT_OF[embedding_type]][0]


def encodings(embedding_types: Sequence[str]) -> list[int]:
    """The distinct encodings `embedding_types` need, one Embed call each, in the order first asked for."""
    return list(dict.fromkeys(encoding(t) for t in embedding_types))


def vectors(embeddings: Sequence[pb.Embedding], embedding_type: str) -> list:
    """The vectors of one Embed reply (in `embedding_type`'s encoding) as Cohere returns `embedding_type`."""
    if embedding_type == "base64":
        return [base64.b64encode(e.float32_le).decode("ascii") for e in embeddings]
    output = _OUTPUT_OF[embedding_type]
    dtype = OUTPUTS[output][1]
    return [np.frombuffer(e.float32_le if output == "float" else e.packed, dtype=dtype).tolist() for e in embeddings]


def by_type(replies: dict[int, pb.EmbedResponse], embedding_types: Sequence[str]) -> dict[str, list]:
    """Cohere's `embeddings` object: each type asked for, from the reply of its encoding."""
    return {t: vectors(replies[encoding(t)].embeddings, t) for t in embedding_types}
