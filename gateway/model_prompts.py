"""The prompts of the service's models, as its ListModels lists them, kept for a while.

Cohere's input_type needs the model's prompts before its Embed call is made; asking the service on every
request would double its calls. One listing of every model is kept (bounded by what the service serves)
for `ttl_s`, then fetched again by one ListModels however many requests need it at once. A name not in the listing
has it fetched again, at most once per MISS_RELIST_S: a model added since is found soon, and a caller sending
unknown names costs the service one ListModels a second at most.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from embedding_client.v1 import embedding_pb2 as pb

MISS_RELIST_S = 1.0

ListModels = Callable[[], Awaitable[pb.ListModelsResponse]]


@dataclass(frozen=True)
class Listing:
    prompts: dict[str, dict[str, str]]  # each served model's prompts (name -> text), by model name
    default_model: str
    fetched_at: float  # on the cache's clock


class ModelPrompts:
    """The served models' prompts, listed at most every `ttl_s` (and on a miss, every MISS_RELIST_S)."""

    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self._listing: Listing | None = None
        self._fetching: asyncio.Future[Listing] | None = None

    async def of(self, model: str, list_models: ListModels) -> tuple[str, dict[str, str]] | None:
        """(the model's name, its prompts) for `model`, the service's default model for ""; None when the
        service serves no such model. Raises what `list_models` raises."""
        listing = await self._within(self.ttl_s, list_models)
        name = model or listing.default_model
        if name not in listing.prompts:
            listing = await self._within(min(self.ttl_s, MISS_RELIST_S), list_models)
            name = model or listing.default_model
        return (name, listing.prompts[name]) if name in listing.prompts else None

    async def _within(self, max_age_s: float, list_models: ListModels) -> Listing:
        """A listing at most `max_age_s` old, fetched by one call shared with every request waiting for it."""
        listing = self._listing
        if listing is not None and self._clock() - listing.fetched_at < max_age_s:
            return listing
        if self._fetching is None:
            self._fetching = asyncio.ensure_future(self._fetch(list_models))
            self._fetching.add_done_callback(self._fetched)
        # Shielded: a caller that leaves does not cancel the call the others wait for.
        return await asyncio.shield(self._fetching)

    async def _fetch(self, list_models: ListModels) -> Listing:
        reply = await list_models()
        self._listing = Listing({m.name: dict(m.prompts) for m in reply.models}, reply.default_model,
                                self._clock())
        return self._listing

    def _fetched(self, future: asyncio.Future) -> None:
        self._fetching = None
        if not future.cancelled():
            future.exception()  # retrieved even when every caller has left, so asyncio does not log it
