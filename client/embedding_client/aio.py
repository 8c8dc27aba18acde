"""The asyncio client: targets, retries, one overall deadline, splitting within the service's limits.

`embed()` returns numpy vectors in input order (rerank and sparse calls: scoring.py; classify: classifying.py;
tokenize and detokenize: tokenizing.py). Up to the service's per-call limits a job is one
Embed call; larger jobs go through EmbedStream, cut into streams within the limits the service
publishes (ListModels), results placed by index. UNAVAILABLE and RESOURCE_EXHAUSTED are retried
on another target after the server's RetryInfo delay, or a jittered exponential backoff; a stream
that breaks is resumed with only the inputs it had not returned.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import random
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np

from embedding_client import progress as progress_bars
from embedding_client.classifying import ClassifyCalls
from embedding_client.encodings import OUTPUTS, TRUNCATION
from embedding_client.errors import DeadlineExceeded, EmbeddingError, InvalidArgument, Unavailable, from_rpc_error
from embedding_client.planning import REQUEST_OVERHEAD, plan_calls
from embedding_client.scoring import ScoringCalls
from embedding_client.targets import TargetPool
from embedding_client.tokenizing import TokenizeCalls
from embedding_client.v1 import embedding_pb2 as pb

logger = logging.getLogger("embedding_client")

API_KEY_ENV = "EMBEDDING_SERVICE_API_KEY"

Input = str | Sequence[int]
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of UNAVAILABLE and RESOURCE_EXHAUSTED (the server's RetryInfo delay when sent)."""

    max_retries: int = 5
    backoff_initial_s: float = 0.1
    backoff_max_s: float = 5.0

    def delay(self, attempt: int, hinted: float | None) -> float:
        if hinted is not None:
            return hinted
        return min(self.backoff_max_s, self.backoff_initial_s * 2**attempt) * (0.5 + random.random() / 2)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    total_tokens: int = 0


@dataclass
class EmbedResult:
    """Vectors (float32, one row per input, in input order), token usage, and who computed them."""

    vectors: np.ndarray
    usage: Usage
    model: str
    served_locally: int = 0  # inputs embedded by the local fallback


@dataclass
class ClientStats:
    """Counters of what the client did (no metrics library here: read them, export them as you like)."""

    calls: int = 0
    retries: int = 0
    fallback_calls: int = 0
    fallback_inputs: int = 0
    by_code: dict[str, int] = field(default_factory=dict)


def _input(x: Input) -> pb.EmbedInput:
    if isinstance(x, str):
        return pb.EmbedInput(text=x)
    if isinstance(x, pb.EmbedInput):
        return x
    return pb.EmbedInput(token_ids=pb.TokenIds(ids=[int(i) for i in x]))


class AsyncEmbedClient(ScoringCalls, ClassifyCalls, TokenizeCalls):
    """One client for the embedding service's targets. Make it inside a running event loop; `close()` it."""

    def __init__(self, targets: str | Sequence[str], *, api_key: str | None = None, timeout_s: float = 300.0,
                 call_timeout_s: float | None = None, retry: RetryPolicy = RetryPolicy(),
                 credentials: grpc.ChannelCredentials | None = None,
                 interceptors: Sequence[grpc.aio.ClientInterceptor] = (), watch_health: bool = True,
                 max_message_bytes: int = 256 << 20, fallback=None,
                 on_retry: Callable[[str, EmbeddingError, float], None] | None = None) -> None:
        """`targets`: host:port of the service's gRPC proxies (round-robin). `api_key`: sent as a bearer token
        (default: the EMBEDDING_SERVICE_API_KEY variable). `timeout_s`: one deadline per call of this client,
        retries and all the streams of a large job included; `call_timeout_s`: of one attempt.
        `fallback`: an embedding_client.fallback.LocalFallback used when no target can serve (off by default)."""
        addresses = [targets] if isinstance(targets, str) else list(targets)
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes)]
        self._pool = TargetPool(addresses, options, credentials, interceptors, watch_health)
        key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        self._metadata = (("authorization", f"Bearer {key}"),) if key else ()
        self.timeout_s = timeout_s
        self.call_timeout_s = call_timeout_s
        self.retry = retry
        self.fallback = fallback
        self.on_retry = on_retry
        self.stats = ClientStats()
        self._limits: pb.ServiceLimits | None = None
        self._limits_task: asyncio.Future | None = None

    @property
    def targets(self):
        return self._pool.targets

    def serving(self) -> bool:
        """Whether some target's health says the whole service is SERVING."""
        return self._pool.serving()

    async def wait_serving(self, timeout_s: float) -> bool:
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout_s
        while not self.serving() and loop.time() < end:
            try:
                await asyncio.wait_for(self._pool.changed.wait(), end - loop.time())
            except TimeoutError:
                break
        return self.serving()

    async def close(self) -> None:
        await self._pool.close()

    async def __aenter__(self) -> AsyncEmbedClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def deadline(self, timeout_s: float | None = None) -> float:
        return asyncio.get_running_loop().time() + (self.timeout_s if timeout_s is None else timeout_s)

    # -- calls with retries -------------------------------------------------------------------------------

    async def _attempts(self, method: str, deadline: float, attempt_fn):
        """Runs attempt_fn(target, timeout) until it succeeds, a failure is not retryable, retries run out,
        or the deadline would pass."""
        loop = asyncio.get_running_loop()
        failed = None
        for attempt in itertools.count():
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise DeadlineExceeded(grpc.StatusCode.DEADLINE_EXCEEDED, f"{method}: the client's deadline passed")
            target = self._pool.pick(avoid=failed)
            if target is None:
                error: EmbeddingError = Unavailable(grpc.StatusCode.UNAVAILABLE,
                                                    "no target is serving: every one's health says NOT_SERVING")
            else:
                timeout = remaining if self.call_timeout_s is None else min(self.call_timeout_s, remaining)
                self.stats.calls += 1
                try:
                    result = await attempt_fn(target, timeout)
                    self._count("OK")
                    return result
                except grpc.aio.AioRpcError as err:
                    error = from_rpc_error(err, target.address)
                    self._count(error.code.name)
                failed = target
            if not error.retryable or attempt >= self.retry.max_retries:
                raise error
            delay = self.retry.delay(attempt, error.retry_after_s)
            if loop.time() + delay >= deadline:
                raise error
            self.stats.retries += 1
            if self.on_retry:
                self.on_retry(method, error, delay)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    def _count(self, code: str) -> None:
        self.stats.by_code[code] = self.stats.by_code.get(code, 0) + 1

    async def call(self, method: str, request, *, deadline: float | None = None, timeout_s: float | None = None):
        """EmbedService.<method>(request) with retries; `deadline` in event-loop time. Raises EmbeddingError."""
        deadline = self.deadline(timeout_s) if deadline is None else deadline

        async def attempt(target, timeout):
            return await getattr(target.stub, method)(request, timeout=timeout, metadata=self._metadata)

        return await self._attempts(method, deadline, attempt)

    async def watch_job(self, job_id: str, *, timeout_s: float | None = None) -> AsyncIterator[pb.Job]:
        """The job now, then at each change until it ends (WatchJob, with retries; a retry starts the watch
        again, which sends the job as it stands)."""
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def attempt(target, timeout):
            async for reply in target.stub.WatchJob(pb.WatchJobRequest(id=job_id), timeout=timeout,
                                                    metadata=self._metadata):
                await queue.put(reply.job)

        async def run() -> None:
            try:
                await self._attempts("WatchJob", self.deadline(timeout_s), attempt)
            finally:
                await queue.put(done)

        task = asyncio.create_task(run())
        try:
            while (item := await queue.get()) is not done:
                yield item
            await task  # its failure, if any
        finally:
            task.cancel()

    async def list_models(self, *, timeout_s: float | None = None) -> pb.ListModelsResponse:
        listing = await self.call("ListModels", pb.ListModelsRequest(), timeout_s=timeout_s)
        self._limits = listing.limits
        return listing

    async def get_model(self, name: str = "", *, timeout_s: float | None = None) -> pb.Model:
        """The named model, or with no name the service's default."""
        if not name:
            listing = await self.list_models(timeout_s=timeout_s)
            return next(m for m in listing.models if m.name == listing.default_model)
        return (await self.call("GetModel", pb.GetModelRequest(name=name), timeout_s=timeout_s)).model

    async def ranges(self, model: str = "", *, dimensions: int | None = None, normalize: bool = True,
                     timeout_s: float | None = None) -> np.ndarray:
        """[2, dims] float32: the least and greatest value per dimension that int8/uint8 vectors of this shape
        are placed between (the `ranges` of sentence-transformers' quantize_embeddings), fixed per model."""
        name = model or (await self.get_model(timeout_s=timeout_s)).name
        request = pb.GetModelRequest(name=name, dimensions=dimensions, normalize=normalize)
        q = (await self.call("GetModel", request, timeout_s=timeout_s)).model.quantization
        return np.array([q.min, q.max], dtype=np.float32)

    async def limits(self) -> pb.ServiceLimits:
        """The service's per-call limits, asked once: concurrent first calls share one ListModels (200 callers
        of a fresh client each asking overloaded the service's queues)."""
        if self._limits is None:
            task = self._limits_task
            if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
                task = self._limits_task = asyncio.ensure_future(self.list_models())
            await asyncio.shield(task)
        return self._limits

    async def limits_within(self, deadline: float) -> pb.ServiceLimits:
        """limits(), within a call's deadline (event-loop time)."""
        try:
            return await asyncio.wait_for(self.limits(), max(0.001, deadline - asyncio.get_running_loop().time()))
        except TimeoutError:
            raise DeadlineExceeded(grpc.StatusCode.DEADLINE_EXCEEDED, "the client's deadline passed") from None

    # -- embedding ---------------------------------------------------------------------------------------

    async def embed(self, inputs: Sequence[Input], *, model: str = "", dimensions: int | None = None,
                    normalize: bool = True, prompt_name: str = "", truncation: str = "end", output: str = "float",
                    progress: bool | Progress | None = None, timeout_s: float | None = None) -> EmbedResult:
        """Vectors of `inputs` (texts, or token-id lists of the model's tokenizer), one row each, in order.

        `output`: "float" (float32), or a compact type (OUTPUTS): int8/uint8 [n, dims], binary/ubinary
        [n, ceil(dims / 8)]. `progress`: a callback (done, total), or True for a progress bar (tqdm when installed)."""
        if truncation not in TRUNCATION:
            raise ValueError(f"truncation must be one of {sorted(TRUNCATION)}, not {truncation!r}")
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {sorted(OUTPUTS)}, not {output!r}")
        deadline = self.deadline(timeout_s)
        items = [_input(x) for x in inputs]
        report, finish = progress_bars.reporter(progress, len(items))
        try:
            return await self._embed(items, deadline, report, model=model, dimensions=dimensions,
                                     normalize=normalize, prompt_name=prompt_name, truncation=truncation,
                                     output=output)
        finally:
            finish()

    async def _embed(self, items: list[pb.EmbedInput], deadline: float, report: Progress, **options) -> EmbedResult:
        fields = {"model": options["model"], "dimensions": options["dimensions"], "normalize": options["normalize"],
                  "prompt_name": options["prompt_name"], "truncation": TRUNCATION[options["truncation"]],
                  "encoding": OUTPUTS[options["output"]][0]}
        job = _Job(len(items), report, options["output"])
        if not items:
            return job.result()
        try:
            await self._embed_remotely(items, deadline, fields, job)
        except Unavailable:
            if self.fallback is None:
                raise
            self._embed_locally(items, job, options)  # whatever the service did not return
        return job.result()

    async def _embed_remotely(self, items: list[pb.EmbedInput], deadline: float, fields: dict, job: _Job) -> None:
        limits = await self.limits_within(deadline)
        sizes = [i.ByteSize() for i in items]
        if len(items) <= limits.max_inputs_per_request and sum(sizes) + REQUEST_OVERHEAD <= limits.max_request_bytes:
            reply = await self.call("Embed", pb.EmbedRequest(inputs=items, **fields), deadline=deadline)
            job.take(0, reply.embeddings, reply.dimensions, reply.usage, reply.model)
            return
        for start, end in plan_calls(sizes, limits.max_inputs_per_stream, limits.max_request_bytes):
            await self._stream(items, start, end, fields, deadline, job)

    async def _stream(self, items, start: int, end: int, fields: dict, deadline: float, job: _Job) -> None:
        await self.resumable_stream(
            "EmbedStream", lambda pending: pb.EmbedStreamRequest(inputs=[items[p] for p in pending], **fields),
            lambda chunk: chunk.embeddings,
            lambda positions, chunk: job.take_indexed(positions, chunk.embeddings, chunk.dimensions, chunk.usage,
                                                      chunk.model),
            list(range(start, end)), deadline)

    async def resumable_stream(self, method: str, request_of: Callable[[list[int]], object],
                               results_of: Callable[[object], Sequence], take: Callable[[list[int], object], None],
                               pending: list[int], deadline: float) -> None:
        """Streams method(request_of(pending)) with retries: each chunk's results (results_of(chunk), each with
        its index in the request) given to take(positions, chunk) by job position; a retry sends only the
        positions that did not come back."""

        async def attempt(target, timeout):
            nonlocal pending
            if not pending:  # everything came back before the stream broke
                return
            request = request_of(pending)
            seen: set[int] = set()
            try:
                async for chunk in getattr(target.stub, method)(request, timeout=timeout, metadata=self._metadata):
                    results = results_of(chunk)
                    take([pending[r.index] for r in results], chunk)
                    seen.update(r.index for r in results)
            finally:
                if seen:  # a retry sends only what did not come back
                    pending = [p for k, p in enumerate(pending) if k not in seen]

        await self._attempts(method, deadline, attempt)

    def _embed_locally(self, items: list[pb.EmbedInput], job: _Job, options: dict) -> None:
        missing = job.missing()
        if any(items[p].WhichOneof("kind") != "text" for p in missing):
            raise InvalidArgument(grpc.StatusCode.INVALID_ARGUMENT,
                                  "the local fallback embeds text only; token-id inputs need the service")
        logger.warning("no target can serve: embedding %d inputs locally with %s", len(missing), self.fallback)
        self.stats.fallback_calls += 1
        self.stats.fallback_inputs += len(missing)
        vectors, tokens = self.fallback.embed([items[p].text for p in missing], **options)
        job.take_local(missing, vectors, tokens, self.fallback.name)


class _Job:
    """The vectors of one embed() call as they arrive, by input position."""

    def __init__(self, n: int, report: Progress, output: str = "float") -> None:
        self.n = n
        self.report = report
        self.output = output
        self.dtype = OUTPUTS[output][1]
        self.vectors: np.ndarray | None = None
        self.done = np.zeros(n, dtype=bool)
        self.tokens = 0
        self.model = ""
        self.local = 0

    def _array(self, width: int) -> np.ndarray:
        if self.vectors is None:
            self.vectors = np.empty((self.n, width), dtype=self.dtype)
        return self.vectors

    def take(self, start: int, embeddings, dimensions: int, usage, model: str) -> None:
        self.take_indexed([start + e.index for e in embeddings], embeddings, dimensions, usage, model)

    def take_indexed(self, positions: list[int], embeddings, dimensions: int, usage, model: str) -> None:
        rows = [np.frombuffer(e.float32_le if self.output == "float" else e.packed, dtype=self.dtype)
                for e in embeddings]
        out = self._array(len(rows[0]) if rows else dimensions)
        for p, row in zip(positions, rows):
            out[p] = row
        fresh = int((~self.done[positions]).sum()) if positions else 0
        self.done[positions] = True
        self.tokens += usage.total_tokens
        self.model = model or self.model
        self.report(fresh, self.n)

    def take_local(self, positions: list[int], vectors: np.ndarray, tokens: int, model: str) -> None:
        out = self._array(vectors.shape[1])
        out[positions] = vectors
        self.done[positions] = True
        self.tokens += tokens
        self.local += len(positions)
        self.model = self.model or model
        self.report(len(positions), self.n)

    def missing(self) -> list[int]:
        return np.flatnonzero(~self.done).tolist()

    def result(self) -> EmbedResult:
        vectors = self.vectors if self.vectors is not None else np.empty((self.n, 0), dtype=self.dtype)
        return EmbedResult(vectors, Usage(self.tokens, self.tokens), self.model, self.local)
