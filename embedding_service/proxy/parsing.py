"""Request bytes parsed leniently in the proxy: bytes that do not parse get INVALID_ARGUMENT (MALFORMED_REQUEST)
and a plain message, on every method, health included. gRPC's own deserializer failure is UNKNOWN, with
Python's exception in the message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from embedding_service.proxy.state import this_proxy
from embedding_service.wire.reasons import Reason, ServiceError


class Malformed:
    """A request whose bytes did not parse; the proxy answers it itself."""

    def __init__(self, error: ServiceError) -> None:
        self.error = error


def lenient(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """`deserialize`, giving a Malformed for bytes that do not parse instead of raising."""
    message_type = getattr(getattr(deserialize, "__self__", None), "DESCRIPTOR", None)
    name = message_type.full_name if message_type is not None else "request message"

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception:  # DecodeError, or whatever a parser raises on bad bytes
            return Malformed(ServiceError(Reason.MALFORMED_REQUEST, f"the request bytes are not a valid {name}"))

    return parse


def refused_malformed(request, context, stream: bool, method: str) -> bool:
    """Answers a request whose bytes did not parse (MALFORMED_REQUEST); False for a parsed one."""
    if isinstance(request, Malformed):
        this_proxy().refuse(request.error, context, stream, method)
        return True
    return False


async def one_request(requests, context, stream: bool, method: str):
    """The call's one request, read now; None (and the call answered) when its bytes did not parse or it sent none."""
    request = None
    async for request in requests:
        break
    if request is None:
        this_proxy().refuse(ServiceError(Reason.MALFORMED_REQUEST, "the call carried no request message"),
                            context, stream, method)
        return None
    return None if refused_malformed(request, context, stream, method) else request
