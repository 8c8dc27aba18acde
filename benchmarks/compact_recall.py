"""Retrieval quality of the compact vector types against float: recall@10 on real text.

`python -m benchmarks.compact_recall`: the packaged corpus's 5,000 sentences (the calibration vectors the service
ships for all-MiniLM-L6-v2: fp32 sentence-transformers vectors, normalized), the first 1,000 as queries against all
5,000 (each query's own sentence left out). A type's recall@10 is the share of each query's 10 nearest neighbours by
float cosine that its own ranking also puts in its top 10: int8 and uint8 ranked by dot product of the bytes read
back in the published ranges (each byte as the middle of its step), binary and ubinary by Hamming distance.
"""

from __future__ import annotations

from importlib import resources

import numpy as np
from sentence_transformers.util.quantization import quantize_embeddings

from embedding_service.model.quantization import ranges_for

K = 10


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    part = np.argpartition(-scores, k, axis=1)[:, :k]
    return part


def recall_at_10(vectors: np.ndarray, queries: int = 1000) -> dict[str, float]:
    ranges = ranges_for(vectors, None, True)
    q = np.arange(queries)
    truth = vectors[:queries] @ vectors.T
    truth[q, q] = -np.inf
    expected = _top(truth, K)
    out = {"float": 1.0}
    for precision in ("int8", "uint8", "binary", "ubinary"):
        packed = quantize_embeddings(vectors, precision=precision, ranges=ranges)
        if precision.endswith("int8"):
            # Each byte read back as its step's middle in the published ranges, then dot products.
            steps = (ranges[1] - ranges[0]) / 255
            level = packed.astype(np.float32) + (128 if precision == "int8" else 0)
            restored = ranges[0] + (level + 0.5) * steps
            scores = (restored[:queries] @ restored.T).astype(np.float64)
        else:
            bits = np.unpackbits(packed.view(np.uint8) ^ (0x80 if precision == "binary" else 0), axis=1)
            signs = bits.astype(np.int32) * 2 - 1
            scores = (signs[:queries] @ signs.T).astype(np.float64)  # = dims - 2 * Hamming distance
        scores[q, q] = -np.inf
        # Ties (common for bits) broken by a fixed jitter, so a tie does not count for or against a type.
        scores += np.random.default_rng(0).random(scores.shape) * 1e-3
        got = _top(scores, K)
        out[precision] = float(np.mean([len(set(a) & set(b)) / K for a, b in zip(expected, got)]))
    return out


def shipped_vectors() -> np.ndarray:
    files = [f for f in resources.files("embedding_service.model.calibrations").iterdir() if f.name.endswith(".npz")]
    with resources.as_file(files[0]) as path, np.load(path) as data:
        return data["gate"].astype(np.float32)


def main() -> None:
    vectors = shipped_vectors()
    for precision, recall in recall_at_10(vectors).items():
        print(f"{precision:8s} recall@10 {recall:.3f}  bytes per vector {_bytes(precision, vectors.shape[1])}")


def _bytes(precision: str, dims: int) -> int:
    return {"float": 4 * dims, "int8": dims, "uint8": dims}.get(precision, (dims + 7) // 8)


if __name__ == "__main__":
    main()
