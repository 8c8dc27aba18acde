"""A replica's vectors as the call asked for them: Matryoshka-cut, normalized, and in a compact type.

Compact types are sentence-transformers' own `quantize_embeddings`: int8/uint8 placed in ranges calibrated
once per model, binary/ubinary sign bits. The ranges are taken over the model's calibration vectors (the
packaged corpus, model/calibration.py), never over the call's own vectors, so vectors from different
calls, replicas and restarts compare. They depend on the output shape (Matryoshka size, normalization), so
they are taken over the reference vectors shaped as a call's vectors are (postprocess).
"""

from __future__ import annotations

import numpy as np


def postprocess(vectors: np.ndarray, dimensions: int | None, normalize: bool) -> np.ndarray:
    """Matryoshka truncation, then L2 normalization, in float32."""
    if dimensions is not None:
        vectors = vectors[:, :dimensions]
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if normalize:
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.maximum(norms, 1e-12)
    return vectors


def ranges_for(reference: np.ndarray, dimensions: int | None, normalize: bool) -> np.ndarray:
    """[2, dims] float32: least and greatest value per dimension of the reference vectors in this shape."""
    shaped = postprocess(np.asarray(reference, dtype=np.float32), dimensions, normalize)
    return np.vstack((shaped.min(axis=0), shaped.max(axis=0))).astype(np.float32)


def quantize(vectors: np.ndarray, precision: str, ranges: np.ndarray | None) -> np.ndarray:
    """int8/uint8 [n, dims] (in `ranges`) or packed bits [n, ceil(dims / 8)] (`ranges` None), as
    sentence-transformers makes them."""
    from sentence_transformers.util.quantization import quantize_embeddings

    return quantize_embeddings(vectors, precision=precision, ranges=ranges)
