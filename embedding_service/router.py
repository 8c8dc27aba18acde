"""The sharding router: the application's ingress, serving EmbedService.

It validates a request, cuts its inputs (sorted by length) into mini-batches,
sends them to the model deployment with bounded concurrency, retries those
whose replica died, and puts the results back in input order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator

import numpy as np
import ray
from ray.serve.handle import DeploymentHandle

from grpc_health.v1 import health_pb2

from embedding_service import errors, node_routing
from embedding_service.config import AppArgs
from embedding_service.model_deployment import ReplicaFaulted
from embedding_service.node_state import NodeState, Snapshot
from embedding_service.shards import ModelInfo, Shard, ShardRequest, ShardResult, plan_shards
from embedding_service.v1 import embedding_pb2 as pb
from embedding_service.validation import Job, build_job, check_envelope, resolve_model_name

logger = logging.getLogger("ray.serve")

# Failures that mean "the replica went away or its device failed", not "the request
# is bad": the shard is sent again, to a live replica.
_RETRYABLE = (
    ray.exceptions.RayActorError,
    ray.exceptions.ActorUnavailableError,
    ray.exceptions.WorkerCrashedError,
    ray.exceptions.NodeDiedError,
    ReplicaFaulted,
)


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
EMBED_SERVICE = pb.DESCRIPTOR.services_by_name["EmbedService"].full_name
_NODE_STATES = {
    NodeState.HEALTHY: pb.NODE_STATE_HEALTHY,
    NodeState.QUARANTINED: pb.NODE_STATE_QUARANTINED,
    NodeState.DRAINING: pb.NODE_STATE_DRAINING,
    NodeState.RECYCLED: pb.NODE_STATE_RECYCLED,
}


def _retryable(exc: BaseException) -> bool:
    # A replica's own ReplicaFaulted reaches the caller wrapped in a RayTaskError.
    return isinstance(exc, _RETRYABLE) or isinstance(getattr(exc, "cause", None), ReplicaFaulted)


class EmbedRouter:
    async def __init__(self, args: AppArgs, models: dict[str, DeploymentHandle], recycler: DeploymentHandle) -> None:
        self.args = args
        self.models = models
        self.recycler = recycler
        self._infos: dict[str, ModelInfo] = {}
        self.node_id = ray.get_runtime_context().get_node_id()
        self._snapshot: Snapshot | None = None
        self._changed = asyncio.Condition()
        self._follower = asyncio.create_task(self._follow_recycler())

    # ---- the recycler's view ---------------------------------------------

    async def _follow_recycler(self) -> None:
        """Long-polls the recycler; keeps routing off quarantined nodes and wakes Watch streams."""
        version = -1
        while True:
            try:
                snapshot = await self.recycler.wait_for_change.remote(version, 5.0)
            except Exception:
                logger.exception("router: recycler unreachable; retrying")
                await asyncio.sleep(1.0)
                continue
            if snapshot.version != version:
                version = snapshot.version
                self._snapshot = snapshot
                node_routing.set_quarantined(snapshot.unhealthy())
                async with self._changed:
                    self._changed.notify_all()

    def _own_node_quarantined(self) -> bool:
        return self._snapshot is not None and self._snapshot.state_of(self.node_id) not in (None, NodeState.HEALTHY)

    async def check_health(self) -> None:
        if self._own_node_quarantined():
            raise RuntimeError(f"the router's node {self.node_id} is quarantined")
        if self._follower.done():
            raise RuntimeError("the recycler follower stopped")

    # ---- model metadata -------------------------------------------------

    async def _info(self, name: str) -> ModelInfo:
        if name not in self._infos:
            self._infos[name] = await self.models[name].describe.remote()
        return self._infos[name]

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
        )

    # ---- the work -------------------------------------------------------

    async def _prepare(self, request, max_inputs: int) -> Job:
        name = resolve_model_name(request.model, list(self.models), self.args.default_model_name)
        check_envelope(request, self.args.limits, max_inputs)
        return build_job(request, await self._info(name), self.args.limits)

    async def _call_shard(self, handle: DeploymentHandle, request: ShardRequest) -> ShardResult:
        settings = self.args.router
        for attempt in range(settings.shard_retries + 1):
            try:
                return await handle.embed.remote(request)
            except Exception as exc:
                if not _retryable(exc):
                    raise
                if attempt == settings.shard_retries:
                    raise errors.unavailable(
                        "MODEL_UNAVAILABLE", "model replicas kept failing for this request; retry shortly"
                    ) from exc
                logger.warning("shard of %d inputs failed (%s); retrying", len(request.inputs), type(exc).__name__)
                await asyncio.sleep(settings.retry_backoff_s * (2**attempt))
        raise AssertionError("unreachable")

    async def _shard_results(self, job: Job, timeout_s: float) -> AsyncIterator[tuple[Shard, ShardResult]]:
        """Runs every shard, yielding each as it finishes; fails fast on the first error or at the deadline."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        handle = self.models[job.model]
        limit = asyncio.Semaphore(self.args.router.max_concurrent_shards)

        async def run(shard: Shard) -> tuple[Shard, ShardResult]:
            async with limit:
                request = ShardRequest([job.inputs[p] for p in shard.positions], job.options)
                result = await self._call_shard(handle, request)
            if result.too_long:
                index = int(shard.positions[result.too_long[0]])
                info = await self._info(job.model)
                raise errors.invalid(
                    "INPUT_TOO_LONG",
                    f"input {index} has {int(result.token_counts[result.too_long[0]])} tokens; model "
                    f"{job.model!r} takes at most {info.max_sequence_length} and truncation is REJECT",
                    index=index,
                    tokens=int(result.token_counts[result.too_long[0]]),
                    max_tokens=info.max_sequence_length,
                )
            return shard, result

        tasks = [asyncio.ensure_future(run(s)) for s in plan_shards(job.inputs, self.args.router.shard_size)]
        try:
            for next_done in asyncio.as_completed(tasks):
                yield await asyncio.wait_for(next_done, max(0.0, deadline - loop.time()))
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    @staticmethod
    def _fill(embeddings, positions, vectors: np.ndarray, counts: np.ndarray, raw: bool) -> None:
        for row, pos in enumerate(positions):
            vec = vectors[row]
            if raw:
                embeddings.add(index=int(pos), float32_le=vec.astype("<f4", copy=False).tobytes(), tokens=int(counts[row]))
            else:
                embeddings.add(index=int(pos), values=vec.tolist(), tokens=int(counts[row]))

    @staticmethod
    def _stamp(message, tokens: int, queue_ns: int, inference_ns: int) -> None:
        message.usage.prompt_tokens = tokens
        message.usage.total_tokens = tokens
        message.timing.queue_time_ns = queue_ns
        message.timing.inference_time_ns = inference_ns

    async def _each_change(self, render) -> AsyncIterator:
        """render() now, then again after each change of the recycler's view, whenever it differs."""
        last = None
        while True:
            message = render()
            if message != last:
                last = message
                yield message
            async with self._changed:
                await self._changed.wait()

    # ---- gRPC methods (names must not collide with grpc.health.v1) -------

    @errors.unary(pb.EmbedResponse)
    async def Embed(self, request: pb.EmbedRequest, grpc_context=None) -> pb.EmbedResponse:
        started = time.perf_counter_ns()
        job = await self._prepare(request, self.args.limits.max_inputs_per_request)
        n = len(job.inputs)
        vectors: np.ndarray | None = None
        counts = np.zeros(n, dtype=np.int64)
        queue_ns = inference_ns = 0
        async for shard, result in self._shard_results(job, self.args.limits.request_timeout_s):
            if vectors is None:
                vectors = np.empty((n, result.vectors.shape[1]), dtype=np.float32)
            vectors[shard.positions] = result.vectors
            counts[shard.positions] = result.token_counts
            queue_ns += result.queue_ns
            inference_ns += result.inference_ns
        response = pb.EmbedResponse(model=job.model, dimensions=int(vectors.shape[1]))
        self._fill(response.embeddings, range(n), vectors, counts, job.raw_bytes)
        self._stamp(response, int(counts.sum()), queue_ns, inference_ns)
        response.timing.total_time_ns = time.perf_counter_ns() - started
        return response

    async def EmbedStream(self, request: pb.EmbedStreamRequest, grpc_context=None) -> AsyncIterator[pb.EmbedStreamResponse]:
        try:
            job = await self._prepare(request, self.args.limits.max_inputs_per_stream)
            async for shard, result in self._shard_results(job, self.args.limits.stream_timeout_s):
                chunk = pb.EmbedStreamResponse(model=job.model, dimensions=int(result.vectors.shape[1]))
                self._fill(chunk.embeddings, shard.positions, result.vectors, result.token_counts, job.raw_bytes)
                self._stamp(chunk, int(result.token_counts.sum()), result.queue_ns, result.inference_ns)
                yield chunk
        except Exception as exc:
            # A stream ends with an error only by raising; Ray keeps the code set first.
            raise errors.abort_stream(errors.from_exception(exc), grpc_context) from None

    @errors.unary(pb.ListModelsResponse)
    async def ListModels(self, request: pb.ListModelsRequest, grpc_context=None) -> pb.ListModelsResponse:
        infos = await asyncio.gather(*(self._info(name) for name in self.models))
        return pb.ListModelsResponse(models=[self._model_message(i) for i in infos], default_model=self.args.default_model_name)

    @errors.unary(pb.GetModelResponse)
    async def GetModel(self, request: pb.GetModelRequest, grpc_context=None) -> pb.GetModelResponse:
        name = resolve_model_name(request.name, list(self.models), default="")
        return pb.GetModelResponse(model=self._model_message(await self._info(name)))

    # ---- grpc.health.v1.Health, from the recycler's view ------------------

    def _statuses(self) -> dict[str, int]:
        """A model is SERVING while it has a replica on a healthy node; "" also needs the router's node healthy."""
        serving = self._snapshot.serving_models() if self._snapshot else set()
        per_model = {name: SERVING if name in serving else NOT_SERVING for name in self.models}
        whole = SERVING if serving & set(self.models) and not self._own_node_quarantined() else NOT_SERVING
        return {"": whole, EMBED_SERVICE: whole, **per_model}

    async def Check(self, request: health_pb2.HealthCheckRequest, grpc_context=None) -> health_pb2.HealthCheckResponse:
        statuses = self._statuses()
        if request.service not in statuses:
            errors.apply_to_context(
                errors.not_found("SERVICE_UNKNOWN", f"unknown health service {request.service!r}"), grpc_context
            )
            return health_pb2.HealthCheckResponse()
        return health_pb2.HealthCheckResponse(status=statuses[request.service])

    async def Watch(self, request: health_pb2.HealthCheckRequest, grpc_context=None):
        """The current status at once, then one message per change; an unknown service gets
        SERVICE_UNKNOWN and the stream stays open. It has no deadline of its own."""
        unknown = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        async for status in self._each_change(lambda: self._statuses().get(request.service, unknown)):
            yield health_pb2.HealthCheckResponse(status=status)

    async def List(self, request: health_pb2.HealthListRequest, grpc_context=None) -> health_pb2.HealthListResponse:
        response = health_pb2.HealthListResponse()
        for name, status in self._statuses().items():
            response.statuses[name].status = status
        return response

    # ---- the operators' stream --------------------------------------------

    def _nodes_message(self) -> pb.WatchNodesResponse:
        snapshot = self._snapshot
        response = pb.WatchNodesResponse(version=snapshot.version if snapshot else 0)
        for node in snapshot.nodes if snapshot else ():
            response.nodes.add(
                node_id=node.node_id,
                node_ip=node.node_ip,
                state=_NODE_STATES[node.state],
                reason=node.reason,
                since_unix_ms=int(node.since * 1000),
                replicas=[pb.NodeReplica(replica_id=r.replica_id, model=r.model) for r in node.replicas],
            )
        return response

    async def WatchNodes(self, request: pb.WatchNodesRequest, grpc_context=None) -> AsyncIterator[pb.WatchNodesResponse]:
        """Every node with its state, reason and replicas: now, then at each change."""
        async for message in self._each_change(self._nodes_message):
            yield message
