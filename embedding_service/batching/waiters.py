"""Callers waiting in a queue: when one is not worth serving any more, and telling every one of a failure.

Shared by the continuous batcher (model replicas) and the coalescers (router, gateway).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from embedding_service.wire.deadline import Deadline

CANCELLED = "cancelled"
DEADLINE = "deadline"


class Expired(TimeoutError):
    """The caller's deadline passed while it waited."""


def why_stale(future: asyncio.Future, deadline: Deadline, where: str) -> str | None:
    """Why a queued waiter is not worth running any more (CANCELLED, or DEADLINE, which it is then told
    with Expired), or None while its caller still waits in time."""
    if future.cancelled():
        return CANCELLED
    if deadline.expired():
        future.set_exception(Expired(f"the deadline passed while the input waited {where}"))
        return DEADLINE
    return None


def fail_waiters(futures: Iterable[asyncio.Future], exc: BaseException) -> None:
    """Every waiter still waiting learns of the failure (a non-Exception, e.g. a cancellation, as a RuntimeError)."""
    for future in futures:
        if not future.done():
            future.set_exception(exc if isinstance(exc, Exception) else RuntimeError(repr(exc)))
