"""The sharding router: the application's ingress, serving EmbedService and the health the proxies relay.

It admits a call (its API key, the service not shutting down, its deadline), checks the request, has its
inputs run on the model's replicas (fanout.py: sorted by length, cut into mini-batches, bounded
concurrency, the caller's remaining time, retried when a replica died) and puts the results back in input
order. Health and the node list come from the recycler's view (fleet_view.py); each call is measured and
spanned from its arrival (call_observer.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import numpy as np
import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from embedding_client.v1 import embedding_pb2 as pb
from embedding_service.config import AppArgs
from embedding_service.observability.logs import service_logger
from embedding_service.observability.metrics import RouterMetrics, keep_gauges_set
from embedding_service.observability.tracing import service_tracer
from embedding_service.router import convert
from embedding_service.wire.auth import Authenticator
from embedding_service.router.call_observer import CallObserver, ObservedCall
from embedding_service.router.catalog import ModelCatalog
from embedding_service.router.fanout import Fanout
from embedding_service.router.fleet_view import SERVING, ServiceView
from embedding_service.router.validation import (
    Job,
    build_job,
    build_rerank_job,
    build_sparse_job,
    check_envelope,
    check_kind,
    check_query_tokens,
    output_shape,
    resolve_model_name,
    top_n,
)
from embedding_service.wire import status
from embedding_service.wire.deadline import Deadline
from embedding_service.wire.node_env import AUTH_MODE_ENV, ray_token_auth
from embedding_service.wire.reasons import Reason, ServiceError

logger = service_logger(__name__)


@dataclass
class Admitted:
    """An admitted call: its record (metrics and span) and when its caller stops waiting."""

    call: ObservedCall
    deadline: Deadline


@dataclass
class _Totals:
    """A whole reply's token counts (by input position) and its shards' queue and inference times."""

    counts: np.ndarray
    queue_ns: int = 0
    inference_ns: int = 0

    @classmethod
    def of(cls, n: int) -> _Totals:
        return cls(np.zeros(n, dtype=np.int64))

    def add(self, shard, result) -> None:
        self.counts[shard.positions] = result.token_counts
        self.queue_ns += result.queue_ns
        self.inference_ns += result.inference_ns

    def stamped(self, response, started_ns: int, call: ObservedCall):
        """The reply with its usage and timing; the call counted as answered."""
        tokens = int(self.counts.sum())
        convert.stamp(response, tokens, self.queue_ns, self.inference_ns)
        response.timing.total_time_ns = time.perf_counter_ns() - started_ns
        call.embedded(len(self.counts), tokens)
        return response


class EmbedRouter:
    async def __init__(self, args: AppArgs, models: dict[str, DeploymentHandle], fleet: DeploymentHandle) -> None:
        self.args = args
        self.fleet = fleet
        self.catalog = ModelCatalog(models)
        self.auth = Authenticator(args.auth)
        if not self.auth.enabled:
            logger.warning("router: %s: only callers on loopback are served",
                           f"{args.auth.api_keys_env} is not set" if self.auth.unset_env
                           else "no API keys configured (args.auth)")
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.view = ServiceView(models, ray.get_runtime_context().get_node_id())
        self.metrics = RouterMetrics()
        self.ray_token_auth = ray_token_auth()
        if not self.ray_token_auth:
            logger.warning("router: Ray runs without token authentication (%s=%s): anyone who reaches its ports can "
                           "run code on the cluster; start every Ray node with %s=token (docs/security.md)",
                           AUTH_MODE_ENV, os.environ.get(AUTH_MODE_ENV, "unset"), AUTH_MODE_ENV)
        self.tracer = service_tracer(args.tracing, "router")
        self.observer = CallObserver(self.metrics, self.tracer)
        self.fanout = Fanout(self.catalog, args.router, self.metrics, self.tracer)
        self._in_flight = 0
        self._calls_changed = asyncio.Event()
        self._reporter = asyncio.create_task(self._report_calls())
        self._follower = asyncio.create_task(self.view.follow(fleet, self.replica_id, self._fleet_changed))
        self._gauges = asyncio.create_task(keep_gauges_set(self._report_health))

    # ---- the recycler's view ---------------------------------------------

    def _fleet_changed(self) -> None:
        self._report_health()  # at once; keep_gauges_set repeats it
        if self.view.shutting_down:
            self._calls_changed.set()

    async def _report_calls(self) -> None:
        """Once the service is shutting down, tells the recycler how many calls are left here (the latest count)."""
        while True:
            await self._calls_changed.wait()
            self._calls_changed.clear()
            try:
                await self.fleet.report_calls.remote(self.replica_id, self._in_flight)
            except Exception:
                logger.exception("router: could not report calls in flight")
                await asyncio.sleep(0.5)
                self._calls_changed.set()

    def _report_health(self) -> None:
        self.metrics.set_health({name: found == SERVING for name, found in self.view.statuses.items()})
        self.metrics.ray_token_auth.set(1 if self.ray_token_auth else 0)

    async def check_health(self) -> None:
        if self.view.own_node_quarantined():
            raise RuntimeError(f"the router's node {self.view.node_id} is quarantined")
        for task in (self._follower, self._reporter, self._gauges):
            if task.done():
                raise RuntimeError(f"the router's task {task.get_coro().__name__} stopped")

    # ---- admission ------------------------------------------------------

    @contextlib.contextmanager
    def _admit(self, method: str, grpc_context, timeout_s: float | None) -> Iterator[Admitted]:
        """Admits an EmbedService call: the caller's key (checked by the proxy already; again here, for a proxy
        whose node lacks args.auth), no shutdown under way; counts it while it runs.

        Its deadline is the service's bound or the caller's (as the proxy passed it), whichever comes first; the
        bound counts from the call's arrival at the proxy when the proxy sent it again.
        """
        metadata = grpc_context.invocation_metadata() if grpc_context is not None else None
        with self.observer.observe(method, metadata) as call:
            if grpc_context is not None:  # None: a handle call from inside the cluster
                self.auth.check(metadata, grpc_context.peer())
            if self.view.shutting_down:
                raise ServiceError(Reason.SHUTTING_DOWN, "the service is shutting down and takes no new calls; retry")
            deadline = Deadline.within(timeout_s, metadata)
            self._in_flight += 1
            try:
                yield Admitted(call, deadline)
            except TimeoutError:
                unavailable = self.view.unavailable(call.model)
                if unavailable is not None:
                    raise unavailable from None
                raise
            finally:
                self._in_flight -= 1
                if self.view.shutting_down:
                    self._calls_changed.set()

    async def _prepare(self, request, max_inputs: int, call: ObservedCall, deadline: Deadline, method: str,
                       kind: str = "embedding", field: str = "inputs", build=build_job) -> Job:
        """The call's job: its model (named, or the default of the method's kind), of the method's kind, within the
        limits and serving."""
        name = resolve_model_name(request.model, self.catalog.names, self.args.default_of(kind), kind)
        call.model = name
        check_kind(name, self.args.model(name).kind, kind, method)
        check_envelope(request, self.args.limits, max_inputs, field)
        refusal = self.view.refusal(name)
        if refusal is not None:
            raise ServiceError(Reason.MODEL_REFUSED, f"model {name!r} is not serving: {refusal}")
        return build(request, await self.catalog.info(name, deadline), self.args.limits)

    async def _rerank_job(self, request, max_inputs: int, call: ObservedCall, deadline: Deadline, method: str) -> Job:
        """A Rerank's or RerankStream's job, its query within max_query_tokens: counted once per call, here, before
        any replica scores a pair (a rerank replica always sends its tokenizer; without one nothing is counted)."""
        job = await self._prepare(request, max_inputs, call, deadline, method, "rerank", "documents", build_rerank_job)
        tokens = await self.catalog.text_tokens(job.model, job.options.query, deadline)
        if tokens is not None:
            check_query_tokens(tokens, job.model, self.args.limits)
        return job

    # ---- EmbedService (names must not collide with grpc.health.v1) --------

    @status.grpc_method
    async def Embed(self, request: pb.EmbedRequest, grpc_context=None) -> pb.EmbedResponse:
        started = time.perf_counter_ns()
        with self._admit("Embed", grpc_context, self.args.limits.request_timeout_s) as admitted:
            call = admitted.call
            job = await self._prepare(request, self.args.limits.max_inputs_per_request, call, admitted.deadline,
                                      "Embed")
            n = len(job.inputs)
            vectors: np.ndarray | None = None
            totals = _Totals.of(n)
            async for shard, result in self.fanout.results(job, admitted.deadline, call):
                if vectors is None:
                    vectors = np.empty((n, result.vectors.shape[1]), dtype=result.vectors.dtype)
                vectors[shard.positions] = result.vectors
                totals.add(shard, result)
            response = pb.EmbedResponse(model=job.model, dimensions=job.dimension)
            convert.fill(response.embeddings, range(n), vectors, totals.counts, job.raw_bytes)
            return totals.stamped(response, started, call)

    @status.grpc_method
    async def EmbedStream(self, request: pb.EmbedStreamRequest, grpc_context=None) -> AsyncIterator[pb.EmbedStreamResponse]:
        with self._admit("EmbedStream", grpc_context, self.args.limits.stream_timeout_s) as admitted:
            call = admitted.call
            job = await self._prepare(request, self.args.limits.max_inputs_per_stream, call, admitted.deadline,
                                      "EmbedStream")
            async for shard, result in self.fanout.results(job, admitted.deadline, call):
                chunk = pb.EmbedStreamResponse(model=job.model, dimensions=job.dimension)
                convert.fill(chunk.embeddings, shard.positions, result.vectors, result.token_counts, job.raw_bytes)
                tokens = int(result.token_counts.sum())
                convert.stamp(chunk, tokens, result.queue_ns, result.inference_ns)
                yield chunk
                call.embedded(len(shard.positions), tokens)

    @status.grpc_method
    async def ListModels(self, request: pb.ListModelsRequest, grpc_context=None) -> pb.ListModelsResponse:
        with self._admit("ListModels", grpc_context, self.args.limits.request_timeout_s) as admitted:
            infos = await asyncio.gather(*(self.catalog.info(name, admitted.deadline) for name in self.catalog.names))
            default = self.args.default_model_name
            return pb.ListModelsResponse(models=[convert.model_message(i, default) for i in infos],
                                         default_model=default, limits=convert.limits_message(self.args.limits))

    @status.grpc_method
    async def GetModel(self, request: pb.GetModelRequest, grpc_context=None) -> pb.GetModelResponse:
        with self._admit("GetModel", grpc_context, self.args.limits.request_timeout_s) as admitted:
            name = resolve_model_name(request.name, self.catalog.names, default="")
            admitted.call.model = name
            info = await self.catalog.info(name, admitted.deadline)
            message = convert.model_message(info, self.args.default_model_name)
            if info.kind != "embedding":  # no vectors to place in int8/uint8 ranges
                return pb.GetModelResponse(model=message)
            dimensions, normalize = output_shape(request, info)
            ranges, sentences = await self.catalog.quantization_ranges(name, dimensions, normalize, admitted.deadline)
            message.quantization.CopyFrom(convert.quantization_message(ranges, dimensions or info.dimension,
                                                                       normalize, sentences))
            return pb.GetModelResponse(model=message)

    @status.grpc_method
    async def Rerank(self, request: pb.RerankRequest, grpc_context=None) -> pb.RerankResponse:
        started = time.perf_counter_ns()
        limits = self.args.limits
        with self._admit("Rerank", grpc_context, limits.request_timeout_s) as admitted:
            call = admitted.call
            job = await self._rerank_job(request, limits.max_documents_per_rerank, call, admitted.deadline, "Rerank")
            n = len(job.inputs)
            keep = top_n(request, n)
            scores = np.empty(n, dtype=np.float32)
            totals = _Totals.of(n)
            async for shard, result in self.fanout.results(job, admitted.deadline, call):
                scores[shard.positions] = result.vectors
                totals.add(shard, result)
            # Highest first, ties in document order (as CrossEncoder.rank's stable sort).
            order = np.argsort(-scores, kind="stable")[:keep]
            response = pb.RerankResponse(model=job.model)
            convert.fill_scores(response.results, order, scores[order], totals.counts[order],
                                request.documents if request.return_documents else None)
            return totals.stamped(response, started, call)

    @status.grpc_method
    async def RerankStream(self, request: pb.RerankStreamRequest,
                           grpc_context=None) -> AsyncIterator[pb.RerankStreamResponse]:
        limits = self.args.limits
        with self._admit("RerankStream", grpc_context, limits.stream_timeout_s) as admitted:
            call = admitted.call
            job = await self._rerank_job(request, limits.max_documents_per_rerank_stream, call, admitted.deadline,
                                         "RerankStream")
            documents = request.documents if request.return_documents else None
            async for shard, result in self.fanout.results(job, admitted.deadline, call):
                chunk = pb.RerankStreamResponse(model=job.model)
                convert.fill_scores(chunk.results, shard.positions, result.vectors, result.token_counts, documents)
                tokens = int(result.token_counts.sum())
                convert.stamp(chunk, tokens, result.queue_ns, result.inference_ns)
                yield chunk
                call.embedded(len(shard.positions), tokens)

    @status.grpc_method
    async def EmbedSparse(self, request: pb.EmbedSparseRequest, grpc_context=None) -> pb.EmbedSparseResponse:
        started = time.perf_counter_ns()
        limits = self.args.limits
        with self._admit("EmbedSparse", grpc_context, limits.request_timeout_s) as admitted:
            call = admitted.call
            job = await self._prepare(request, limits.max_inputs_per_request, call, admitted.deadline, "EmbedSparse",
                                      "sparse", "inputs", build_sparse_job)
            n = len(job.inputs)
            vectors: list = [None] * n
            totals = _Totals.of(n)
            async for shard, result in self.fanout.results(job, admitted.deadline, call):
                for row, position in enumerate(shard.positions):
                    vectors[position] = result.sparse[row]
                totals.add(shard, result)
            response = pb.EmbedSparseResponse(model=job.model, dimensions=job.dimension)
            convert.fill_sparse(response.embeddings, range(n), vectors, totals.counts)
            return totals.stamped(response, started, call)

    # ---- what the proxies serve themselves: WatchNodes and grpc.health.v1 ----

    async def node_updates(self) -> AsyncIterator[pb.WatchNodesResponse]:
        """Every node with its state, reason and replicas: now, then at each change. Each proxy follows this one
        stream and serves WatchNodes itself (proxy/nodes_relay.py), so watchers hold none of this replica's slots."""
        async for message in self.view.changes(self.view.nodes_message):
            yield message

    async def health_updates(self) -> AsyncIterator[dict[str, int]]:
        """The status of every health service name: now, then at each change. Each proxy follows this one
        stream and answers probes and watchers itself, so they hold none of this replica's call slots."""
        async for table in self.view.changes(lambda: dict(self.view.statuses)):
            yield table
