"""What the service's processes say to each other: the router and the model replicas, the fleet and both.

Plain dataclasses, numpy arrays and exceptions, cheap to pickle between Ray processes, and importable in
every one of them: nothing here imports torch, transformers or Ray. The names Serve knows the deployments by
live here too, since the router, the proxy-side code and the run command all find them by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from embedding_client.encodings import OUTPUTS
from embedding_service.kinds import Kind
from embedding_service.wire.deadline import ELAPSED_KEY, TIMEOUT_KEY, UNBOUNDED, Deadline

# A text, int32 token ids without special tokens, or a pair of texts (a classification's text and text_pair).
Input = str | np.ndarray | tuple[str, str]
# What to do with an input longer than the model takes (the proto's TruncationPolicy).
Policy = Literal["end", "start", "reject", "windows"]

ROUTER_DEPLOYMENT = "EmbedRouter"
FLEET_DEPLOYMENT = "NodeRecycler"
JOBS_DEPLOYMENT = "JobManager"
# The one grpc.health.v1 service that is the proxy's own (SERVING whenever it answers), for liveness probes.
LIVENESS = "liveness"
# Whoever follows the fleet's view (routers, their request routers) asks again at least this often.
FLEET_LONG_POLL_S = 5.0

# The wire encodings that carry packed bytes, to sentence-transformers' precision names (the client's table).
COMPACT_ENCODINGS = {encoding: name for name, (encoding, _) in OUTPUTS.items() if name != "float"}
# The compact types placed in ranges calibrated per model (the others are sign bits).
RANGED = ("int8", "uint8")

# Metadata on a call that Serve's proxy merged from several callers' (proxy/merging.py): how many.
MERGED_KEY = "embedding-merged-calls"
# What the service's own processes tell each other in a call's metadata: the proxy drops these from what a
# caller sent, so a caller never sets them.
INTERNAL_METADATA = frozenset({TIMEOUT_KEY, ELAPSED_KEY, MERGED_KEY})


def model_deployment_name(model: str) -> str:
    return "model-" + model.replace("/", "_")


@dataclass(frozen=True)
class Windows:
    """How truncation "windows" cuts an input, resolved for one model."""

    window_tokens: int  # input tokens per window, the prompt's included
    overlap_tokens: int
    max_windows: int
    special_tokens: int  # the model's, added to each window

    @property
    def max_tokens(self) -> int:
        """The longest input (special tokens included, no prompt) max_windows windows cover."""
        step = self.window_tokens - self.overlap_tokens
        return self.window_tokens + (self.max_windows - 1) * step + self.special_tokens

    def starts(self, tokens: int, span: int) -> range:
        """Where each window of `span` tokens begins in `tokens` tokens (the prompt left out)."""
        step = span - min(self.overlap_tokens, span - 1)
        count = 1 if tokens <= span else 1 + -(-(tokens - span) // step)
        return range(0, count * step, step)


@dataclass(frozen=True)
class Accuracy:
    """A backend's vectors measured against fp32 torch's on the gate sentences."""

    sentences: int
    mean_cosine: float
    recall_at_10: float


@dataclass(frozen=True)
class Verification:
    """A replica's start-up check of its backend against fp32 torch (the canary, and the gate below fp32)."""

    precision: str
    reference: str  # where the fp32 vectors came from
    canary_min_cosine: float
    canary_threshold: float
    accuracy: Accuracy | None  # the gate's figures; None for fp32 (not measured)
    min_mean_cosine: float
    min_recall_at_10: float
    refused: str | None  # why the replica refuses to serve; None when it serves


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
    # rerank: dimension 1 (a score per pair); sparse: the vocabulary's size; classify: the number of labels
    kind: Kind = "embedding"
    labels: tuple[str, ...] = ()  # a classification model's, by label id
    activation: str = ""  # a classification model's scores: "softmax" or "sigmoid" of its logits
    # Whether the model's tokenizer cleans up spaces around punctuation when it decodes (transformers'
    # clean_up_tokenization_spaces), so Detokenize decodes as the model's own tokenizer does.
    decode_cleanup: bool = False


@dataclass(frozen=True)
class EmbedOptions:
    """Per-request options, validated by the router."""

    dimensions: int | None = None
    normalize: bool = True
    truncation: Policy = "end"
    prompt_name: str | None = None
    # "float", or a compact type the replica quantizes to: int8, uint8, binary, ubinary (COMPACT_ENCODINGS).
    output: str = "float"


@dataclass(frozen=True)
class RerankOptions:
    """A rerank call's options: every input of its shards is a document scored against `query`."""

    query: str
    truncation: Policy = "end"  # end (CrossEncoder's own: the longer of query and document is cut) or reject
    activation: bool = False  # the model's activation on the scores (sigmoid for one label); else raw logits


@dataclass(frozen=True)
class SparseOptions:
    """A sparse call's options, validated by the router."""

    top_k: int  # terms kept per vector, its heaviest (the request's top_k or the service's max_sparse_terms)
    truncation: Policy = "end"  # end or reject
    return_tokens: bool = False


@dataclass(frozen=True)
class ClassifyOptions:
    """A classification call's options: the replica returns every label's score per input (the router keeps the
    top_k of them)."""

    truncation: Policy = "end"  # end (the longer text of a pair is cut first) or reject
    raw_scores: bool = False  # the model's logits instead of their activation


Options = EmbedOptions | RerankOptions | SparseOptions | ClassifyOptions


@dataclass(frozen=True)
class SparseVector:
    """One input's sparse vector as the replica returns it."""

    indices: np.ndarray  # int32 vocabulary ids, ascending
    values: np.ndarray  # float32 weights, in the order of indices
    active: int  # terms above zero before top_k cut them
    terms: tuple[str, ...] | None = None  # the token strings of indices, when asked


@dataclass(frozen=True)
class ShardRequest:
    inputs: list[Input]
    options: Options
    # When the caller stops waiting; the replica drops a shard whose time ran out before it ran.
    deadline: Deadline = UNBOUNDED
    # The router's shard span as W3C trace headers (observability.tracing); None when tracing is off.
    trace_context: dict[str, str] | None = None


@dataclass
class ShardResult:
    # (n, d) float32, or the compact type's int8/uint8; (n,) float32 scores of a rerank shard; (n, labels) float32
    # scores of a classification shard; None when inputs were rejected or for a sparse shard
    vectors: np.ndarray | None
    token_counts: np.ndarray  # (n,) tokens per input, special tokens included
    too_long: list[int] = field(default_factory=list)  # shard positions over the limit
    queue_ns: int = 0
    inference_ns: int = 0
    sparse: list[SparseVector] | None = None  # a sparse shard's vectors

    def part(self, offset: int, n: int) -> ShardResult | None:
        """Rows [offset, offset + n) of a result computed for several callers at once; None when only another
        caller's inputs were too long (this caller's must go again without them)."""
        rows = slice(offset, offset + n)
        part = ShardResult(
            vectors=None if self.vectors is None else self.vectors[rows],
            token_counts=self.token_counts[rows],
            too_long=[p - offset for p in self.too_long if offset <= p < offset + n],
            queue_ns=self.queue_ns,
            inference_ns=self.inference_ns,
            sparse=None if self.sparse is None else self.sparse[rows],
        )
        return None if part.vectors is None and part.sparse is None and not part.too_long else part


class ReplicaFaulted(Exception):
    """The replica's device failed; the router sends the shard again, elsewhere."""


class ReplicaRefused(Exception):
    """The replica's backend failed its start-up check; the router sends the shard again, elsewhere."""


class ReplicaError(RuntimeError):
    """A model replica failed a call for a reason of its own, told by class name and message: exceptions of the
    model's libraries never cross to the router, whose process does not load them."""
