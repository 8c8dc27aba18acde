"""The service's own metrics, declared once as data and made through Ray Serve's metrics API.

They appear on Ray's per-node metrics endpoint beside Serve's `ray_serve_*` metrics: Ray adds the `ray_`
prefix (counters also get `_total`) and, inside a replica, Serve adds the deployment, replica and
application tags. Every name starts with `embedding_`. Tags stay bounded: model names, backends, gRPC code
names, reason names, node states, never request data. docs/monitoring.md's table is made from SPECS
(scripts/generate_docs.py; a test keeps it in step).

Ray exports a histogram's `_sum` rebuilt from its bucket midpoints (its `_count` and buckets are exact), so
every total that matters also has an exact counter: inputs, tokens, sequences forwarded, token slots,
padding, seconds per stage.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from ray.serve import metrics

PREFIX = "embedding_"
# The model label of a call that failed before its model was known (e.g. an unknown name).
NO_MODEL = "(none)"
# The health label of the whole server (grpc.health.v1 service "").
OVERALL = "(overall)"

SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 16384, 65536)
TOKENS = (16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304)
# Ray forgets a gauge's value unless it is set again within two report intervals (each at least 1 s), so
# every gauge here is set again this often, changed or not.
GAUGE_REFRESH_S = 1.0


async def keep_gauges_set(report: Callable[[], None]) -> None:
    """Calls `report` (which sets gauges) now and every GAUGE_REFRESH_S, for the life of the process."""
    while True:
        report()
        await asyncio.sleep(GAUGE_REFRESH_S)


@dataclass(frozen=True)
class MetricSpec:
    """One metric as declared: made into a Ray metric per process, listed in the docs as Ray exports it."""

    name: str  # after PREFIX
    kind: Literal["counter", "gauge", "histogram"]
    description: str
    tags: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = ()

    @property
    def exported(self) -> str:
        """The name on Ray's Prometheus endpoint."""
        return f"ray_{PREFIX}{self.name}" + ("_total" if self.kind == "counter" else "")

    def make(self, defaults: dict[str, str]):
        name, tags = PREFIX + self.name, self.tags
        if self.kind == "counter":
            metric = metrics.Counter(name, description=self.description, tag_keys=tags)
        elif self.kind == "gauge":
            metric = metrics.Gauge(name, description=self.description, tag_keys=tags)
        else:
            metric = metrics.Histogram(name, description=self.description, boundaries=list(self.boundaries),
                                       tag_keys=tags)
        metric.set_default_tags({k: v for k, v in defaults.items() if k in tags})  # a copy: Serve adds its tags
        return metric


def counter(name: str, description: str, tags: tuple[str, ...] = ()) -> MetricSpec:
    return MetricSpec(name, "counter", description, tags)


def gauge(name: str, description: str, tags: tuple[str, ...] = ()) -> MetricSpec:
    return MetricSpec(name, "gauge", description, tags)


def histogram(name: str, description: str, boundaries: tuple[float, ...], tags: tuple[str, ...] = ()) -> MetricSpec:
    return MetricSpec(name, "histogram", description, tags, boundaries)


class _Group:
    """A process's metrics: each MetricSpec class attribute becomes a Ray metric of the same name on the
    instance, with `defaults` as its default tag values."""

    def __init__(self, **defaults: str) -> None:
        for attr, spec in specs_of(type(self)).items():
            setattr(self, attr, spec.make(defaults))


def specs_of(group: type) -> dict[str, MetricSpec]:
    return {attr: spec for attr, spec in vars(group).items() if isinstance(spec, MetricSpec)}


CALL = ("method", "model")
REPLICA = ("model", "backend", "kind")


class RouterMetrics(_Group):
    """The router's: calls as callers see them, and how they were cut into shards."""

    requests = counter("requests", "EmbedService calls that reached a router, by method, model and final gRPC "
                       "code (OK included).", ("method", "model", "code"))
    request_seconds = histogram("request_seconds", "Time from a call's arrival at the router to its last byte, "
                                "whatever the outcome.", SECONDS, CALL)
    request_inputs = histogram("request_inputs", "Inputs (documents of a rerank) per successful call.", COUNTS, CALL)
    request_tokens = histogram("request_tokens", "Tokens (special tokens included) per successful call.", TOKENS,
                               CALL)
    first_shard_seconds = histogram("request_first_shard_seconds", "Time from a call's arrival to its first "
                                    "shard's vectors back (a stream's first chunk).", SECONDS, CALL)
    request_shards = histogram("request_shards", "Shards (mini-batches) a call was cut into.", COUNTS, ("model",))
    shard_retries = counter("shard_retries", "Shards sent again because their replica died or its device failed, "
                            "by cause (the error's class).", ("model", "cause"))
    coalesced_callers = histogram("coalesced_callers", "Calls carried by one merged handle call to the model "
                                  "(1: a call that went alone).", COUNTS, ("model",))
    router_inputs_dropped = counter("router_inputs_dropped", "Inputs of calls dropped while they waited in the "
                                    "router to be coalesced: caller gone (reason=cancelled) or deadline passed "
                                    "(reason=deadline).", ("model", "reason"))
    inputs = counter("inputs", "Inputs embedded (documents scored) and returned to callers.", ("model",))
    tokens = counter("tokens", "Tokens embedded or scored and returned to callers (special tokens included).",
                     ("model",))
    health_serving = gauge("health_serving", "1 while the grpc.health.v1 service is SERVING, 0 otherwise; service "
                           f"is a model name or {OVERALL} for the whole server.", ("service",))

    ray_token_auth = gauge("ray_token_auth", "1 while the router's Ray runs with Ray's token authentication "
                           "(RAY_AUTH_MODE=token); 0: anyone who reaches Ray's ports (its dashboard, GCS, client "
                           "server) can run code on the cluster.")

    def set_health(self, statuses: dict[str, bool]) -> None:
        for service, serving in statuses.items():
            self.health_serving.set(1 if serving else 0, tags={"service": service or OVERALL})


class ProxyMetrics(_Group):
    """Serve's gRPC proxy (proxy/state.py, resends.py): calls it answered or sent again itself, and its settings."""

    refusals = counter("proxy_refusals", "Calls answered in Serve's gRPC proxy without a router's answer "
                       "(malformed bytes, Serve's queues full, no router), by method, gRPC code and reason.",
                       ("method", "code", "reason"))
    resent = counter("proxy_calls_resent", "Calls the proxy sent to another router because theirs stopped or "
                     "died before answering (an EmbedStream goes on with the inputs not yet returned).",
                     ("method",))
    inputs_dropped = counter("proxy_inputs_dropped", "Inputs of Embed calls dropped while they waited in the proxy "
                             "to leave merged: caller gone (reason=cancelled) or deadline passed (reason=deadline).",
                             ("reason",))
    merged_callers = histogram("proxy_merged_callers", "Embed calls carried by one call the proxy sent to the "
                               "router (1: a call that went alone; args.proxy.coalesce_max_in_flight).", COUNTS)
    options_in_force = gauge("proxy_grpc_options_in_force", "1 while this proxy's gRPC server runs with the "
                             "service's options (limits.proxy_max_pending_calls, proxy_max_streams_per_connection); "
                             "0: gRPC's defaults, which cancel bursts (the node was started without the "
                             "service's environment).")
    keys_checked = gauge("proxy_keys_checked", "1 while this proxy checks each caller's API key (args.auth, from "
                         "the node's environment) before it reads the call's request; 0: the node was started without "
                         "it, and the proxy serves callers on loopback only.")
    node_watchers = gauge("proxy_node_watchers", "WatchNodes streams this proxy serves (from one stream of the "
                          "router's; args.proxy.max_node_watchers bounds them, per caller and in all).")


class ModelMetrics(_Group):
    """A model replica's: its queue, its batches and the time each stage took."""

    queue_depth = gauge("queue_depth", "Sequences waiting in the replica's batcher for the model.", REPLICA)
    batch_size = histogram("batch_size", "Sequences per batch run through the model.", COUNTS, REPLICA)
    batch_padded_tokens = histogram("batch_padded_tokens", "Token slots a batch computed: per forward pass, its "
                                    "longest sequence times its sequences.", TOKENS, REPLICA)
    token_slots = counter("token_slots", "Token slots the model computed (padded tokens: per forward pass, its "
                          "longest sequence times its sequences).", REPLICA)
    padding_tokens = counter("padding_tokens", "Token slots spent on padding (padded minus real tokens).", REPLICA)
    stage_seconds = counter("stage_seconds", "Seconds spent per stage (tokenize, queue, forward), exact totals "
                            "beside the histograms.", (*REPLICA, "stage"))
    tokenize_seconds = histogram("tokenize_seconds", "Tokenization time per shard.", SECONDS, REPLICA)
    queue_seconds = histogram("queue_seconds", "Time a shard waited in the batcher before its batch started.",
                              SECONDS, REPLICA)
    forward_seconds = histogram("forward_seconds", "Time one batch took in the model (all its forward passes).",
                                SECONDS, REPLICA)
    sequences_forwarded = counter("sequences_forwarded", "Inputs run through the model's forward pass.", REPLICA)
    settings_not_applied = counter("settings_not_applied", "Counted once as a replica starts without a setting it "
                                   "was given: setting=cpu_pinning (its backend is not OpenVINO), setting=backend "
                                   "(backend auto runs the model with torch: its compiled backend could not compile "
                                   "it or failed the start-up canary or gate), setting=precision (bf16 on torch on a CPU "
                                   "without bf16 units: emulated, slower than fp32).",
                                   (*REPLICA, "setting"))
    sequences_dropped = counter("sequences_dropped", "Queued inputs dropped before tokenization or forward: their "
                                "caller had left (reason=cancelled) or their deadline had passed (reason=deadline).",
                                (*REPLICA, "reason"))


class JobMetrics(_Group):
    """The batch jobs' manager's (batch/manager.py), read from the store each round: the jobs by status and each
    running job's progress (tagged by job id: running jobs are bounded by jobs.max_running_jobs)."""

    jobs = gauge("jobs", "Batch jobs in the store, by status (validating, in_progress, finalizing, cancelling, and "
                 "the final ones until their retention ends).", ("status",))
    job_rows_done = gauge("job_rows_done", "Rows a running job has written (its Ray Data checkpoints' rows).",
                          ("job",))
    job_rows_total = gauge("job_rows_total", "Rows (an OpenAI batch: lines) of a running job's input.", ("job",))
    job_rows_per_second = gauge("job_rows_per_second", "Rows per second a running job has written since its runner "
                                "started.", ("job",))
    runners_started = counter("job_runners_started", "Job runners the manager started: reason=new (a job's first) "
                              "or reason=resumed (its runner was lost: it goes on from its checkpoints).",
                              ("reason",))
    jobs_ended = counter("jobs_ended", "Jobs that reached a final status, by status.", ("status",))
    reservations_released = counter(
        "job_reservations_released", "Ray Data resource requests of killed runners the manager released, by outcome "
        "(released; failed: logged, and the request holds its share of the cluster until it expires).",
        ("outcome",))


class FleetMetrics(_Group):
    """The node recycler's: the nodes it tracks and what it did about faults."""

    nodes = gauge("nodes", "Nodes the recycler tracks, by state (healthy, quarantined, draining, recycled).",
                  ("state",))
    faults = counter("node_faults", "Device faults reported by model replicas, by reason (the check's reason up to "
                     "its first colon).", ("reason",))
    drains_started = counter("node_drains_started", "Recycling actions taken on a node that succeeded, by action "
                             "(drain: Ray accepted the drain; command: it exited 0; none: left to the operator).",
                             ("action",))
    drains_failed = counter("node_drains_failed", "Recycling actions that failed, by action and reason (rejected: "
                            "Ray refused the drain; error: the call raised; exit_status, timeout: the command's); the "
                            "node stays quarantined and the action is tried again (recycler.action_retries).",
                            ("action", "reason"))
    drains_finished = counter("node_drains_finished", "Drained nodes that left the cluster (recycled).")


GROUPS = (RouterMetrics, ProxyMetrics, ModelMetrics, FleetMetrics, JobMetrics)
SPECS = [spec for group in GROUPS for spec in specs_of(group).values()]
