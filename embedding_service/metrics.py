"""The service's own metrics, defined once, through Ray Serve's metrics API.

They appear on Ray's per-node metrics endpoint beside Serve's `ray_serve_*`
metrics: Ray adds the `ray_` prefix (counters also get `_total`) and, inside a
replica, Serve adds the deployment, replica and application tags. Every name
starts with `embedding_`. Tags stay bounded: model names, backends, gRPC code
names, reason names, node states, never request data. The README's Monitoring
section lists them for operators (a test keeps it in step with this module).

Ray exports a histogram's `_sum` rebuilt from its bucket midpoints (its `_count`
and buckets are exact), so every total that matters also has an exact counter:
inputs, tokens, sequences forwarded, token slots, padding, seconds per stage.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

from ray.serve import metrics

PREFIX = "embedding_"
# The model label of a call that failed before its model was known (e.g. an unknown name).
NO_MODEL = "(none)"
# The health label of the whole server (grpc.health.v1 service "").
OVERALL = "(overall)"

SECONDS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300]
COUNTS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 16384, 65536]
TOKENS = [16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304]
# Ray forgets a gauge's value unless it is set again within two report intervals (each
# at least 1 s), so every gauge here is set again this often, changed or not.
GAUGE_REFRESH_S = 1.0


async def keep_gauges_set(report: Callable[[], None]) -> None:
    """Calls `report` (which sets gauges) now and every GAUGE_REFRESH_S, for the life of the replica."""
    while True:
        report()
        await asyncio.sleep(GAUGE_REFRESH_S)


def _counter(name: str, description: str, tags: Iterable[str], defaults: dict[str, str]) -> metrics.Counter:
    metric = metrics.Counter(PREFIX + name, description=description, tag_keys=tuple(tags))
    metric.set_default_tags(dict(defaults))  # a copy: Serve adds its tags into the dict
    return metric


def _gauge(name: str, description: str, tags: Iterable[str], defaults: dict[str, str]) -> metrics.Gauge:
    metric = metrics.Gauge(PREFIX + name, description=description, tag_keys=tuple(tags))
    metric.set_default_tags(dict(defaults))
    return metric


def _histogram(name: str, description: str, boundaries: list[float], tags: Iterable[str],
               defaults: dict[str, str]) -> metrics.Histogram:
    metric = metrics.Histogram(PREFIX + name, description=description, boundaries=boundaries, tag_keys=tuple(tags))
    metric.set_default_tags(dict(defaults))
    return metric


class RouterMetrics:
    """The router's: calls as callers see them, and how they were cut into shards."""

    def __init__(self) -> None:
        call = ("method", "model")
        self.requests = _counter("requests", "EmbedService calls that reached a router, by method, model and final "
                                 "gRPC code (OK included).", ("method", "model", "code"), {})
        self.request_seconds = _histogram("request_seconds", "Time from a call's arrival at the router to its "
                                          "last byte, whatever the outcome.", SECONDS, call, {})
        self.request_inputs = _histogram("request_inputs", "Inputs per successful Embed/EmbedStream call.",
                                         COUNTS, call, {})
        self.request_tokens = _histogram("request_tokens", "Tokens (special tokens included) per successful "
                                         "Embed/EmbedStream call.", TOKENS, call, {})
        self.first_shard_seconds = _histogram("request_first_shard_seconds", "Time from a call's arrival to its "
                                              "first shard's vectors back (a stream's first chunk).", SECONDS, call, {})
        self.request_shards = _histogram("request_shards", "Shards (mini-batches) a call was cut into.", COUNTS,
                                         ("model",), {})
        self.shard_retries = _counter("shard_retries", "Shards sent again because their replica died or its "
                                      "device failed, by cause (the error's class).", ("model", "cause"), {})
        self.coalesced_callers = _histogram("coalesced_callers", "Calls carried by one merged handle call to the "
                                            "model (coalescing.py; 1: a call that went alone).", COUNTS, ("model",), {})
        self.router_inputs_dropped = _counter("router_inputs_dropped", "Inputs of calls dropped while they waited in "
                                              "the router to be coalesced: caller gone (reason=cancelled) or "
                                              "deadline passed (reason=deadline).", ("model", "reason"), {})
        self.inputs = _counter("inputs", "Inputs embedded and returned to callers.", ("model",), {})
        self.tokens = _counter("tokens", "Tokens embedded and returned to callers (special tokens included).",
                               ("model",), {})
        self.health_serving = _gauge("health_serving", "1 while the grpc.health.v1 service is SERVING, 0 otherwise; "
                                     f"service is a model name or {OVERALL} for the whole server.", ("service",), {})

    def set_health(self, statuses: dict[str, bool]) -> None:
        for service, serving in statuses.items():
            self.health_serving.set(1 if serving else 0, tags={"service": service or OVERALL})


class ProxyMetrics:
    """Serve's gRPC proxy (proxy_ingress.py): calls it answered itself, before any router."""

    def __init__(self) -> None:
        self.refusals = _counter("proxy_refusals", "Calls answered in Serve's gRPC proxy without a router's "
                                 "answer (malformed bytes, Serve's queues full, no router), by method, gRPC code and "
                                 "reason.", ("method", "code", "reason"), {})


class ModelMetrics:
    """A model replica's: its queue, its batches and the time each stage took."""

    def __init__(self, model: str, backend: str) -> None:
        tags = ("model", "backend")
        d = {"model": model, "backend": backend}
        self.queue_depth = _gauge("queue_depth", "Sequences waiting in the replica's batcher for the model.", tags, d)
        self.batch_size = _histogram("batch_size", "Sequences per batch run through the model.", COUNTS, tags, d)
        self.batch_padded_tokens = _histogram("batch_padded_tokens", "Token slots a batch computed: per forward "
                                              "pass, its longest sequence times its sequences.", TOKENS, tags, d)
        self.token_slots = _counter("token_slots", "Token slots the model computed (padded tokens: per forward "
                                    "pass, its longest sequence times its sequences).", tags, d)
        self.padding_tokens = _counter("padding_tokens", "Token slots spent on padding (padded minus real tokens).",
                                       tags, d)
        self.stage_seconds = _counter("stage_seconds", "Seconds spent per stage (tokenize, queue, forward), exact "
                                      "totals beside the histograms.", (*tags, "stage"), d)
        self.tokenize_seconds = _histogram("tokenize_seconds", "Tokenization time per shard.", SECONDS, tags, d)
        self.queue_seconds = _histogram("queue_seconds", "Time a shard waited in the batcher before its batch "
                                        "started.", SECONDS, tags, d)
        self.forward_seconds = _histogram("forward_seconds", "Time one batch took in the model (all its forward "
                                          "passes).", SECONDS, tags, d)
        self.sequences_forwarded = _counter("sequences_forwarded", "Inputs run through the model's forward pass.",
                                            tags, d)
        self.sequences_dropped = _counter("sequences_dropped", "Queued inputs dropped before tokenization or forward: "
                                          "their caller had left (reason=cancelled) or their deadline had passed "
                                          "(reason=deadline).", (*tags, "reason"), d)


class RecyclerMetrics:
    """The node recycler's: the nodes it tracks and what it did about faults."""

    def __init__(self) -> None:
        self.nodes = _gauge("nodes", "Nodes the recycler tracks, by state (healthy, quarantined, draining, "
                            "recycled).", ("state",), {})
        self.faults = _counter("node_faults", "Device faults reported by model replicas, by reason (the check's "
                               "reason up to its first colon).", ("reason",), {})
        self.drains_started = _counter("node_drains_started", "Nodes the recycler acted on, by action (drain, "
                                       "command, none).", ("action",), {})
        self.drains_finished = _counter("node_drains_finished", "Drained nodes that left the cluster (recycled).",
                                        (), {})
