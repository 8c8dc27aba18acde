"""The accuracy gates of rerank and sparse models below fp32: what bf16 keeps of fp32 torch, at start-up.

On the packaged corpus's gate sentences (model/accuracy.corpus), never its canary or calibration parts:
- rerank: QUERIES sentences each score PASSAGES others, in fp32 and in the replica's precision; recall@10 is the
  share of each query's ten best passages by fp32 that the replica's scores also put in its ten best (what a
  reranked result page would lose); mean cosine is not measured (logits are not vectors).
- sparse: SPARSE_SENTENCES sentences; mean cosine of each sparse vector to its fp32 one, and recall@10 the share
  of each vector's ten heaviest fp32 terms that are among its ten heaviest.
The canary sentences (their outputs' cosine to fp32's, at least the precision's canary_threshold) are checked
first. The replica computes the fp32 reference itself, with the same weights in fp32 before casting them, and
refuses to serve when the canary or the gate (config.AccuracyGate) is missed, as an embedding replica does
(model/verification.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from embedding_service.config import ModelSettings
from embedding_service.model.accuracy import corpus, gate_failure
from embedding_service.observability.logs import service_logger
from embedding_service.wire.messages import Accuracy, Verification

logger = service_logger(__name__)

QUERIES = 10
PASSAGES = 50
SPARSE_SENTENCES = 200
TOP = 10
REFERENCE = "computed at start-up with fp32 torch"


def rerank_pairs() -> tuple[list[list[str]], int]:
    """Every (query, passage) pair of the gate, query by query, and the passages per query."""
    gate = corpus().gate
    queries, passages = gate[:QUERIES], gate[QUERIES : QUERIES + PASSAGES]
    return [[q, p] for q in queries for p in passages], PASSAGES


def rerank_canary() -> list[list[str]]:
    """The canary sentences paired each with the next: one score each."""
    canary = corpus().canary
    return [[q, canary[(k + 1) % len(canary)]] for k, q in enumerate(canary)]


def sparse_sentences() -> list[str]:
    return list(corpus().gate[:SPARSE_SENTENCES])


def sparse_canary() -> list[str]:
    return list(corpus().canary)


def canary_cosine(outputs: np.ndarray, reference: np.ndarray) -> float:
    """The lowest cosine of a canary's output to its fp32 one: per sentence for sparse vectors ((n, vocab)); for
    rerank scores ((n,)), the cosine of the canary pairs' score vector to fp32's."""
    ours, theirs = (outputs[None, :], reference[None, :]) if outputs.ndim == 1 else (outputs, reference)
    norms = np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1)
    return float(((ours * theirs).sum(axis=1) / np.maximum(norms, 1e-12)).min())


def _recall(ours: np.ndarray, theirs: np.ndarray) -> float:
    """Rows' share of theirs' TOP highest columns among ours' TOP highest."""
    k = min(TOP, ours.shape[1])
    a = np.argsort(-ours, axis=1, kind="stable")[:, :k]
    b = np.argsort(-theirs, axis=1, kind="stable")[:, :k]
    return float(np.mean([len(np.intersect1d(x, y)) / k for x, y in zip(a, b)]))


def rerank_accuracy(scores: np.ndarray, reference: np.ndarray, per_query: int) -> Accuracy:
    ours, theirs = scores.reshape(-1, per_query), reference.reshape(-1, per_query)
    return Accuracy(len(ours), 1.0, _recall(ours, theirs))


def sparse_accuracy(weights: np.ndarray, reference: np.ndarray) -> Accuracy:
    norms = np.linalg.norm(weights, axis=1) * np.linalg.norm(reference, axis=1)
    cosines = (weights * reference).sum(axis=1) / np.maximum(norms, 1e-12)
    return Accuracy(len(weights), float(cosines.mean()), _recall(weights, reference))


def verify_scoring(settings: ModelSettings, reference: tuple[np.ndarray, np.ndarray],
                   compute: Callable[[], tuple[np.ndarray, np.ndarray]],
                   measure: Callable[[np.ndarray, np.ndarray], Accuracy]) -> Verification:
    """`reference`: the fp32 outputs on the canary and on the gate; `compute()`: the replica's own, as it serves
    them. The canary first (its precision's canary_threshold), then the gate."""
    gate = settings.accuracy_gate
    threshold = settings.canary_threshold
    canary, outputs = compute()
    worst = canary_cosine(canary, reference[0])
    accuracy = measure(outputs, reference[1])
    refused = None
    if worst < threshold:
        refused = f"canary failed: the canary's outputs have cosine {worst:.6f} to fp32 torch's (< {threshold})"
    else:
        refused = gate_failure(accuracy, gate.min_mean_cosine if settings.kind == "sparse" else 0.0,
                               gate.min_recall_at_10)
    if refused is not None:
        refused = f"{settings.precision} on torch: {refused}"
        logger.error("model %s: refusing to serve: %s", settings.name, refused)
    else:
        logger.info("model %s: %s passed its %s gate (mean cosine %.5f, recall@10 %.4f)", settings.name,
                    settings.precision, settings.kind, accuracy.mean_cosine, accuracy.recall_at_10)
    return Verification(settings.precision, REFERENCE, worst, threshold, accuracy,
                        gate.min_mean_cosine if settings.kind == "sparse" else 0.0, gate.min_recall_at_10, refused)


def run_in_passes(rows: Sequence, batch: int, forward: Callable[[list], np.ndarray]) -> np.ndarray:
    return np.concatenate([forward(list(rows[i : i + batch])) for i in range(0, len(rows), batch)])
