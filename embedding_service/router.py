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

from embedding_service import errors
from embedding_service.config import AppArgs
from embedding_service.shards import ModelInfo, Shard, ShardRequest, ShardResult, plan_shards
from embedding_service.v1 import embedding_pb2 as pb
from embedding_service.validation import Job, build_job, check_envelope, resolve_model_name

logger = logging.getLogger("ray.serve")

# Failures that mean "the replica went away", not "the request is bad": the
# shard is sent again, to a live replica.
_RETRYABLE = (
    ray.exceptions.RayActorError,
    ray.exceptions.ActorUnavailableError,
    ray.exceptions.WorkerCrashedError,
    ray.exceptions.NodeDiedError,
)


class EmbedRouter:
    def __init__(self, args: AppArgs, models: dict[str, DeploymentHandle]) -> None:
        self.args = args
        self.models = models
        self._infos: dict[str, ModelInfo] = {}

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
            except _RETRYABLE as exc:
                if attempt == settings.shard_retries:
                    raise errors.unavailable(
                        "MODEL_UNAVAILABLE", "model replicas kept failing for this request; retry shortly"
                    ) from exc
                logger.warning("shard of %d inputs failed (%s); retrying", len(request.inputs), type(exc).__name__)
                await asyncio.sleep(settings.retry_backoff_s * (2**attempt))
        raise AssertionError("unreachable")

    async def _shard_results(self, job: Job) -> AsyncIterator[tuple[Shard, ShardResult]]:
        """Runs every shard, yielding each as it finishes; fails fast on the first error."""
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
                yield await next_done
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

    # ---- gRPC methods (names must not collide with grpc.health.v1) -------

    @errors.unary(pb.EmbedResponse)
    async def Embed(self, request: pb.EmbedRequest, grpc_context=None) -> pb.EmbedResponse:
        started = time.perf_counter_ns()
        job = await self._prepare(request, self.args.limits.max_inputs_per_request)
        n = len(job.inputs)
        vectors: np.ndarray | None = None
        counts = np.zeros(n, dtype=np.int64)
        queue_ns = inference_ns = 0
        async for shard, result in self._shard_results(job):
            if vectors is None:
                vectors = np.empty((n, result.vectors.shape[1]), dtype=np.float32)
            vectors[shard.positions] = result.vectors
            counts[shard.positions] = result.token_counts
            queue_ns += result.queue_ns
            inference_ns += result.inference_ns
        response = pb.EmbedResponse(model=job.model, dimensions=int(vectors.shape[1]))
        self._fill(response.embeddings, range(n), vectors, counts, job.raw_bytes)
        tokens = int(counts.sum())
        response.usage.prompt_tokens = tokens
        response.usage.total_tokens = tokens
        response.timing.queue_time_ns = queue_ns
        response.timing.inference_time_ns = inference_ns
        response.timing.total_time_ns = time.perf_counter_ns() - started
        return response

    async def EmbedStream(self, request: pb.EmbedStreamRequest, grpc_context=None) -> AsyncIterator[pb.EmbedStreamResponse]:
        try:
            job = await self._prepare(request, self.args.limits.max_inputs_per_stream)
            async for shard, result in self._shard_results(job):
                chunk = pb.EmbedStreamResponse(model=job.model, dimensions=int(result.vectors.shape[1]))
                self._fill(chunk.embeddings, shard.positions, result.vectors, result.token_counts, job.raw_bytes)
                tokens = int(result.token_counts.sum())
                chunk.usage.prompt_tokens = tokens
                chunk.usage.total_tokens = tokens
                chunk.timing.queue_time_ns = result.queue_ns
                chunk.timing.inference_time_ns = result.inference_ns
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

    # ---- grpc.health.v1.Health: model reachability (the node recycler of issue 4 will refine it) ----

    async def _model_status(self, name: str) -> int:
        try:
            await asyncio.wait_for(self.models[name].describe.remote(), timeout=5)
            return health_pb2.HealthCheckResponse.SERVING
        except Exception:
            return health_pb2.HealthCheckResponse.NOT_SERVING

    async def _statuses(self) -> dict[str, int]:
        per_model = dict(zip(self.models, await asyncio.gather(*(self._model_status(n) for n in self.models))))
        serving = health_pb2.HealthCheckResponse.SERVING
        whole = serving if serving in per_model.values() else health_pb2.HealthCheckResponse.NOT_SERVING
        return {"": whole, pb.DESCRIPTOR.services_by_name["EmbedService"].full_name: whole, **per_model}

    async def Check(self, request: health_pb2.HealthCheckRequest, grpc_context=None) -> health_pb2.HealthCheckResponse:
        statuses = await self._statuses()
        if request.service not in statuses:
            errors.apply_to_context(
                errors.not_found("SERVICE_UNKNOWN", f"unknown health service {request.service!r}"), grpc_context
            )
            return health_pb2.HealthCheckResponse()
        return health_pb2.HealthCheckResponse(status=statuses[request.service])

    async def Watch(self, request: health_pb2.HealthCheckRequest, grpc_context=None):
        """Current status at once, then each change (polled; the recycler will push changes)."""
        last = None
        while True:
            status = (await self._statuses()).get(request.service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
            if status != last:
                last = status
                yield health_pb2.HealthCheckResponse(status=status)
            await asyncio.sleep(1.0)

    async def List(self, request: health_pb2.HealthListRequest, grpc_context=None) -> health_pb2.HealthListResponse:
        response = health_pb2.HealthListResponse()
        for name, status in (await self._statuses()).items():
            response.statuses[name].status = status
        return response
