"""The sharding router: the application's ingress, serving EmbedService and the health the proxies relay.

It admits a call (its API key, the service not shutting down, its deadline), checks the request, has its
inputs run on the model's replicas (fanout.py: sorted by length, cut into mini-batches, bounded
concurrency, the caller's remaining time, retried when a replica died) and puts the results back in input
order. Every method that runs on a model's replicas is one entry of router/methods.py's table, run by one
runner for unary calls and one for streams; Tokenize and Detokenize run the model's tokenizer here
(tokenizing.py). Health and the node list come from the recycler's view (fleet_view.py); each call is measured and
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
from embedding_service.router.call_observer import CallObserver, ObservedCall
from embedding_service.router.catalog import ModelCatalog
from embedding_service.router.fanout import Fanout
from embedding_service.router.fleet_view import SERVING, ServiceView
from embedding_service.router.jobs import JobDesk, caller_owner
from embedding_service.router.methods import METHODS, MethodSpec
from embedding_service.router.tokenizing import detokenize_inputs, tokenize_inputs
from embedding_service.router.validation import Job, check_envelope, check_kind, output_shape, resolve_model_name
from embedding_service.wire import status
from embedding_service.wire.auth import Authenticator
from embedding_service.wire.deadline import Deadline
from embedding_service.wire.node_env import AUTH_MODE_ENV, ray_token_auth
from embedding_service.wire.reasons import Reason, ServiceError

logger = service_logger(__name__)


@dataclass
class Admitted:
    """An admitted call: its record (metrics and span) and when its caller stops waiting."""

    call: ObservedCall
    deadline: Deadline
    metadata: list | None = None  # the call's gRPC metadata (None: a handle call from inside the cluster)


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
    async def __init__(self, args: AppArgs, models: dict[str, DeploymentHandle], fleet: DeploymentHandle,
                       jobs_manager: DeploymentHandle | None = None) -> None:
        """`jobs_manager` is bound only so Serve deploys it with the application: nothing calls it (jobs.py)."""
        self.args = args
        self.jobs = JobDesk(args)
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
                yield Admitted(call, deadline, list(metadata) if metadata is not None else None)
            except TimeoutError:
                unavailable = self.view.unavailable(call.model)
                if unavailable is not None:
                    raise unavailable from None
                raise
            finally:
                self._in_flight -= 1
                if self.view.shutting_down:
                    self._calls_changed.set()

    async def _job(self, spec: MethodSpec, request, admitted: Admitted) -> Job:
        """The call's job: its model (named, or the default of the method's kind), of the method's kind, within the
        limits and serving, and past the method's own checks."""
        name = resolve_model_name(request.model, self.catalog.names, self.args.default_of(spec.kind), spec.kind)
        admitted.call.model = name
        check_kind(name, self.args.model(name).kind, spec.kind, spec.name)
        check_envelope(request, self.args.limits, spec.max_inputs(self.args.limits), spec.field)
        refusal = self.view.refusal(name)
        if refusal is not None:
            raise ServiceError(Reason.MODEL_REFUSED, f"model {name!r} is not serving: {refusal}")
        job = spec.build(request, await self.catalog.info(name, admitted.deadline), self.args.limits)
        if spec.check is not None:
            await spec.check(self.catalog, job, self.args.limits, admitted.deadline)
        return job

    # ---- the two runners of every method on a model's replicas (router/methods.py) ----

    async def _unary(self, spec: MethodSpec, request, grpc_context):
        """The job's shards run, their results placed in one reply, stamped with usage and timing."""
        started = time.perf_counter_ns()
        with self._admit(spec.name, grpc_context, self.args.limits.request_timeout_s) as admitted:
            job = await self._job(spec, request, admitted)
            reply = spec.reply(job, request)
            totals = _Totals.of(len(job.inputs))
            async for shard, result in self.fanout.results(job, admitted.deadline, admitted.call):
                reply.add(shard, result)
                totals.add(shard, result)
            return totals.stamped(reply.message(totals.counts), started, admitted.call)

    async def _stream(self, spec: MethodSpec, request, grpc_context) -> AsyncIterator:
        """A chunk per finished shard, in completion order, each with its usage and timing."""
        with self._admit(spec.name, grpc_context, self.args.limits.stream_timeout_s) as admitted:
            call = admitted.call
            job = await self._job(spec, request, admitted)
            async for shard, result in self.fanout.results(job, admitted.deadline, call):
                chunk = spec.chunk(job, request, shard, result)
                tokens = int(result.token_counts.sum())
                convert.stamp(chunk, tokens, result.queue_ns, result.inference_ns)
                yield chunk
                call.embedded(len(shard.positions), tokens)

    # ---- EmbedService (names must not collide with grpc.health.v1) --------

    @status.grpc_method
    async def Embed(self, request: pb.EmbedRequest, grpc_context=None) -> pb.EmbedResponse:
        return await self._unary(METHODS["Embed"], request, grpc_context)

    @status.grpc_method
    async def EmbedStream(self, request: pb.EmbedStreamRequest, grpc_context=None) -> AsyncIterator[pb.EmbedStreamResponse]:
        async for chunk in self._stream(METHODS["EmbedStream"], request, grpc_context):
            yield chunk

    @status.grpc_method
    async def Rerank(self, request: pb.RerankRequest, grpc_context=None) -> pb.RerankResponse:
        return await self._unary(METHODS["Rerank"], request, grpc_context)

    @status.grpc_method
    async def RerankStream(self, request: pb.RerankStreamRequest,
                           grpc_context=None) -> AsyncIterator[pb.RerankStreamResponse]:
        async for chunk in self._stream(METHODS["RerankStream"], request, grpc_context):
            yield chunk

    @status.grpc_method
    async def EmbedSparse(self, request: pb.EmbedSparseRequest, grpc_context=None) -> pb.EmbedSparseResponse:
        return await self._unary(METHODS["EmbedSparse"], request, grpc_context)

    @status.grpc_method
    async def Classify(self, request: pb.ClassifyRequest, grpc_context=None) -> pb.ClassifyResponse:
        return await self._unary(METHODS["Classify"], request, grpc_context)

    @status.grpc_method
    async def ClassifyStream(self, request: pb.ClassifyStreamRequest,
                             grpc_context=None) -> AsyncIterator[pb.ClassifyStreamResponse]:
        async for chunk in self._stream(METHODS["ClassifyStream"], request, grpc_context):
            yield chunk

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
    async def Tokenize(self, request: pb.TokenizeRequest, grpc_context=None) -> pb.TokenizeResponse:
        """Any served model's tokenizer, run here (router/tokenizing.py)."""
        limits = self.args.limits
        with self._admit("Tokenize", grpc_context, limits.request_timeout_s) as admitted:
            name = resolve_model_name(request.model, self.catalog.names, self.args.default_model_name)
            admitted.call.model = name
            check_envelope(request, limits, limits.max_inputs_per_request)
            texts = tokenize_inputs(request, limits)
            tokenizer = await self.catalog.tokenizer(name, admitted.deadline)
            special = request.add_special_tokens if request.HasField("add_special_tokens") else True
            tokenized = await asyncio.to_thread(tokenizer.tokenize, texts, special, request.return_tokens,
                                                request.return_offsets)
            info = await self.catalog.info(name, admitted.deadline)
            response = pb.TokenizeResponse(model=name, inputs=tokenized, max_sequence_length=info.max_sequence_length)
            tokens = sum(len(t.ids) for t in tokenized)
            response.usage.prompt_tokens = response.usage.total_tokens = tokens
            return response

    @status.grpc_method
    async def Detokenize(self, request: pb.DetokenizeRequest, grpc_context=None) -> pb.DetokenizeResponse:
        limits = self.args.limits
        with self._admit("Detokenize", grpc_context, limits.request_timeout_s) as admitted:
            name = resolve_model_name(request.model, self.catalog.names, self.args.default_model_name)
            admitted.call.model = name
            check_envelope(request, limits, limits.max_inputs_per_request)
            tokenizer = await self.catalog.tokenizer(name, admitted.deadline)
            sequences = detokenize_inputs(request, limits, tokenizer.vocab_size, name)
            texts = await asyncio.to_thread(tokenizer.detokenize, sequences, request.skip_special_tokens)
            return pb.DetokenizeResponse(model=name, texts=texts)

    # ---- batch jobs (router/jobs.py: the store, never a Ray call) ----------

    @status.grpc_method
    async def CreateJob(self, request: pb.CreateJobRequest, grpc_context=None) -> pb.CreateJobResponse:
        with self._admit("CreateJob", grpc_context, self.args.limits.request_timeout_s) as admitted:
            owner = caller_owner(admitted.metadata)
            job = await self.jobs.create(request, owner, self.catalog.names,
                                         lambda name: self.catalog.info(name, admitted.deadline))
            admitted.call.model = job.model
            return pb.CreateJobResponse(job=job)

    @status.grpc_method
    async def GetJob(self, request: pb.GetJobRequest, grpc_context=None) -> pb.GetJobResponse:
        with self._admit("GetJob", grpc_context, self.args.limits.request_timeout_s) as admitted:
            return pb.GetJobResponse(job=await self.jobs.get(request.id, caller_owner(admitted.metadata)))

    @status.grpc_method
    async def ListJobs(self, request: pb.ListJobsRequest, grpc_context=None) -> pb.ListJobsResponse:
        with self._admit("ListJobs", grpc_context, self.args.limits.request_timeout_s) as admitted:
            return await self.jobs.list(request, caller_owner(admitted.metadata))

    @status.grpc_method
    async def CancelJob(self, request: pb.CancelJobRequest, grpc_context=None) -> pb.CancelJobResponse:
        with self._admit("CancelJob", grpc_context, self.args.limits.request_timeout_s) as admitted:
            return pb.CancelJobResponse(job=await self.jobs.cancel(request.id, caller_owner(admitted.metadata)))

    @status.grpc_method
    async def WatchJob(self, request: pb.WatchJobRequest, grpc_context=None) -> AsyncIterator[pb.WatchJobResponse]:
        with self._admit("WatchJob", grpc_context, self.args.limits.stream_timeout_s) as admitted:
            async for job in self.jobs.watch(request.id, caller_owner(admitted.metadata)):
                yield pb.WatchJobResponse(job=job)

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
