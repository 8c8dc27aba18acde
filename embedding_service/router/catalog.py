"""What the router knows of each model, asked of its replicas once: its description (ModelInfo), its
tokenizer (to count tokens for sharding) and the int8/uint8 ranges of each output shape.

A router that has not yet asked (it just started, in an upgrade or after a failure) asks on the first call
that needs the answer. While the model has no replica (its only one is being replaced) the question waits for
one; each caller waits for the answer at most until its own deadline, and concurrent callers share the one
question, which stays asked until a replica answers it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

import numpy as np
from ray.serve.handle import DeploymentHandle

from embedding_service.router.token_lengths import TokenLengths
from embedding_service.router.tokenizing import ModelTokenizer
from embedding_service.wire.deadline import UNBOUNDED, Deadline
from embedding_service.wire.messages import Input, ModelInfo
from embedding_service.wire.reasons import Reason, ServiceError
from embedding_service.wire.serve_failures import replica_gone

# Characters of a text counted on the event loop (well under a millisecond); a longer one goes to a thread.
INLINE_CHARS = 2048


class ModelCatalog:
    def __init__(self, models: dict[str, DeploymentHandle]) -> None:
        self.models = models
        self._known: dict[Hashable, Any] = {}
        self._asking: dict[Hashable, asyncio.Future] = {}
        self._counters: dict[str, TokenLengths | None] = {}
        self._tokenizers: dict[str, ModelTokenizer] = {}

    @property
    def names(self) -> list[str]:
        return list(self.models)

    async def info(self, name: str, deadline: Deadline = UNBOUNDED) -> ModelInfo:
        return await self._answer(("info", name), lambda: self.models[name].describe.remote(), deadline)

    async def token_lengths(self, model: str, inputs: list[Input], deadline: Deadline = UNBOUNDED) -> np.ndarray | None:
        """Each input's tokens by the model's tokenizer (in a thread: a big call must not hold up the event
        loop), or None when the replica did not send its tokenizer."""
        counter = await self._counter(model, deadline)
        return None if counter is None else await asyncio.to_thread(counter.of, inputs)

    async def text_tokens(self, model: str, text: str, deadline: Deadline = UNBOUNDED) -> int | None:
        """One text's content tokens by the model's tokenizer (a rerank query's), or None without a tokenizer. A
        short text is counted here, a long one in a thread (100,000 characters took 27 ms)."""
        counter = await self._counter(model, deadline)
        if counter is None:
            return None
        if len(text) <= INLINE_CHARS:
            return counter.count(text)
        return await asyncio.to_thread(counter.count, text)

    async def tokenizer(self, model: str, deadline: Deadline = UNBOUNDED) -> ModelTokenizer:
        """The model's own tokenizer, to Tokenize and Detokenize with (every kind's replica sends it)."""
        if model not in self._tokenizers:
            counter = await self._counter(model, deadline)
            if counter is None:
                raise ServiceError(Reason.WRONG_MODEL_KIND, f"model {model!r} did not send its tokenizer",
                                   model=model)
            info = await self.info(model, deadline)
            self._tokenizers[model] = ModelTokenizer(counter.tokenizer, info.decode_cleanup)
        return self._tokenizers[model]

    async def _counter(self, model: str, deadline: Deadline) -> TokenLengths | None:
        if model not in self._counters:
            info = await self.info(model, deadline)
            self._counters[model] = (TokenLengths(info.tokenizer_json, info.max_sequence_length)
                                     if info.tokenizer_json else None)
        return self._counters[model]

    async def quantization_ranges(self, model: str, dimensions: int | None, normalize: bool,
                                  deadline: Deadline = UNBOUNDED) -> tuple[np.ndarray, int]:
        """The ranges the model's replicas place int8/uint8 vectors of this shape in (the same on every replica:
        taken over the model's calibration vectors), and the sentences they were taken over."""
        return await self._answer(("ranges", model, dimensions, normalize),
                                  lambda: self.models[model].quantization_ranges.remote(dimensions, normalize),
                                  deadline)

    async def _answer(self, key: Hashable, ask: Callable[[], Awaitable[Any]], deadline: Deadline) -> Any:
        if key in self._known:
            return self._known[key]
        question = self._asking.get(key)
        if question is None:
            question = self._asking[key] = asyncio.ensure_future(self._ask(key, ask))
            question.add_done_callback(lambda f: f.cancelled() or f.exception())  # read, if every caller left
        # Shielded: one caller's deadline ends its own wait, not the question the others wait on.
        return await asyncio.wait_for(asyncio.shield(question), deadline.remaining())

    async def _ask(self, key: Hashable, ask: Callable[[], Awaitable[Any]]) -> Any:
        try:
            self._known[key] = answer = await ask()
            return answer
        except Exception as exc:
            if replica_gone(exc):
                raise ServiceError(Reason.MODEL_UNAVAILABLE, "no model replica answered; retry shortly") from exc
            raise
        finally:
            del self._asking[key]
