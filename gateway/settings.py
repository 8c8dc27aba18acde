"""Gateway settings: typed, validated once at start-up, from the command line or GATEWAY_* variables."""

from __future__ import annotations

import ipaddress

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from embedding_service.config import JobLimits
from gateway.cohere_prompts import InputType


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class GatewaySettings(BaseSettings):
    """The OpenAI REST gateway: where it listens, the service it calls, its retries, coalescing and bounds."""

    model_config = SettingsConfigDict(env_prefix="GATEWAY_", extra="forbid", frozen=True)

    targets: list[str] = Field(
        default_factory=lambda: ["127.0.0.1:9000"], min_length=1,
        description="gRPC targets of the embedding service (host:port); calls are spread round-robin and move to "
        "the next target when one is unavailable.",
    )
    host: str = Field("127.0.0.1", description="Address the gateway listens on.")
    port: int = Field(8080, ge=0, le=65535, description="Port the gateway listens on; 0: any free port.")
    api_keys: list[str] = Field(
        default_factory=list,
        description="Bearer keys callers must send; empty disables auth, which is allowed on loopback only unless "
        "allow_unauthenticated is set.",
    )
    allow_unauthenticated: bool = Field(
        False, description="Serves without api_keys on an address other than loopback."
    )
    upstream_api_key: SecretStr | None = Field(
        None,
        description="The gateway's own key for the service's gRPC API (its args.auth), from the environment "
        "(GATEWAY_UPSTREAM_API_KEY), never the command line; None: no key sent.",
    )

    call_timeout_s: float = Field(30.0, gt=0, description="Deadline of one gRPC call, in seconds.")
    request_timeout_s: float = Field(
        60.0, gt=0, description="Deadline of a whole request with its retries, in seconds."
    )
    max_retries: int = Field(
        3, ge=0,
        description="Retries of a call that got UNAVAILABLE or RESOURCE_EXHAUSTED, after an exponential backoff "
        "or the server's RetryInfo delay when it sends one.",
    )
    backoff_initial_s: float = Field(
        0.1, ge=0, description="Seconds of the first retry's backoff; it doubles with each retry, with jitter."
    )
    backoff_max_s: float = Field(2.0, ge=0, description="Most seconds of one retry's backoff.")
    retry_after_s: int = Field(
        1, ge=0, description="Seconds in the Retry-After of a 503 or 429, unless the service asks for longer."
    )

    keep_alive_s: int = Field(
        75, ge=1,
        description="Seconds an idle client connection is kept open. Longer than a load balancer's own idle "
        "timeout (60 s on the common ones), so the balancer never reuses a connection the gateway has just "
        "closed (uvicorn's default, 5 s, makes that race: a reused connection breaks).",
    )
    access_log: bool = Field(
        False,
        description="uvicorn's line per request. Off because a log record per call costs more CPU than the rest "
        "of the gateway's per-call work but its JSON and gRPC; the gateway's metrics and traces count every "
        "request anyway.",
    )

    drain_delay_s: float = Field(
        5.0, ge=0,
        description="On SIGTERM or Ctrl-C, seconds /readyz answers 503 while requests are still served, so load "
        "balancers stop sending; then no new connections are taken.",
    )
    shutdown_timeout_s: float = Field(
        30.0, gt=0, description="Seconds the requests in flight may take to finish once the drain delay is over."
    )
    parent_pid: int | None = Field(
        None, gt=1,
        description="The process that started this one (`python -m embedding_service run`): when it is gone, "
        "however it died, the gateway stops as on SIGTERM instead of living on alone. None: nothing to follow "
        "(Kubernetes, by hand).",
    )

    coalesce_max_inputs: int = Field(
        32, ge=1,
        description="Inputs per merged gRPC call, and the most an embedding request may have to be merged "
        "(see gateway/coalescing.py); at most max_inputs.",
    )
    coalesce_max_in_flight: int = Field(
        1, ge=0,
        description="Concurrent embedding requests for one model and dimensions leave as one gRPC call once this "
        "many such calls are out, or at once when they fill coalesce_max_inputs; 0: off.",
    )
    coalesce_max_queued: int = Field(
        1024, ge=1,
        description="Requests waiting to leave in a merged call, over every key; past that a request is refused "
        "at once with 429 and Retry-After (as the service's full queues refuse), never held without bound.",
    )

    max_body_bytes: int = Field(
        64 * 1024 * 1024, ge=1024,
        description="Largest request body accepted, in bytes (413 past it); the run command and the manifests set "
        "it to the service's limits.max_request_bytes.",
    )
    max_inputs: int = Field(
        2048, ge=1,
        description="Inputs one request may carry; the run command and the manifests set it to the service's "
        "limits.max_inputs_per_request.",
    )
    max_token_ids: int = Field(
        100_000, ge=1,
        description="Token ids one input given as tokens may carry (400 past it, before its ids are looked at); the "
        "service's limits.max_token_ids_per_input, whose default it has.",
    )
    max_documents: int = Field(
        1000, ge=1,
        description="Documents one rerank request may carry (400 past it, before they are looked at); the service's "
        "limits.max_documents_per_rerank, whose default it has.",
    )
    max_cohere_texts: int = Field(
        96, ge=1,
        description="Texts one Cohere embed request (/v1/embed, /v2/embed) may carry (400 past it, before they are "
        "looked at); Cohere's own limit, in batches of which its SDK sends larger jobs. max_inputs bounds it too.",
    )
    cohere_input_type_prompts: dict[str, dict[InputType, str]] = Field(
        default_factory=dict,
        description="Per model, the prompt each Cohere input_type embeds with, for the input types named: "
        '{"bge-base": {"search_document": ""}} ("": the texts as they are). Otherwise search_query takes the '
        "model's prompt named query, search_document document or else passage (one with text first), classification "
        "and clustering their own names; a model with no prompts (or only empty ones) embeds every text as it is, "
        "and one with prompts but none for the input_type refuses it (400). Only from "
        "GATEWAY_COHERE_INPUT_TYPE_PROMPTS, as JSON.",
    )
    model_prompts_ttl_s: float = Field(
        60.0, gt=0,
        description="Seconds the gateway keeps the service's models' prompts (one ListModels) before listing "
        "them again; a model it does not know is listed again at once, at most once a second.",
    )
    max_detokenize_token_ids: int = Field(
        65_536, ge=1,
        description="Token ids one /detokenize or /decode request may carry, all its sequences together (400 past it, "
        "before they are looked at); the service's limits.max_token_ids_per_detokenize, whose default it has.",
    )
    max_json_values: int = Field(
        2**19, ge=1024,
        description="JSON values (strings, numbers, booleans, nulls, arrays, objects, keys) one request body may "
        "hold, counted over its bytes before it is parsed (400 past it): each parses into a Python object of up to "
        "~100 bytes, so a body of small values within max_body_bytes could otherwise take gigabytes. 524,288 is "
        "above OpenAI's own bound of 300,000 tokens per request, sent as token ids; it bounds one parse to ~50 MB.",
    )
    max_body_bytes_in_flight: int = Field(
        128 * 1024 * 1024, ge=1024,
        description="Bytes of request bodies the gateway holds at once over every request, counted as they arrive "
        "and until each request is answered (its inputs live on as the gRPC message); a request that would pass "
        "it gets 429 and Retry-After at once. A body larger than this is read only while no other is held.",
    )
    max_message_bytes: int = Field(
        256 * 1024 * 1024, ge=1024,
        description="Largest gRPC message the gateway sends to or receives from the service, in bytes.",
    )

    jobs_storage_root: str | None = Field(
        None,
        description="The batch jobs' storage root (the service's args.jobs.storage_root: a folder or "
        "s3://bucket/prefix): OpenAI's Files and Batches routes store uploads there and read outputs from there; "
        "None: those routes answer 404.",
    )
    jobs_s3_endpoint: str | None = Field(None, description="An S3-compatible server's endpoint (args.jobs.s3_endpoint).")
    jobs_store_url: SecretStr | None = Field(
        None,
        description="The jobs' store, an SQLAlchemy URL (the service's, from the same secret): only from the "
        "environment (GATEWAY_JOBS_STORE_URL); None: SQLite at <jobs_storage_root>/jobs.db.",
    )
    max_file_bytes: int = Field(
        JobLimits().max_file_bytes, ge=1,
        description="Bytes of one uploaded batch file (413 past it, as it streams); the service's "
        "args.jobs.limits.max_file_bytes, whose default it has.")
    max_files_per_key: int = Field(JobLimits().max_files_per_key, ge=1,
                                   description="Files one key may keep (args.jobs.limits.max_files_per_key).")
    max_jobs_per_key: int = Field(JobLimits().max_jobs_per_key, ge=1,
                                  description="Batches one key may keep (args.jobs.limits.max_jobs_per_key).")
    max_running_jobs_per_key: int = Field(
        JobLimits().max_running_jobs_per_key, ge=1,
        description="Batches of one key not yet final (429 past it; args.jobs.limits.max_running_jobs_per_key).")
    batch_completion_window_s: float = Field(
        24 * 3600.0, gt=0, description="Seconds a batch has to finish from its creation (OpenAI's completion_window "
        "24h): past them an unfinished batch ends expired, its lines done in its output files, the rest not run.")
    files_retention_s: float = Field(
        30 * 86400.0, gt=0, description="Seconds an uploaded file is kept; then deleted (args.jobs.retention_s).")

    @property
    def job_limits(self) -> JobLimits:
        return JobLimits(max_file_bytes=self.max_file_bytes, max_files_per_key=self.max_files_per_key,
                         max_jobs_per_key=self.max_jobs_per_key, max_running_jobs_per_key=self.max_running_jobs_per_key)

    @model_validator(mode="after")
    def _auth_off_only_on_loopback(self) -> GatewaySettings:
        if not self.api_keys and not self.allow_unauthenticated and not is_loopback(self.host):
            raise ValueError(
                f"no api_keys configured while listening on {self.host}: set api_keys, "
                "or allow_unauthenticated to serve without auth"
            )
        return self

    @model_validator(mode="after")
    def _merged_calls_within_the_input_bound(self) -> GatewaySettings:
        if self.coalesce_max_inputs > self.max_inputs:
            raise ValueError(f"coalesce_max_inputs ({self.coalesce_max_inputs}) exceeds max_inputs ({self.max_inputs})")
        return self
