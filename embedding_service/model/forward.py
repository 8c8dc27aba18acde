"""What a replica computes with, and how: the model loaded with its backend and input encoder, and token
sequences run through it in forward passes within a token budget.

The same path serves calls (model/deployment.py), the start-up check (model/verification.py) and int8's
calibration samples, so what is checked is what is served.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from embedding_service.config import PACKAGE_PREFIX, ModelSettings
from embedding_service.model.accuracy import corpus
from embedding_service.model.calibration import Calibration, calibration_for
from embedding_service.model.runtimes import (
    Runtime,
    TorchRuntime,
    bf16_emulated,
    falls_back_to_torch,
    load_runtime,
    resolve_backend,
)
from embedding_service.model.tokenization import InputEncoder
from embedding_service.model.verification import check, report
from embedding_service.observability.logs import service_logger
from embedding_service.wire.messages import Verification

logger = service_logger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    """What a replica computes with: the sentence-transformers model, its backend and its input encoder."""

    model: Any  # sentence_transformers.SentenceTransformer
    device: str
    backend: str
    runtime: Runtime
    encoder: InputEncoder
    # The start-up check of the backend; None: not checked (tests that build a replica by hand).
    verification: Verification | None = None
    # The start-up check's reference; its corpus vectors (the gate), when loaded, give the int8/uint8 ranges.
    calibration: Calibration | None = None
    # Settings the replica runs without (not_applied below), each logged at WARNING by load_model or load_runtime.
    not_applied: tuple[str, ...] = ()

    @property
    def dimension(self) -> int:
        return int(self.model.get_embedding_dimension())


def model_source(path: str) -> str:
    """Where the weights are: a folder or hub id as given, or "package:<module>"'s get_model_path()."""
    if path.startswith(PACKAGE_PREFIX):
        return str(importlib.import_module(path[len(PACKAGE_PREFIX) :]).get_model_path())
    return path


def resolve_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def load_model(settings: ModelSettings) -> LoadedModel:
    import torch
    from sentence_transformers import SentenceTransformer

    if settings.threads:
        torch.set_num_threads(settings.threads)  # process-wide: holds in the forward thread too
    device = resolve_device(settings.device)
    source = model_source(settings.path)
    # Always loaded with torch: the tokenizer, the pooling modules and the reference vectors come from it;
    # model/runtimes.py compiles the transformer for onnx/openvino.
    model = SentenceTransformer(source, device=device, trust_remote_code=settings.trust_remote_code)
    model.eval()
    if settings.max_seq_length is not None:
        model.max_seq_length = settings.max_seq_length
    encoder = InputEncoder(model, settings.long_inputs)
    calibration = calibration_for(model, settings.calibration, gate=settings.precision != "fp32")
    samples = calibration_samples(encoder) if settings.precision == "int8" else []
    backend, runtime = load_runtime(model, settings.backend, device, settings.threads, settings.precision, samples,
                                    settings.cpu_pinning)
    dimension = int(model.get_embedding_dimension())
    backend, runtime, verification = checked_runtime(model, encoder, calibration, settings, device, dimension,
                                                     backend, runtime)
    logger.info("model %s loaded from %s on %s (%s, %s)", settings.name, source, device, backend, settings.precision)
    missed = not_applied(settings, device, backend)
    if "cpu_pinning" in missed:  # a fallen-back backend was logged with its cause by load_runtime or checked_runtime
        logger.warning("cpu_pinning applies to OpenVINO only: backend %s on %s runs without it", backend, device)
    if "precision" in missed:
        warn_bf16_emulated(settings.name)
    return LoadedModel(model, device, backend, runtime, encoder, verification, calibration, missed)


def checked_runtime(model, encoder: InputEncoder, calibration: Calibration, settings: ModelSettings, device: str,
                    dimension: int, backend: str, runtime: Runtime) -> tuple[str, Runtime, Verification]:
    """The runtime that serves, after the start-up check (canary, gate): a compiled backend that compiled but fails
    it is replaced by torch where backend auto allows (a graph that traced but computes other vectors, as a
    decoder's or a long-context model's may), logged once at WARNING; else the refusal stands."""
    verification = check(text_embedder(runtime, encoder, settings, device, dimension), calibration, settings)
    refused = verification.refused is not None and backend != "torch"
    if refused and falls_back_to_torch(settings.backend, settings.precision):
        logger.warning("backend auto: %s failed its start-up check (%s); running it with torch", backend,
                       verification.refused)
        backend, runtime = "torch", TorchRuntime(model, settings.precision)
        verification = check(text_embedder(runtime, encoder, settings, device, dimension), calibration, settings)
    report(verification, settings)
    return backend, runtime, verification


def not_applied(settings: ModelSettings, device: str, backend: str) -> tuple[str, ...]:
    """The settings a model loaded on `device` with `backend` runs without: cpu_pinning where its backend is not
    OpenVINO (backend auto on a GPU, or fallen back to torch), and backend auto that fell back to torch (its
    compiled backend failed to compile or failed the start-up check), and precision bf16 where it runs without
    the speed it is chosen for (torch on a CPU without bf16 units)."""
    missed = []
    if settings.cpu_pinning and backend != "openvino":
        missed.append("cpu_pinning")
    if settings.backend == "auto" and backend != resolve_backend("auto", device):
        missed.append("backend")
    if bf16_emulated(settings.precision, device, backend):
        missed.append("precision")
    return tuple(missed)


def torch_kind_not_applied(settings: ModelSettings, device: str) -> tuple[str, ...]:
    """What a kind that runs its own torch module (rerank, sparse) runs without, logged once at WARNING: precision
    bf16 on a CPU without bf16 units."""
    if not bf16_emulated(settings.precision, device, "torch"):
        return ()
    warn_bf16_emulated(settings.name)
    return ("precision",)


def warn_bf16_emulated(model: str) -> None:
    logger.warning("model %s: precision bf16 on a CPU without bf16 units (AMX or AVX512-BF16): torch emulates it, "
                   "several times slower than fp32; run fp32 on this CPU", model)


def text_embedder(runtime: Runtime, encoder: InputEncoder, settings: ModelSettings, device: str,
                  dimension: int) -> Callable[[Sequence[str]], np.ndarray]:
    """texts -> the vectors the replica serves for them (no prompt, truncated at the end): what the start-up
    check (verification.check) measures."""

    def embed(texts: Sequence[str]) -> np.ndarray:
        sequences = encoder.prepare(list(texts), "end").sequences
        return forward_sorted(runtime, encoder, sequences, None, settings.forward_batch_size,
                              settings.forward_token_budget(device), device, dimension)[0]

    return embed


def embed_texts(loaded: LoadedModel, settings: ModelSettings, texts: Sequence[str], truncation: str = "end",
                prompt: str | None = None) -> tuple[np.ndarray, list[int]]:
    """texts -> their pooled vectors (before any cut or normalization) and each one's tokens, as a replica computes
    them: tokenized with the prompt and the truncation policy, run in passes within the model's token budget."""
    prepared = loaded.encoder.prepare(list(texts), truncation, prompt)
    out = forward_sorted(loaded.runtime, loaded.encoder, prepared.sequences, prompt, settings.forward_batch_size,
                         settings.forward_token_budget(loaded.device), loaded.device, loaded.dimension)[0]
    return prepared.pool(out), list(prepared.token_counts)


def reference_vectors(loaded: LoadedModel, settings: ModelSettings) -> np.ndarray:
    """The calibration corpus's fp32 vectors, which give the int8/uint8 ranges: loaded with the model when its
    precision's gate needed them, else computed now with fp32 torch (seconds to minutes on CPU)."""
    calibration = loaded.calibration
    if calibration is not None and len(calibration.gate):
        return calibration.gate
    return calibration_for(loaded.model, settings.calibration, gate=True).gate


def calibration_samples(encoder: InputEncoder, per_batch: int = 8) -> list[dict]:
    """Features of the packaged calibration sentences (never gate sentences), to calibrate int8."""
    texts = corpus().calibration
    return [encoder.features(encoder.prepare(list(texts[i : i + per_batch]), "end").sequences)
            for i in range(0, len(texts), per_batch)]


def plan_passes(lengths: Sequence[int], max_sequences: int, max_tokens: int) -> list[list[int]]:
    """Positions of sequences grouped into forward passes, longest first.

    A padded backend computes longest x count token slots per pass: a pass takes sequences while both that
    product stays within `max_tokens` and the count within `max_sequences`. A sequence longer than
    `max_tokens` runs alone (it cannot be split).
    """
    order = sorted(range(len(lengths)), key=lambda k: -lengths[k])
    passes: list[list[int]] = []
    for k in order:
        current = passes[-1] if passes else None
        if current and len(current) < max_sequences and lengths[current[0]] * (len(current) + 1) <= max_tokens:
            current.append(k)
        else:
            passes.append([k])
    return passes


def forward_sorted(runtime: Runtime, encoder: InputEncoder, sequences: list[np.ndarray], prompt: str | None,
                   max_sequences: int, max_tokens: int, device: str, dimension: int) -> tuple[np.ndarray, int]:
    """The vectors of sequences, run longest first in passes within both budgets (plan_passes), and the token
    slots computed (longest x count, per pass)."""
    out = np.empty((len(sequences), dimension), dtype=np.float32)
    padded = 0
    for rows in plan_passes([len(s) for s in sequences], max_sequences, max_tokens):
        padded += len(sequences[rows[0]]) * len(rows)  # longest first
        features = encoder.features([sequences[k] for k in rows], prompt)
        features = {k: v.to(device) if hasattr(v, "to") else v for k, v in features.items()}
        out[rows] = runtime.embed(features)
    return out, padded
