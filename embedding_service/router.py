"""The sharding router: the application's ingress, serving EmbedService and the health the proxies relay.

It admits a call (its API key, the service not shutting down, its deadline),
checks the request, cuts its inputs (sorted by length) into mini-batches, sends
them to the model deployment with bounded concurrency and the caller's
remaining time, retries those whose replica died, and puts the results back in
input order. A call of one mini-batch may travel with other such calls in one
handle call (coalescing.py). Health and the node list come from the recycler's view (health.py);
each call is measured and spanned from its arrival (call_observer.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator

import numpy as np
import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from embedding_client.v1 import embedding_pb2 as pb
from embedding_service import errors, node_routing
from embedding_service.auth import Authenticator
from embedding_service.call_observer import CallObserver, ObservedCall
from embedding_service.coalescing import Coalescer, shard_part
from embedding_service.config import AppArgs
from embedding_service.error_reasons import Reason, ServiceError
from embedding_service.health import SERVING, ServiceView
from embedding_service.metrics import RouterMetrics, keep_gauges_set
from embedding_service.model_deployment import ReplicaFaulted, ReplicaRefused
from embedding_service.proxy_ingress import TIMEOUT_KEY
from embedding_service.recycler import LONG_POLL_S
from embedding_service.shards import EmbedOptions, Input, ModelInfo, Shard, ShardRequest, ShardResult, plan_shards
from embedding_service.token_lengths import TokenLengths
from embedding_service.tracing import service_tracer
from embedding_service.validation import Job, build_job, check_envelope, output_shape, resolve_model_name, too_long
from embedding_service.verification import Verification

logger = logging.getLogger("ray.serve")

# Failures that mean "the replica went away or its device failed", not "the request
# is bad": the shard is sent again, to a live replica.
_RETRYABLE = (
    ray.exceptions.RayActorError,
    ray.exceptions.ActorUnavailableError,
    ray.exceptions.WorkerCrashedError,
    ray.exceptions.NodeDiedError,
    ReplicaFaulted,
    ReplicaRefused,
)
_REPLICA_OWN = (ReplicaFaulted, ReplicaRefused)


def _retryable(exc: BaseException) -> bool:
    # A replica's own ReplicaFaulted / ReplicaRefused reaches the caller wrapped in a RayTaskError.
    return isinstance(exc, _RETRYABLE) or isinstance(getattr(exc, "cause", None), _REPLICA_OWN)


def _retry_cause(exc: BaseException) -> str:
    """A bounded label: the class of the failure (ReplicaFaulted inside Ray's wrapper)."""
    cause = getattr(exc, "cause", None)
    return type(cause if isinstance(cause, _REPLICA_OWN) else exc).__name__


def _caller_timeout_s(grpc_context) -> float | None:
    """The caller's remaining time, as Serve's proxy saw it (proxy_ingress.py)."""
    for key, value in grpc_context.invocation_metadata():
        if key == TIMEOUT_KEY:
            try:
                return max(0.0, int(value) / 1000)
            except ValueError:
                return None
    return None


def _verification_fields(verification: Verification | None) -> dict:
    if verification is None:
        return {}
    v = verification
    accuracy = pb.ModelAccuracy(
        reference=v.reference, canary_min_cosine=v.canary_min_cosine,
        canary_threshold=v.canary_threshold, min_mean_cosine=v.min_mean_cosine, min_recall_at_10=v.min_recall_at_10)
    if v.accuracy is not None:
        accuracy.gate_sentences = v.accuracy.sentences
        accuracy.mean_cosine = v.accuracy.mean_cosine
        accuracy.recall_at_10 = v.accuracy.recall_at_10
    return {"precision": v.precision, "accuracy": accuracy, "refused": v.refused or ""}


class EmbedRouter:
    async def __init__(self, args: AppArgs, models: dict[str, DeploymentHandle], recycler: DeploymentHandle) -> None:
        self.args = args
        self.models = models
        self.recycler = recycler
        self._infos: dict[str, ModelInfo] = {}
        self._counters: dict[str, TokenLengths | None] = {}  # per model, from its replica's tokenizer
        self._coalescers: dict[tuple[str, EmbedOptions], Coalescer] = {}
        self._ranges: dict[tuple[str, int | None, bool], tuple[np.ndarray, int]] = {}
        self.auth = Authenticator(args.auth)
        if not self.auth.enabled:
            logger.warning("router: %s: only callers on loopback are served",
                           f"{args.auth.api_keys_env} is not set" if self.auth.unset_env
                           else "no API keys configured (args.auth)")
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.view = ServiceView(models, ray.get_runtime_context().get_node_id())
        self.metrics = RouterMetrics()
        self.tracer = service_tracer(args.tracing, "router")
        self.observer = CallObserver(self.metrics, self.tracer)
        self._in_flight = 0
        self._calls_changed = asyncio.Event()
        self._reporter = asyncio.create_task(self._report_calls())
        self._follower = asyncio.create_task(self._follow_recycler())
        self._gauges = asyncio.create_task(keep_gauges_set(self._report_health))

    # ---- the recycler's view ---------------------------------------------

    async def _follow_recycler(self) -> None:
        """Long-polls the recycler; keeps routing off quarantined nodes and updates health."""
        version = -1
        while True:
            try:
                snapshot = await self.recycler.wait_for_change.remote(version, LONG_POLL_S, self.replica_id)
            except Exception:
                logger.exception("router: recycler unreachable; retrying")
                await asyncio.sleep(1.0)
                continue
            if snapshot.version != version:
                version = snapshot.version
                node_routing.set_quarantined(snapshot.unhealthy())
                node_routing.set_refused(snapshot.refused_replicas())
                await self.view.update(snapshot)
                self._report_health()  # at once; keep_gauges_set repeats it
                if snapshot.shutting_down:
                    self._calls_changed.set()

    async def _report_calls(self) -> None:
        """Once the service is shutting down, tells the recycler how many calls are left here (the latest count)."""
        while True:
            await self._calls_changed.wait()
            self._calls_changed.clear()
            try:
                await self.recycler.report_calls.remote(self.replica_id, self._in_flight)
            except Exception:
                logger.exception("router: could not report calls in flight")
                await asyncio.sleep(0.5)
                self._calls_changed.set()

    def _report_health(self) -> None:
        self.metrics.set_health({name: status == SERVING for name, status in self.view.statuses.items()})

    async def check_health(self) -> None:
        if self.view.own_node_quarantined():
            raise RuntimeError(f"the router's node {self.view.node_id} is quarantined")
        for task in (self._follower, self._reporter, self._gauges):
            if task.done():
                raise RuntimeError(f"the router's task {task.get_coro().__name__} stopped")

    # ---- admission ------------------------------------------------------

    @contextlib.contextmanager
    def _admit(self, method: str, grpc_context, timeout_s: float | None, counted: bool = True) -> Iterator[ObservedCall]:
        """Admits an EmbedService call: the caller's key, no shutdown under way; counts it while it runs.

        Yields the call's record (metrics and span) with its deadline (event-loop
        time): the service's bound or the caller's, whichever is first.
        """
        metadata = grpc_context.invocation_metadata() if grpc_context is not None else None
        with self.observer.observe(method, metadata) as call:
            caller_s = None
            if grpc_context is not None:  # None: a handle call from inside the cluster
                self.auth.check(metadata, grpc_context.peer())
                caller_s = _caller_timeout_s(grpc_context)
            if self.view.shutting_down:
                raise ServiceError(Reason.SHUTTING_DOWN, "the service is shutting down and takes no new calls; retry")
            bounds = [t for t in (timeout_s, caller_s) if t is not None]
            call.deadline = asyncio.get_running_loop().time() + min(bounds) if bounds else None
            if counted:
                self._in_flight += 1
            try:
                yield call
            finally:
                if counted:
                    self._in_flight -= 1
                    if self.view.shutting_down:
                        self._calls_changed.set()

    # ---- model metadata -------------------------------------------------

    async def _info(self, name: str) -> ModelInfo:
        if name not in self._infos:
            self._infos[name] = await self.models[name].describe.remote()
        return self._infos[name]

    async def _token_lengths(self, model: str, inputs: list[Input]) -> np.ndarray | None:
        """Each input's tokens by the model's tokenizer (in a thread: a big call must not hold up the
        event loop), or None when the replica did not send its tokenizer."""
        if model not in self._counters:
            info = await self._info(model)
            self._counters[model] = (TokenLengths(info.tokenizer_json, info.max_sequence_length)
                                     if info.tokenizer_json else None)
        counter = self._counters[model]
        return None if counter is None else await asyncio.to_thread(counter.of, inputs)

    def _model_message(self, info: ModelInfo) -> pb.Model:
        return pb.Model(
            name=info.name,
            dimension=info.dimension,
            max_sequence_length=info.max_sequence_length,
            prompts=info.prompts,
            device=info.device,
            backend=info.backend,
            vocab_size=info.vocab_size,
            is_default=info.name == self.args.default_model_name,
            source=info.source,
            long_inputs=None if info.windows is None else pb.LongInputWindows(
                window_tokens=info.windows.window_tokens, overlap_tokens=info.windows.overlap_tokens,
                max_windows=info.windows.max_windows),
            **_verification_fields(info.verification),
        )

    # ---- the work -------------------------------------------------------

    async def _prepare(self, request, max_inputs: int, call: ObservedCall) -> Job:
        name = resolve_model_name(request.model, list(self.models), self.args.default_model_name)
        call.model = name
        check_envelope(request, self.args.limits, max_inputs)
        refusal = self.view.refusal(name)
        if refusal is not None:
            raise ServiceError(Reason.MODEL_REFUSED, f"model {name!r} is not serving: {refusal}")
        return build_job(request, await self._info(name), self.args.limits)

    def _coalescer(self, model: str, options: EmbedOptions) -> Coalescer:
        key = (model, options)
        if key not in self._coalescers:
            handle = self.models[model]
            m = self.metrics
            self._coalescers[key] = Coalescer(
                lambda inputs, deadline: self._call_shard(handle, inputs, model, options, deadline),
                max_inputs=self.args.router.shard_size, max_in_flight=self.args.router.coalesce_max_in_flight,
                split=shard_part,
                on_drop=lambda n, reason: m.router_inputs_dropped.inc(n, tags={"model": model, "reason": reason}),
                on_send=lambda callers: m.coalesced_callers.observe(callers, tags={"model": model}))
        return self._coalescers[key]

    async def _call_shard(self, handle: DeploymentHandle, inputs: list[Input], model: str, options: EmbedOptions,
                          deadline: float | None) -> ShardResult:
        settings = self.args.router
        loop = asyncio.get_running_loop()
        with self.tracer.span("shard", kind="CLIENT", attributes={"embedding.model": model,
                                                                  "embedding.inputs": len(inputs)}) as span:
            for attempt in range(settings.shard_retries + 1):
                timeout_s = None if deadline is None else deadline - loop.time()
                request = ShardRequest(inputs, options, timeout_s=timeout_s, trace_context=self.tracer.inject())
                response = handle.embed.remote(request)
                try:
                    result = await response
                    if span is not None:
                        span.set_attribute("embedding.attempts", attempt + 1)
                    return result
                except asyncio.CancelledError:
                    response.cancel()  # the replica drops the shard if it has not run it yet
                    raise
                except Exception as exc:
                    if not _retryable(exc):
                        raise
                    if attempt == settings.shard_retries:
                        raise ServiceError(
                            Reason.MODEL_UNAVAILABLE, "model replicas kept failing for this request; retry shortly"
                        ) from exc
                    cause = _retry_cause(exc)
                    self.metrics.shard_retries.inc(tags={"model": model, "cause": cause})
                    logger.warning("shard of %d inputs failed (%s); retrying", len(inputs), cause)
                    await asyncio.sleep(settings.retry_backoff_s * (2**attempt))
        raise AssertionError("unreachable")

    async def _shard_results(self, job: Job, call: ObservedCall) -> AsyncIterator[tuple[Shard, ShardResult]]:
        """Runs every shard, yielding each as it finishes; fails fast on the first error or at the deadline."""
        loop = asyncio.get_running_loop()
        deadline = call.deadline
        handle = self.models[job.model]
        limit = asyncio.Semaphore(self.args.router.max_concurrent_shards)

        lengths = None
        if len(job.inputs) > self.args.router.shard_size and self.args.router.shard_by_tokens:
            lengths = await self._token_lengths(job.model, job.inputs)
        shards = plan_shards(job.inputs, self.args.router.shard_size, lengths)
        coalesce = len(shards) == 1 and self.args.router.coalesce_max_in_flight > 0

        async def run(shard: Shard) -> tuple[Shard, ShardResult]:
            inputs = [job.inputs[p] for p in shard.positions]
            if coalesce:
                result = await self._coalescer(job.model, job.options).submit(inputs, deadline)
            else:
                async with limit:
                    result = await self._call_shard(handle, inputs, job.model, job.options, deadline)
            if result.too_long:
                index = int(shard.positions[result.too_long[0]])
                raise too_long(index, int(result.token_counts[result.too_long[0]]), await self._info(job.model),
                               job.options.truncation)
            return shard, result

        call.planned(len(shards))
        tasks = [asyncio.ensure_future(run(s)) for s in shards]
        try:
            for next_done in asyncio.as_completed(tasks):
                done = await asyncio.wait_for(next_done, max(0.0, deadline - loop.time()))
                call.shard_done()
                yield done
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    @staticmethod
    def _fill(embeddings, positions, vectors: np.ndarray, counts: np.ndarray, raw: bool) -> None:
        packed = vectors.dtype in (np.int8, np.uint8)  # a compact type's bytes (quantization.py)
        for row, pos in enumerate(positions):
            vec = vectors[row]
            if packed:
                embeddings.add(index=int(pos), packed=vec.tobytes(), tokens=int(counts[row]))
            elif raw:
                embeddings.add(index=int(pos), float32_le=vec.astype("<f4", copy=False).tobytes(), tokens=int(counts[row]))
            else:
                embeddings.add(index=int(pos), values=vec.tolist(), tokens=int(counts[row]))

    @staticmethod
    def _stamp(message, tokens: int, queue_ns: int, inference_ns: int) -> None:
        message.usage.prompt_tokens = tokens
        message.usage.total_tokens = tokens
        message.timing.queue_time_ns = queue_ns
        message.timing.inference_time_ns = inference_ns

    # ---- EmbedService (names must not collide with grpc.health.v1) --------

    @errors.grpc_method
    async def Embed(self, request: pb.EmbedRequest, grpc_context=None) -> pb.EmbedResponse:
        started = time.perf_counter_ns()
        with self._admit("Embed", grpc_context, self.args.limits.request_timeout_s) as call:
            job = await self._prepare(request, self.args.limits.max_inputs_per_request, call)
            n = len(job.inputs)
            vectors: np.ndarray | None = None
            counts = np.zeros(n, dtype=np.int64)
            queue_ns = inference_ns = 0
            async for shard, result in self._shard_results(job, call):
                if vectors is None:
                    vectors = np.empty((n, result.vectors.shape[1]), dtype=result.vectors.dtype)
                vectors[shard.positions] = result.vectors
                counts[shard.positions] = result.token_counts
                queue_ns += result.queue_ns
                inference_ns += result.inference_ns
            response = pb.EmbedResponse(model=job.model, dimensions=job.dimension)
            self._fill(response.embeddings, range(n), vectors, counts, job.raw_bytes)
            tokens = int(counts.sum())
            self._stamp(response, tokens, queue_ns, inference_ns)
            response.timing.total_time_ns = time.perf_counter_ns() - started
            call.embedded(n, tokens)
            return response

    @errors.grpc_method
    async def EmbedStream(self, request: pb.EmbedStreamRequest, grpc_context=None) -> AsyncIterator[pb.EmbedStreamResponse]:
        with self._admit("EmbedStream", grpc_context, self.args.limits.stream_timeout_s) as call:
            job = await self._prepare(request, self.args.limits.max_inputs_per_stream, call)
            async for shard, result in self._shard_results(job, call):
                chunk = pb.EmbedStreamResponse(model=job.model, dimensions=job.dimension)
                self._fill(chunk.embeddings, shard.positions, result.vectors, result.token_counts, job.raw_bytes)
                tokens = int(result.token_counts.sum())
                self._stamp(chunk, tokens, result.queue_ns, result.inference_ns)
                yield chunk
                call.embedded(len(shard.positions), tokens)

    @errors.grpc_method
    async def ListModels(self, request: pb.ListModelsRequest, grpc_context=None) -> pb.ListModelsResponse:
        with self._admit("ListModels", grpc_context, self.args.limits.request_timeout_s):
            infos = await asyncio.gather(*(self._info(name) for name in self.models))
            lim = self.args.limits
            limits = pb.ServiceLimits(max_inputs_per_request=lim.max_inputs_per_request,
                                      max_inputs_per_stream=lim.max_inputs_per_stream,
                                      max_chars_per_input=lim.max_chars_per_input,
                                      max_token_ids_per_input=lim.max_token_ids_per_input,
                                      max_request_bytes=lim.max_request_bytes)
            return pb.ListModelsResponse(models=[self._model_message(i) for i in infos],
                                         default_model=self.args.default_model_name, limits=limits)

    @errors.grpc_method
    async def GetModel(self, request: pb.GetModelRequest, grpc_context=None) -> pb.GetModelResponse:
        with self._admit("GetModel", grpc_context, self.args.limits.request_timeout_s) as call:
            name = resolve_model_name(request.name, list(self.models), default="")
            call.model = name
            info = await self._info(name)
            dimensions, normalize = output_shape(request, info)
            message = self._model_message(info)
            ranges, sentences = await self._quantization_ranges(name, dimensions, normalize)
            message.quantization.CopyFrom(pb.QuantizationRanges(
                dimensions=dimensions or info.dimension, normalized=normalize, min=ranges[0].tolist(),
                max=ranges[1].tolist(), calibration_sentences=sentences))
            return pb.GetModelResponse(model=message)

    async def _quantization_ranges(self, model: str, dimensions: int | None, normalize: bool) -> tuple[np.ndarray, int]:
        """The ranges the model's replicas place int8/uint8 vectors of this shape in (the same on every replica:
        taken over the model's calibration vectors)."""
        key = (model, dimensions, normalize)
        if key not in self._ranges:
            try:
                self._ranges[key] = await self.models[model].quantization_ranges.remote(dimensions, normalize)
            except Exception as exc:
                if _retryable(exc):
                    raise ServiceError(Reason.MODEL_UNAVAILABLE, "no model replica answered; retry shortly") from exc
                raise
        return self._ranges[key]

    @errors.grpc_method
    async def WatchNodes(self, request: pb.WatchNodesRequest, grpc_context=None) -> AsyncIterator[pb.WatchNodesResponse]:
        """Every node with its state, reason and replicas: now, then at each change."""
        with self._admit("WatchNodes", grpc_context, timeout_s=None, counted=False):
            async for message in self.view.changes(self.view.nodes_message):
                yield message

    # ---- grpc.health.v1, as the proxies serve it (health_relay.py) ----------

    async def health_updates(self) -> AsyncIterator[dict[str, int]]:
        """The status of every health service name: now, then at each change. Each proxy follows this one
        stream and answers probes and watchers itself, so they hold none of this replica's call slots."""
        async for table in self.view.changes(lambda: dict(self.view.statuses)):
            yield table
