"""Keeps requests off quarantined nodes and refusing replicas, in the caller's process, at once.

A custom Ray Serve request router for the model deployments: it runs inside
the EmbedRouter (the caller) and skips replicas whose node the recycler has
quarantined, and replicas that refuse to serve (verification.py) for every
method but `describe`, which they answer to say why. The EmbedRouter keeps
both sets up to date from the recycler.
"""

from __future__ import annotations

import random
from typing import Iterable

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

_quarantined: frozenset[str] = frozenset()
_refused: frozenset[str] = frozenset()
ANSWERED_WHEN_REFUSED = "describe"


def set_quarantined(node_ids: Iterable[str]) -> None:
    global _quarantined
    _quarantined = frozenset(node_ids)


def set_refused(replica_ids: Iterable[str]) -> None:
    global _refused
    _refused = frozenset(replica_ids)


def quarantined() -> frozenset[str]:
    return _quarantined


class HealthyNodeRequestRouter(FIFOMixin, RequestRouter):
    """Power of two choices among replicas on nodes that are not quarantined."""

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        method = getattr(getattr(pending_request, "metadata", None), "call_method", None)
        refused = frozenset() if method == ANSWERED_WHEN_REFUSED else _refused
        healthy = [r for r in candidate_replicas
                   if r.node_id not in _quarantined and r.replica_id.unique_id not in refused]
        if not healthy:
            return []  # Serve retries with backoff until a replica elsewhere is up
        return [random.sample(healthy, min(2, len(healthy)))]
