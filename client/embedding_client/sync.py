"""The blocking client: the asyncio client run on an event loop thread of the library's own (one implementation).

Every blocking client of a process shares that one loop, which runs as long as the process: gRPC's asyncio layer
keeps polling on the loop it first ran on, so a loop per client, closed with it, left gRPC's poller posting to a
closed loop ("Event loop is closed" printed by the next client's calls)."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator, Sequence

import numpy as np

from embedding_client.aio import AsyncEmbedClient, EmbedResult, Input, Progress
from embedding_client.classifying import ClassifyInput, ClassifyResult
from embedding_client.jobs import Job, create_request, pages
from embedding_client.scoring import RerankResult, SparseResult
from embedding_client.tokenizing import DetokenizeResult, TokenizeResult
from embedding_client.v1 import embedding_pb2 as pb

_shared: tuple[int, asyncio.AbstractEventLoop] | None = None
_shared_thread: threading.Thread | None = None
_shared_lock = threading.Lock()


def _client_loop() -> asyncio.AbstractEventLoop:
    """The process's loop thread for blocking clients, started on first use (again in a forked child)."""
    global _shared, _shared_thread
    with _shared_lock:
        if _shared is None or _shared[0] != os.getpid():
            loop = asyncio.new_event_loop()
            _shared_thread = threading.Thread(target=loop.run_forever, name="embedding-client", daemon=True)
            _shared_thread.start()
            _shared = (os.getpid(), loop)
        return _shared[1]


class EmbedClient:
    """Thread-safe; takes AsyncEmbedClient's arguments. Use as a context manager, or call close()."""

    def __init__(self, targets: str | Sequence[str], **options) -> None:
        self._loop = _client_loop()
        self._closed = False

        async def make() -> AsyncEmbedClient:
            return AsyncEmbedClient(targets, **options)

        self.aio = self._run(make())

    def _run(self, coro):
        if threading.current_thread() is _shared_thread:
            coro.close()
            raise RuntimeError("a blocking EmbedClient call from the client's own loop thread (an on_retry or "
                               "progress callback) would wait forever: call it from another thread")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    @property
    def stats(self):
        return self.aio.stats

    def embed(self, inputs: Sequence[Input], *, model: str = "", dimensions: int | None = None,
              normalize: bool = True, prompt_name: str = "", truncation: str = "end", output: str = "float",
              progress: bool | Progress | None = None, timeout_s: float | None = None) -> EmbedResult:
        return self._run(self.aio.embed(inputs, model=model, dimensions=dimensions, normalize=normalize,
                                        prompt_name=prompt_name, truncation=truncation, output=output,
                                        progress=progress, timeout_s=timeout_s))

    def rerank(self, query: str, documents: Sequence[str], *, model: str = "", top_n: int | None = None,
               return_documents: bool = False, activation: bool = False, truncation: str = "end",
               timeout_s: float | None = None) -> RerankResult:
        return self._run(self.aio.rerank(query, documents, model=model, top_n=top_n,
                                         return_documents=return_documents, activation=activation,
                                         truncation=truncation, timeout_s=timeout_s))

    def embed_sparse(self, texts: Sequence[str], *, model: str = "", top_k: int | None = None,
                     return_tokens: bool = False, truncation: str = "end",
                     timeout_s: float | None = None) -> SparseResult:
        return self._run(self.aio.embed_sparse(texts, model=model, top_k=top_k, return_tokens=return_tokens,
                                               truncation=truncation, timeout_s=timeout_s))

    def classify(self, inputs: Sequence[ClassifyInput], *, model: str = "", top_k: int | None = None,
                 raw_scores: bool = False, truncation: str = "end", progress: bool | Progress | None = None,
                 timeout_s: float | None = None) -> ClassifyResult:
        return self._run(self.aio.classify(inputs, model=model, top_k=top_k, raw_scores=raw_scores,
                                           truncation=truncation, progress=progress, timeout_s=timeout_s))

    def tokenize(self, texts: Sequence[str], *, model: str = "", add_special_tokens: bool = True,
                 return_tokens: bool = False, return_offsets: bool = False,
                 timeout_s: float | None = None) -> TokenizeResult:
        return self._run(self.aio.tokenize(texts, model=model, add_special_tokens=add_special_tokens,
                                           return_tokens=return_tokens, return_offsets=return_offsets,
                                           timeout_s=timeout_s))

    def detokenize(self, ids_lists: Sequence[Sequence[int]], *, model: str = "", skip_special_tokens: bool = False,
                   timeout_s: float | None = None) -> DetokenizeResult:
        return self._run(self.aio.detokenize(ids_lists, model=model, skip_special_tokens=skip_special_tokens,
                                             timeout_s=timeout_s))

    def ranges(self, model: str = "", *, dimensions: int | None = None, normalize: bool = True,
               timeout_s: float | None = None) -> np.ndarray:
        return self._run(self.aio.ranges(model, dimensions=dimensions, normalize=normalize, timeout_s=timeout_s))

    def call(self, method: str, request, *, timeout_s: float | None = None):
        return self._run(self.aio.call(method, request, timeout_s=timeout_s))

    # ---- batch jobs (jobs.py) ------------------------------------------------

    def submit_job(self, input_uri: str, *, input_format: str = "parquet", model: str = "", text_column: str = "text",
                   id_column: str = "id", dimensions: int | None = None, encoding: str = "float",
                   output_uri: str = "", prompt_name: str = "", metadata: dict[str, str] | None = None) -> Job:
        """Starts a batch job over a dataset the service can read (one of its dataset roots); job.wait() follows
        it."""
        request = create_request(input_uri, input_format=input_format, model=model, text_column=text_column,
                                 id_column=id_column, dimensions=dimensions, encoding=encoding,
                                 output_uri=output_uri, prompt_name=prompt_name, metadata=metadata)
        return Job(self, self.call("CreateJob", request).job)

    def job(self, job_id: str) -> Job:
        return Job(self, self.call("GetJob", pb.GetJobRequest(id=job_id)).job)

    def jobs(self, page_size: int = 20) -> Iterator[Job]:
        """The calling key's jobs, newest first, fetched a page at a time."""
        return (Job(self, m) for m in pages(lambda request: self.call("ListJobs", request), page_size))

    def watch_job(self, job_id: str, timeout_s: float | None = None) -> Iterator[pb.Job]:
        stream = self.aio.watch_job(job_id, timeout_s=timeout_s)
        try:
            while True:
                try:
                    yield self._run(stream.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._run(stream.aclose())

    def list_models(self) -> pb.ListModelsResponse:
        return self._run(self.aio.list_models())

    def get_model(self, name: str = "") -> pb.Model:
        return self._run(self.aio.get_model(name))

    def limits(self) -> pb.ServiceLimits:
        return self._run(self.aio.limits())

    def serving(self) -> bool:
        return self.aio.serving()

    def wait_serving(self, timeout_s: float) -> bool:
        return self._run(self.aio.wait_serving(timeout_s))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._run(self.aio.close())

    def __enter__(self) -> EmbedClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
