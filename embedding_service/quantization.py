"""Compact vectors: int8/uint8 placed in ranges calibrated once per model, binary/ubinary sign bits.

The arithmetic is sentence-transformers' own `quantize_embeddings`, called with
ranges taken over the model's calibration vectors (the packaged corpus,
calibration.py), never over the call's own vectors: vectors from different
calls, replicas and restarts compare. The ranges depend on the output shape
(Matryoshka size, normalization), so they are taken over the reference vectors
shaped as a call's vectors are (shards.postprocess).
"""

from __future__ import annotations

import numpy as np

from embedding_client.aio import OUTPUTS
from embedding_service.shards import postprocess

# The wire encodings that carry packed bytes, to sentence-transformers' precision names (the client's table).
PRECISIONS = {encoding: name for name, (encoding, _) in OUTPUTS.items() if name != "float"}
RANGED = ("int8", "uint8")


def ranges_for(reference: np.ndarray, dimensions: int | None, normalize: bool) -> np.ndarray:
    """[2, dims] float32: least and greatest value per dimension of the reference vectors in this shape."""
    shaped = postprocess(np.asarray(reference, dtype=np.float32), dimensions, normalize)
    return np.vstack((shaped.min(axis=0), shaped.max(axis=0))).astype(np.float32)


def quantize(vectors: np.ndarray, precision: str, ranges: np.ndarray | None) -> np.ndarray:
    """int8/uint8 [n, dims] (in `ranges`) or packed bits [n, ceil(dims / 8)] (`ranges` None), as
    sentence-transformers makes them."""
    from sentence_transformers.util.quantization import quantize_embeddings  # replicas only

    return quantize_embeddings(vectors, precision=precision, ranges=ranges)
