"""The gRPC context Serve's handler is given in the proxy: a shim per attempt, and a detached copy for merged calls.

Metadata the service passes between its own processes (the deadline, time spent, merged calls) is taken from
what the caller sent, never from the caller. The caller's deadline goes on to the router as metadata
(wire/deadline.py; Serve does not pass it), so work for a caller who has left stops; a call sent again, or
after it waited here to leave merged, also carries the time already spent on it, so the service's bound
counts from its first arrival.
"""

from __future__ import annotations

import grpc

from embedding_service.proxy.merging import Outcome
from embedding_service.wire import serve_failures
from embedding_service.wire.deadline import Deadline
from embedding_service.wire.messages import INTERNAL_METADATA


class Attempt:
    """The call as Serve's handler sees it for one attempt: the caller's remaining time added to the metadata
    Serve forwards, and the status Serve sets kept here until the proxy decides what the caller sees.

    `extra`: metadata added to the caller's; `deadline`: the attempt's own (a merged call's, the last of its
    callers'), else the caller's."""

    def __init__(self, context, spent_s: float | None = None, extra: tuple = (),
                 deadline: Deadline | None = None) -> None:
        self._context = context
        metadata = [(k, v) for k, v in context.invocation_metadata() if k not in INTERNAL_METADATA]
        metadata.extend(extra)
        remaining = context.time_remaining() if deadline is None else deadline.remaining()
        if remaining is not None:
            metadata.append(Deadline.metadata_entry(remaining))
        if spent_s is not None:  # sent again, or after waiting here: the service's bound counts from its arrival
            metadata.append(Deadline.elapsed_entry(spent_s))
        self._metadata = tuple(metadata)
        self._code: grpc.StatusCode | None = None
        self._details: str | None = None
        self._trailers: tuple = ()

    def invocation_metadata(self):
        return self._metadata

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._trailers

    def set_code(self, code) -> None:
        self._code = code

    def set_details(self, details) -> None:
        self._details = details

    def set_trailing_metadata(self, metadata) -> None:
        self._trailers = tuple(metadata)

    def __getattr__(self, name: str):
        return getattr(self._context, name)

    def router_lost(self) -> bool:
        """Serve reported the router replica lost mid-call (INTERNAL, and no reason of the router's)."""
        return serve_failures.router_lost(self._code, self._details, self._trailers)

    def outcome(self, reply: bytes) -> Outcome:
        return Outcome(reply, self._code, self._details, self._trailers)


class Detached:
    """What Serve's handler reads of a caller's gRPC context, taken while the caller is there: a call the
    merging sends may run on after that caller has gone, and a finished call's context must not be touched.
    It is only ever used inside an Attempt, which keeps the status Serve writes."""

    def __init__(self, context) -> None:
        self._metadata = tuple(context.invocation_metadata())
        self._peer = context.peer()
        self._auth = context.auth_context()
        self._identities = context.peer_identities()
        self._identity_key = context.peer_identity_key()
        self._deadline = Deadline.after(context.time_remaining())

    def invocation_metadata(self):
        return self._metadata

    def peer(self):
        return self._peer

    def auth_context(self):
        return self._auth

    def peer_identities(self):
        return self._identities

    def peer_identity_key(self):
        return self._identity_key

    def time_remaining(self):
        return self._deadline.remaining()

    def set_compression(self, compression) -> None:
        pass  # the caller's call is answered by the Attempt's status, compressed as gRPC's default
