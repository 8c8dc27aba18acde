"""What the router knows of each model, asked of its replicas once: its description (ModelInfo), its
tokenizer (to count tokens for sharding) and the int8/uint8 ranges of each output shape."""

from __future__ import annotations

import asyncio

import numpy as np
from ray.serve.handle import DeploymentHandle

from embedding_service.router.failures import replica_gone
from embedding_service.router.token_lengths import TokenLengths
from embedding_service.wire.messages import Input, ModelInfo
from embedding_service.wire.reasons import Reason, ServiceError


class ModelCatalog:
    def __init__(self, models: dict[str, DeploymentHandle]) -> None:
        self.models = models
        self._infos: dict[str, ModelInfo] = {}
        self._counters: dict[str, TokenLengths | None] = {}
        self._ranges: dict[tuple[str, int | None, bool], tuple[np.ndarray, int]] = {}

    @property
    def names(self) -> list[str]:
        return list(self.models)

    async def info(self, name: str) -> ModelInfo:
        if name not in self._infos:
            self._infos[name] = await self.models[name].describe.remote()
        return self._infos[name]

    async def token_lengths(self, model: str, inputs: list[Input]) -> np.ndarray | None:
        """Each input's tokens by the model's tokenizer (in a thread: a big call must not hold up the event
        loop), or None when the replica did not send its tokenizer."""
        if model not in self._counters:
            info = await self.info(model)
            self._counters[model] = (TokenLengths(info.tokenizer_json, info.max_sequence_length)
                                     if info.tokenizer_json else None)
        counter = self._counters[model]
        return None if counter is None else await asyncio.to_thread(counter.of, inputs)

    async def quantization_ranges(self, model: str, dimensions: int | None, normalize: bool) -> tuple[np.ndarray, int]:
        """The ranges the model's replicas place int8/uint8 vectors of this shape in (the same on every replica:
        taken over the model's calibration vectors), and the sentences they were taken over."""
        key = (model, dimensions, normalize)
        if key not in self._ranges:
            try:
                self._ranges[key] = await self.models[model].quantization_ranges.remote(dimensions, normalize)
            except Exception as exc:
                if replica_gone(exc):
                    raise ServiceError(Reason.MODEL_UNAVAILABLE, "no model replica answered; retry shortly") from exc
                raise
        return self._ranges[key]
