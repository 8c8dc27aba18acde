"""API keys as callers send them: `authorization: Bearer <key>` (gRPC metadata or an HTTP header).

Shared by the router (the gRPC API's keys) and the gateway (its own users' keys): one parser, one
constant-time comparison against every key.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

BEARER = "bearer "


def bearer_key(header: str | bytes | None) -> bytes | None:
    """The key of an `authorization` value, or None when it is missing or not `Bearer <key>`."""
    if isinstance(header, bytes):
        header = header.decode(errors="replace")
    if not header or not header.lower().startswith(BEARER):
        return None
    key = header[len(BEARER):].strip()
    return key.encode() if key else None


def known_key(given: bytes, keys: Iterable[bytes]) -> bool:
    """Whether `given` is one of `keys`; every key is compared, in constant time."""
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given, key)
    return matched
