"""The bytes of request bodies the gateway holds at once, over every request (max_body_bytes_in_flight).

A request takes its body's bytes as they arrive, not as its Content-Length declares them (a caller that declares
64 MB and sends nothing holds nothing), and gives them back once it is answered: its inputs live on until then, as
Python objects and the gRPC message. Nothing waits for room: a request that does not fit is refused at once
(guards.Guard answers 429), so no two half-read bodies can hold each other up. One event loop takes and gives back,
so no lock is needed.
"""

from __future__ import annotations


class BodyBudget:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self.refusals = 0

    def fits(self, size: int) -> bool:
        """Whether a new body of `size` bytes would fit now. A body over the whole budget fits while none is held;
        an empty one always."""
        return size == 0 or self.held + size <= self.limit or self.held == 0

    def holder(self) -> HeldBody:
        return HeldBody(self)


class HeldBody:
    """One request's share of the budget."""

    def __init__(self, budget: BodyBudget) -> None:
        self.budget = budget
        self.size = 0

    def take(self, size: int) -> bool:
        """Adds `size` bytes to this request's share, unless they do not fit; a share over the whole budget grows
        while no other request holds any."""
        budget = self.budget
        if size and budget.held + size > budget.limit and budget.held != self.size:
            return False
        budget.held += size
        self.size += size
        return True

    def give_back(self) -> None:
        self.budget.held -= self.size
        self.size = 0
