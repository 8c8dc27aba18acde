"""The model deployment: one sentence-transformers model per replica.

Each call brings one mini-batch (shard). It is tokenized on arrival, then
queued in a continuous batcher: shards that arrive while the model computes
are gathered, sorted by length and run through the model together in a worker
thread, so the event loop keeps accepting and tokenizing meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
from ray import serve

from embedding_service.batching import ContinuousBatcher
from embedding_service.config import ModelSettings
from embedding_service.gpu_health import load_check
from embedding_service.runtimes import load_runtime
from embedding_service.shards import ModelInfo, ShardRequest, ShardResult, postprocess

logger = logging.getLogger("ray.serve")


@dataclass
class _Pending:
    sequences: list[np.ndarray]
    prompt: str | None
    enqueued_ns: int


@dataclass
class _Computed:
    vectors: np.ndarray
    queue_ns: int
    inference_ns: int


def _resolve_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


class ReplicaFaulted(Exception):
    """The replica's device failed; the router retries the shard elsewhere."""


class EmbeddingModel:
    async def __init__(self, settings: ModelSettings, recycler, heartbeat_s: float) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        from embedding_service.tokenization import InputEncoder

        self.settings = settings
        if settings.threads:
            torch.set_num_threads(settings.threads)
        self.device = _resolve_device(settings.device)
        source = settings.resolved_path()
        # Always loaded with torch: the tokenizer, the pooling modules and the
        # reference vectors come from it; runtimes.py compiles the transformer for
        # the onnx/openvino backends.
        self.model = SentenceTransformer(source, device=self.device, trust_remote_code=settings.trust_remote_code)
        self.model.eval()
        if settings.max_seq_length is not None:
            self.model.max_seq_length = settings.max_seq_length
        self.backend, self.runtime = load_runtime(self.model, settings.backend, self.device, settings.threads)
        self.encoder = InputEncoder(self.model)
        self.info = ModelInfo(
            name=settings.name,
            dimension=int(self.model.get_embedding_dimension()),
            max_sequence_length=self.encoder.max_length,
            prompts=dict(self.model.prompts or {}),
            device=self.device,
            backend=self.backend,
            vocab_size=self.encoder.vocab_size,
            source=settings.path,
        )
        self._batcher = self._new_batcher()
        self.batch_sizes: Counter[int] = Counter()
        logger.info("model %s loaded from %s on %s (%s)", settings.name, source, self.device, self.backend)

        import ray

        self.recycler = recycler
        self.node_id = ray.get_runtime_context().get_node_id()
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self._check = load_check(settings.gpu_check)
        self._quarantine_reason: str | None = None
        await self._heartbeat()  # known to the recycler before taking traffic
        self._watchdog = asyncio.create_task(self._watch(heartbeat_s))

    # ---- device health and the recycler ----------------------------------

    async def _device_fault(self) -> str | None:
        return await asyncio.to_thread(self._check, self.device, self.node_id, **self.settings.gpu_check_args)

    async def _heartbeat(self) -> None:
        quarantined, reason = await self.recycler.heartbeat.remote(self.replica_id, self.settings.name, self.node_id)
        self._quarantine_reason = reason if quarantined else None

    async def _check_and_report(self) -> str | None:
        fault = await self._device_fault()
        if fault is not None:
            logger.error("replica %s on node %s: device fault: %s", self.replica_id, self.node_id, fault)
            await self.recycler.report_failure.remote(self.replica_id, self.node_id, fault)
        return fault

    async def _watch(self, period_s: float) -> None:
        while True:
            await asyncio.sleep(period_s)
            try:
                await self._check_and_report()
                await self._heartbeat()
            except Exception:
                logger.exception("replica %s: health round failed", self.replica_id)

    async def check_health(self) -> None:
        """Serve's health check: fails on a quarantined node, so Serve replaces this replica elsewhere."""
        if self._quarantine_reason is not None:
            raise RuntimeError(f"node {self.node_id} is quarantined: {self._quarantine_reason}")
        if self._watchdog.done():
            raise RuntimeError("the device watchdog stopped")

    def describe(self) -> ModelInfo:
        return self.info

    def take_batch_stats(self) -> dict[int, int]:
        """How many gathered batches of each size (in sequences) this replica ran since the last call."""
        stats, self.batch_sizes = self.batch_sizes, Counter()
        return dict(stats)

    async def embed(self, request: ShardRequest) -> ShardResult:
        opts = request.options
        prompt = self.info.prompts.get(opts.prompt_name) if opts.prompt_name else None
        prepared = self.encoder.prepare(request.inputs, opts.truncation, prompt)
        counts = prepared.token_counts
        if prepared.too_long:
            return ShardResult(vectors=None, token_counts=counts, too_long=prepared.too_long)
        try:
            computed = await self._batcher.submit(_Pending(prepared.sequences, prompt, time.perf_counter_ns()))
        except Exception as exc:
            # An inference error may be a device fault: check now, report, let the router retry.
            fault = await self._check_and_report()
            if fault is not None:
                raise ReplicaFaulted(f"device fault on node {self.node_id}: {fault}") from exc
            raise
        vectors = postprocess(computed.vectors, opts.dimensions, opts.normalize)
        return ShardResult(vectors, counts, queue_ns=computed.queue_ns, inference_ns=computed.inference_ns)

    def _new_batcher(self) -> ContinuousBatcher[_Pending, _Computed]:
        # Sized in sequences. torch's thread count (set above) is process-wide: it holds in the worker thread too.
        return ContinuousBatcher(self._run_batch, max_size=self.settings.max_batch_size,
                                 size=lambda pending: len(pending.sequences),
                                 max_wait_s=self.settings.batch_wait_timeout_s)

    def _run_batch(self, items: list[_Pending]) -> list[_Computed]:
        """One gathered batch, in the batcher's worker thread."""
        start_ns = time.perf_counter_ns()
        total = sum(len(i.sequences) for i in items)
        self.batch_sizes[total] += 1
        # Shards with different prompts may need different pooling features:
        # each prompt group runs on its own.
        outputs: list[np.ndarray | None] = [None] * len(items)
        for prompt in {i.prompt for i in items}:
            members = [k for k, i in enumerate(items) if i.prompt == prompt]
            sequences = [s for k in members for s in items[k].sequences]
            vectors = self._forward(sequences, prompt)
            offset = 0
            for k in members:
                n = len(items[k].sequences)
                outputs[k] = vectors[offset : offset + n]
                offset += n
        inference_ns = time.perf_counter_ns() - start_ns
        return [
            _Computed(vectors=out, queue_ns=start_ns - item.enqueued_ns, inference_ns=inference_ns)
            for item, out in zip(items, outputs)
        ]

    def _forward(self, sequences: list[np.ndarray], prompt: str | None) -> np.ndarray:
        order = sorted(range(len(sequences)), key=lambda k: -len(sequences[k]))
        out = np.empty((len(sequences), self.info.dimension), dtype=np.float32)
        step = self.settings.forward_batch_size
        for i in range(0, len(order), step):
            rows = order[i : i + step]
            features = self.encoder.features([sequences[k] for k in rows], prompt)
            features = {k: v.to(self.device) if hasattr(v, "to") else v for k, v in features.items()}
            out[rows] = self.runtime.embed(features)
        return out
