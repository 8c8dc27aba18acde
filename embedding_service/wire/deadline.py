"""A caller's deadline: one type from the metadata Serve's proxy writes to the model replica's batcher.

Serve's proxy does not pass a call's deadline on, so the proxy-side code writes the caller's remaining
time into the metadata (TIMEOUT_KEY); the router reads it into a Deadline, the earlier of it and the
service's own bound, and hands that Deadline on with every shard. Inside a process a Deadline is a point
on this process's monotonic clock. Between processes it travels as the time left: it pickles as its
remaining seconds and is anchored again to the receiver's clock as it unpickles, so clocks of different
machines never meet (the transit time is lost, a few milliseconds at most).

A call the proxy sends again (its router was lost) also carries the time the service has spent on it so far
(ELAPSED_KEY), so that the service's own bound counts from the call's arrival, not from each router's.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

TIMEOUT_KEY = "embedding-timeout-ms"
ELAPSED_KEY = "embedding-elapsed-ms"


def _milliseconds(metadata: Iterable[tuple[str, str | bytes]] | None, key: str) -> float | None:
    for k, value in metadata or ():
        if k == key:
            try:
                return int(value) / 1000
            except ValueError:
                return None
    return None


class Deadline:
    """When a caller stops waiting; `at` is None for a caller with no bound."""

    __slots__ = ("at",)

    def __init__(self, at: float | None = None) -> None:
        self.at = at  # time.monotonic() of this process

    @classmethod
    def after(cls, seconds: float | None) -> Deadline:
        return cls(None if seconds is None else time.monotonic() + max(0.0, seconds))

    @classmethod
    def from_metadata(cls, metadata: Iterable[tuple[str, str | bytes]] | None) -> Deadline:
        """The caller's deadline as Serve's proxy saw it (TIMEOUT_KEY); unbounded when absent or not a number."""
        return cls.after(_milliseconds(metadata, TIMEOUT_KEY))

    @classmethod
    def within(cls, bound_s: float | None, metadata: Iterable[tuple[str, str | bytes]] | None) -> Deadline:
        """The earlier of the caller's deadline and the service's bound, less what a resent call has spent."""
        spent = _milliseconds(metadata, ELAPSED_KEY) or 0.0
        return cls.after(None if bound_s is None else bound_s - spent).earlier(cls.from_metadata(metadata))

    @staticmethod
    def metadata_entry(remaining_s: float) -> tuple[str, str]:
        """The metadata pair the proxy adds for a caller with `remaining_s` left."""
        return TIMEOUT_KEY, str(int(remaining_s * 1000))

    @staticmethod
    def elapsed_entry(spent_s: float) -> tuple[str, str]:
        """The metadata pair the proxy adds to a call it sends again, `spent_s` after it arrived."""
        return ELAPSED_KEY, str(int(spent_s * 1000))

    @classmethod
    def latest(cls, deadlines: Iterable[Deadline]) -> Deadline:
        """The deadline of work done for several callers at once: the last of theirs (unbounded if one is)."""
        points = [d.at for d in deadlines]
        return cls(None if not points or None in points else max(points))

    def earlier(self, other: Deadline) -> Deadline:
        if self.at is None:
            return other
        if other.at is None:
            return self
        return self if self.at <= other.at else other

    def remaining(self) -> float | None:
        """Seconds left (never below 0), or None with no bound."""
        return None if self.at is None else max(0.0, self.at - time.monotonic())

    def expired(self) -> bool:
        return self.at is not None and time.monotonic() >= self.at

    def __reduce__(self):  # crosses processes as the time left
        return Deadline.after, (self.remaining(),)

    def __repr__(self) -> str:
        left = self.remaining()
        return "Deadline(unbounded)" if left is None else f"Deadline({left:.3f} s left)"


UNBOUNDED = Deadline()
