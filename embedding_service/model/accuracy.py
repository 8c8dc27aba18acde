"""How close a backend's vectors are to fp32 torch's: the packaged corpus, the gate and the canary.

The corpus (model/calibration_data/sentences.txt.gz, built by
scripts/build_calibration_corpus.py) is split once, the same way everywhere:
the first CANARY sentences are the canary, the next GATE_SENTENCES the gate,
the rest calibrate int8 quantization, so the gate is measured on sentences
the quantizer never saw.

Measures, against fp32 torch vectors of the same sentences:
- mean cosine: the average of each sentence's cosine to its fp32 vector;
- recall@10: for every gate sentence, the share of its ten nearest neighbours
  among the gate sentences (by fp32 vectors) that the backend's vectors also
  put in its ten nearest: what a search index built on them would lose.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import numpy as np

from embedding_service.wire.messages import Accuracy

CANARY = 16
CANARY_STRIDE = 325
GATE_SENTENCES = 5000
NEIGHBOURS = 10


@dataclass(frozen=True)
class Corpus:
    canary: tuple[str, ...]
    gate: tuple[str, ...]
    calibration: tuple[str, ...]


@lru_cache(maxsize=1)
def corpus() -> Corpus:
    raw = resources.files("embedding_service.model.calibration_data").joinpath("sentences.txt.gz").read_bytes()
    sentences = tuple(gzip.decompress(raw).decode("utf-8").splitlines())
    # Canary sentences spread over the file, so they hold news and documentation alike.
    picked = range(0, CANARY_STRIDE * CANARY, CANARY_STRIDE)
    rest = [s for k, s in enumerate(sentences) if k not in picked]
    return Corpus(tuple(sentences[k] for k in picked), tuple(rest[:GATE_SENTENCES]), tuple(rest[GATE_SENTENCES:]))


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def cosines(vectors: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Each row's cosine to the same row of the reference."""
    return (_unit(vectors) * _unit(reference)).sum(axis=1)


def _neighbours(unit: np.ndarray, k: int) -> np.ndarray:
    """Indices of each row's k nearest other rows (by cosine), in blocks to bound memory."""
    out = np.empty((len(unit), k), dtype=np.int64)
    for start in range(0, len(unit), 1024):
        scores = unit[start : start + 1024] @ unit.T
        rows = np.arange(len(scores))
        scores[rows, rows + start] = -np.inf  # not its own neighbour
        out[start : start + 1024] = np.argpartition(-scores, k, axis=1)[:, :k]
    return out


def measure(vectors: np.ndarray, reference: np.ndarray) -> Accuracy:
    if vectors.shape != reference.shape:
        raise ValueError(f"vectors {vectors.shape} and reference {reference.shape} differ in shape")
    k = min(NEIGHBOURS, len(reference) - 1)
    ours, theirs = _neighbours(_unit(vectors), k), _neighbours(_unit(reference), k)
    shared = sum(len(np.intersect1d(a, b, assume_unique=True)) for a, b in zip(ours, theirs))
    return Accuracy(len(vectors), float(cosines(vectors, reference).mean()), shared / (k * len(vectors)))


def gate_failure(accuracy: Accuracy, min_mean_cosine: float, min_recall_at_10: float) -> str | None:
    """Why the figures miss the gate, or None when they pass."""
    misses = []
    if accuracy.mean_cosine < min_mean_cosine:
        misses.append(f"mean cosine {accuracy.mean_cosine:.5f} < {min_mean_cosine}")
    if accuracy.recall_at_10 < min_recall_at_10:
        misses.append(f"recall@10 {accuracy.recall_at_10:.4f} < {min_recall_at_10}")
    if not misses:
        return None
    return f"accuracy gate missed on {accuracy.sentences} sentences: {', '.join(misses)}"


def canary_failure(vectors: np.ndarray, reference: np.ndarray, min_cosine: float) -> tuple[float, str | None]:
    """(the lowest canary cosine, why it fails or None)."""
    worst = float(cosines(vectors, reference).min()) if len(reference) else 1.0
    if worst < min_cosine:
        return worst, (f"canary failed: a canary sentence's vector has cosine {worst:.6f} to its fp32 torch vector "
                       f"(< {min_cosine})")
    return worst, None
