"""A stand-in for the servicer context Serve's gRPC proxy hands a handler: it records what the handler writes."""

from __future__ import annotations


class Context:
    """Records what a handler writes on a gRPC servicer context."""

    def __init__(self, metadata=(), remaining: float | None = None, peer: str = "ipv4:127.0.0.1:50000") -> None:
        self._metadata, self._remaining, self._peer = tuple(metadata), remaining, peer
        self._code, self._details, self._trailers = None, "", ()

    def invocation_metadata(self):
        return self._metadata

    def peer(self):
        return self._peer

    def time_remaining(self):
        return self._remaining

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._trailers

    def set_code(self, code):
        self._code = code

    def set_details(self, details):
        self._details = details

    def set_trailing_metadata(self, metadata):
        self._trailers = tuple(metadata)
