"""What the router and the model replicas exchange, and how a job is cut into shards.

Plain dataclasses and numpy arrays: cheap to pickle between Ray processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from embedding_service.tokenization import Policy, Windows
from embedding_service.verification import Verification

Input = str | np.ndarray  # a text, or int32 token ids without special tokens


@dataclass(frozen=True)
class ModelInfo:
    name: str
    dimension: int
    max_sequence_length: int
    prompts: dict[str, str]
    device: str
    backend: str
    vocab_size: int
    source: str
    verification: Verification | None = None  # the answering replica's start-up check
    # The model's tokenizer (tokenizers' JSON), for the router to cut shards by tokens; "" when unknown.
    tokenizer_json: str = ""
    windows: Windows | None = None  # how truncation "windows" cuts long inputs; None: unknown


@dataclass(frozen=True)
class EmbedOptions:
    """Per-request options, validated by the router."""

    dimensions: int | None = None
    normalize: bool = True
    truncation: Policy = "end"
    prompt_name: str | None = None
    # "float", or a compact type the replica quantizes to (quantization.py): int8, uint8, binary, ubinary.
    output: str = "float"


@dataclass(frozen=True)
class ShardRequest:
    inputs: list[Input]
    options: EmbedOptions
    # Seconds the caller still waits, counted from when the router sends the shard;
    # None: no bound. The replica drops a shard whose time ran out before it ran.
    timeout_s: float | None = None
    # The router's shard span as W3C trace headers (tracing.py); None when tracing is off.
    trace_context: dict[str, str] | None = None


@dataclass
class ShardResult:
    vectors: np.ndarray | None  # (n, d) float32, or the compact type's int8/uint8; None when inputs were rejected
    token_counts: np.ndarray  # (n,) tokens per input, special tokens included
    too_long: list[int] = field(default_factory=list)  # shard positions over the limit
    queue_ns: int = 0
    inference_ns: int = 0


@dataclass(frozen=True)
class Shard:
    """Positions (in the request) of the inputs one mini-batch carries."""

    positions: np.ndarray


def plan_shards(inputs: Sequence[Input], shard_size: int, lengths: np.ndarray | None = None) -> list[Shard]:
    """Sort inputs by length and cut them into mini-batches of similar lengths.

    Similar lengths in one mini-batch keep padding (wasted compute) low. `lengths`: each
    input's tokens (token_lengths.py); without them, characters (a text) or token ids.
    """
    if lengths is None:
        lengths = np.fromiter((len(x) for x in inputs), dtype=np.int64, count=len(inputs))
    order = np.argsort(-lengths, kind="stable")
    return [Shard(order[i : i + shard_size]) for i in range(0, len(order), shard_size)]


def postprocess(vectors: np.ndarray, dimensions: int | None, normalize: bool) -> np.ndarray:
    """Matryoshka truncation, then L2 normalization, in float32."""
    if dimensions is not None:
        vectors = vectors[:, :dimensions]
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if normalize:
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.maximum(norms, 1e-12)
    return vectors
