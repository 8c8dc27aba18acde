"""Keeps requests off quarantined nodes, in the caller's process, at once.

A custom Ray Serve request router for the model deployments: it runs inside
the EmbedRouter (the caller) and skips replicas whose node the recycler has
quarantined. The EmbedRouter keeps `quarantined` up to date from the recycler.
"""

from __future__ import annotations

import random
from typing import Iterable

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

_quarantined: frozenset[str] = frozenset()


def set_quarantined(node_ids: Iterable[str]) -> None:
    global _quarantined
    _quarantined = frozenset(node_ids)


def quarantined() -> frozenset[str]:
    return _quarantined


class HealthyNodeRequestRouter(FIFOMixin, RequestRouter):
    """Power of two choices among replicas on nodes that are not quarantined."""

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        healthy = [r for r in candidate_replicas if r.node_id not in _quarantined]
        if not healthy:
            return []  # Serve retries with backoff until a replica elsewhere is up
        return [random.sample(healthy, min(2, len(healthy)))]
