"""The router's replies: what the replicas computed and said about themselves, as the proto's messages."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from embedding_client.v1 import embedding_pb2 as pb
from embedding_service.config import Limits
from embedding_service.kinds import KINDS
from embedding_service.wire.messages import ModelInfo, Verification


def model_message(info: ModelInfo, default_model: str) -> pb.Model:
    return pb.Model(
        name=info.name,
        dimension=info.dimension,
        max_sequence_length=info.max_sequence_length,
        prompts=info.prompts,
        device=info.device,
        backend=info.backend,
        vocab_size=info.vocab_size,
        is_default=info.name == default_model,
        source=info.source,
        kind=KINDS[info.kind].proto,
        labels=info.labels,
        activation=info.activation,
        long_inputs=None if info.windows is None else pb.LongInputWindows(
            window_tokens=info.windows.window_tokens, overlap_tokens=info.windows.overlap_tokens,
            max_windows=info.windows.max_windows),
        **_verification_fields(info.verification),
    )


def _verification_fields(verification: Verification | None) -> dict:
    if verification is None:
        return {}
    v = verification
    accuracy = pb.ModelAccuracy(
        reference=v.reference, canary_min_cosine=v.canary_min_cosine,
        canary_threshold=v.canary_threshold, min_mean_cosine=v.min_mean_cosine, min_recall_at_10=v.min_recall_at_10)
    if v.accuracy is not None:
        accuracy.gate_sentences = v.accuracy.sentences
        accuracy.mean_cosine = v.accuracy.mean_cosine
        accuracy.recall_at_10 = v.accuracy.recall_at_10
    return {"precision": v.precision, "accuracy": accuracy, "refused": v.refused or ""}


def limits_message(limits: Limits) -> pb.ServiceLimits:
    return pb.ServiceLimits(max_inputs_per_request=limits.max_inputs_per_request,
                            max_inputs_per_stream=limits.max_inputs_per_stream,
                            max_chars_per_input=limits.max_chars_per_input,
                            max_token_ids_per_input=limits.max_token_ids_per_input,
                            max_request_bytes=limits.max_request_bytes,
                            max_documents_per_rerank=limits.max_documents_per_rerank,
                            max_documents_per_rerank_stream=limits.max_documents_per_rerank_stream,
                            max_sparse_terms=limits.max_sparse_terms,
                            max_query_tokens=limits.max_query_tokens,
                            max_labels_per_result=limits.max_labels_per_result,
                            max_token_ids_per_detokenize=limits.max_token_ids_per_detokenize)


def quantization_message(ranges: np.ndarray, dimensions: int, normalized: bool, sentences: int) -> pb.QuantizationRanges:
    return pb.QuantizationRanges(dimensions=dimensions, normalized=normalized, min=ranges[0].tolist(),
                                 max=ranges[1].tolist(), calibration_sentences=sentences)


def fill(embeddings, positions: Iterable[int], vectors: np.ndarray, counts: np.ndarray, raw: bool) -> None:
    """Adds one Embedding per row: packed bytes of a compact type, raw float32 bytes, or packed floats."""
    packed = vectors.dtype in (np.int8, np.uint8)
    for row, pos in enumerate(positions):
        vec = vectors[row]
        if packed:
            embeddings.add(index=int(pos), packed=vec.tobytes(), tokens=int(counts[row]))
        elif raw:
            embeddings.add(index=int(pos), float32_le=vec.astype("<f4", copy=False).tobytes(), tokens=int(counts[row]))
        else:
            embeddings.add(index=int(pos), values=vec.tolist(), tokens=int(counts[row]))


def fill_sparse(embeddings, positions: Iterable[int], vectors, counts: np.ndarray) -> None:
    """Adds one SparseEmbedding per vector (wire.messages.SparseVector)."""
    for row, pos in enumerate(positions):
        v = vectors[row]
        e = embeddings.add(index=int(pos), tokens=int(counts[row]), active_terms=v.active)
        e.indices.extend(v.indices.tolist())
        e.values.extend(v.values.tolist())
        if v.terms is not None:
            e.terms.extend(v.terms)


def fill_scores(results, positions: Iterable[int], scores: np.ndarray, counts: np.ndarray, documents) -> None:
    """Adds one RerankResult per position (documents: the request's, when they are returned; else None)."""
    for row, pos in enumerate(positions):
        result = results.add(index=int(pos), score=float(scores[row]), tokens=int(counts[row]))
        if documents is not None:
            result.document = documents[pos]


def stamp(message, tokens: int, queue_ns: int, inference_ns: int) -> None:
    """Usage and timing of an Embed reply or an EmbedStream chunk."""
    message.usage.prompt_tokens = tokens
    message.usage.total_tokens = tokens
    message.timing.queue_time_ns = queue_ns
    message.timing.inference_time_ns = inference_ns


def fill_classifications(classifications, positions: Iterable[int], scores: np.ndarray, counts: np.ndarray,
                         labels: tuple[str, ...], top: int) -> None:
    """Adds one Classification per row: its `top` labels, highest score first (ties in label order)."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :top]
    for row, pos in enumerate(positions):
        c = classifications.add(index=int(pos), tokens=int(counts[row]))
        for k in order[row].tolist():
            c.labels.add(label=labels[k], label_id=k, score=float(scores[row, k]))
