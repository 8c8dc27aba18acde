"""The embedding kind: one sentence-transformers model per replica (model/replica.py holds what every kind shares).

A shard's texts are tokenized with the call's prompt and truncation policy on arrival ("windows": an input longer
than the model becomes several overlapping sequences, pooled back into one vector); the model's transformer runs
on its backend (torch, ONNX Runtime or OpenVINO: model/runtimes.py) and sentence-transformers' own pooling; the
vectors are cut (Matryoshka), normalized and packed into the compact type the call asked for.
"""

from __future__ import annotations

import asyncio

import numpy as np

from embedding_service.config import ModelSettings, TracingSettings
from embedding_service.model.forward import LoadedModel, load_model, reference_vectors
from embedding_service.model.quantization import postprocess, quantize, ranges_for
from embedding_service.model.replica import Loaded, Rows, ServedKind, lengths_of
from embedding_service.model.watchdog import Placement
from embedding_service.observability.logs import service_logger
from embedding_service.wire.messages import RANGED, EmbedOptions, ModelInfo, ShardRequest, ShardResult

logger = service_logger(__name__)


def describe(settings: ModelSettings, loaded: LoadedModel) -> ModelInfo:
    encoder = loaded.encoder
    return ModelInfo(
        name=settings.name,
        dimension=loaded.dimension,
        max_sequence_length=encoder.max_length,
        prompts=dict(loaded.model.prompts or {}),
        device=loaded.device,
        backend=loaded.backend,
        vocab_size=encoder.vocab_size,
        source=settings.path,
        verification=loaded.verification,
        tokenizer_json=encoder.tokenizer_json(),
        windows=encoder.windows,
        decode_cleanup=bool(getattr(loaded.model.tokenizer, "clean_up_tokenization_spaces", False)),
    )


class EmbeddingModel(ServedKind):
    kind = "embedding"
    span = "embed"

    def __init__(self, settings: ModelSettings, fleet, heartbeat_s: float, tracing: TracingSettings | None = None,
                 loaded: LoadedModel | None = None, placement: Placement | None = None) -> None:
        """Serve passes the first four; `loaded` and `placement` default to loading the model and asking Ray."""
        self.loaded = loaded
        self._corpus: asyncio.Task | None = None  # the calibration corpus's fp32 vectors, made on first need
        self._ranges: dict[tuple[int | None, bool], np.ndarray] = {}
        super().__init__(settings, fleet, heartbeat_s, tracing, placement)

    def load(self, settings: ModelSettings) -> Loaded:
        self.loaded = loaded = self.loaded or load_model(settings)
        return Loaded(describe(settings, loaded), loaded.not_applied)

    # ---- what the router asks besides shards --------------------------------

    async def quantization_ranges(self, dimensions: int | None, normalize: bool) -> tuple[np.ndarray, int]:
        """int8/uint8 ranges [2, dims] for vectors of this shape, and the corpus sentences they were taken over."""
        if self._corpus is None or (self._corpus.done() and self._corpus.exception() is not None):
            self._corpus = asyncio.create_task(asyncio.to_thread(self._corpus_vectors))
        corpus = await asyncio.shield(self._corpus)
        key = (dimensions, normalize)
        if key not in self._ranges:
            self._ranges[key] = ranges_for(corpus, dimensions, normalize)
        return self._ranges[key], len(corpus)

    def _corpus_vectors(self) -> np.ndarray:
        """On the first int8/uint8 call or GetModel, not at start (forward.reference_vectors)."""
        return reference_vectors(self.loaded, self.settings)

    # ---- the kind's stages ----------------------------------------------------

    async def prepare(self, request: ShardRequest) -> Rows:
        """Tokenized with the prompt, truncated by the call's policy ("windows": several sequences an input)."""
        opts: EmbedOptions = request.options
        prompt = self.info.prompts.get(opts.prompt_name) if opts.prompt_name else None
        prepared = self.loaded.encoder.prepare(request.inputs, opts.truncation, prompt)
        return Rows(prepared.sequences, lengths_of(prepared.sequences), prepared.token_counts, prepared.too_long,
                    group=prompt, state=prepared)

    def forward(self, rows: list, group) -> np.ndarray:
        features = self.loaded.encoder.features(rows, group)
        features = {k: v.to(self.device) if hasattr(v, "to") else v for k, v in features.items()}
        return self.loaded.runtime.embed(features)

    async def shape(self, out: np.ndarray, rows: Rows, request: ShardRequest) -> ShardResult:
        """Windows pooled, then the Matryoshka cut, normalization and the compact type the call asked for."""
        opts: EmbedOptions = request.options
        vectors = postprocess(rows.state.pool(out), opts.dimensions, opts.normalize)
        if opts.output != "float":
            ranges = (await self.quantization_ranges(opts.dimensions, opts.normalize))[0] if opts.output in RANGED \
                else None
            vectors = quantize(vectors, opts.output, ranges)
        return ShardResult(vectors, rows.counts)
