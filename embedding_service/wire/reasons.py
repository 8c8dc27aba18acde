"""The service's error reasons and their wire form, without Ray.

The one list is the `ErrorReason` enum in protos/embedding_service/v1/error_reason.proto; each value
carries the gRPC status code it comes with. Every process of the service and the gateway read it from here;
clients read failures with embedding_client.errors (read_details, the typed exceptions).
"""

from __future__ import annotations

import enum

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from embedding_client.errors import RETRYABLE_CODES
from embedding_client.v1 import error_reason_pb2

DOMAIN = "embedding-service"
_PREFIX = "ERROR_REASON_"
_VALUES = [v for v in error_reason_pb2.ErrorReason.DESCRIPTOR.values if v.number]

# Reason.INPUT_TOO_LONG etc.; the name is what ErrorInfo.reason carries.
Reason = enum.Enum("Reason", [(v.name.removeprefix(_PREFIX), v.number) for v in _VALUES])

STATUS_CODES: dict[Reason, grpc.StatusCode] = {
    Reason(v.number): grpc.StatusCode[v.GetOptions().Extensions[error_reason_pb2.status_code]] for v in _VALUES
}

# The delay sent in RetryInfo by default (RETRYABLE_CODES: the codes a caller should retry).
DEFAULT_RETRY_AFTER_S = 1.0
# Characters of the message and of each metadata value: an error echoes what the caller sent (a model name,
# a prompt name), and gRPC clients refuse trailers over 16 KiB (some drop them past 8 KiB) -- a 100 KB model
# name once came back as RESOURCE_EXHAUSTED with no status at all.
MAX_MESSAGE_CHARS = 1024
MAX_METADATA_CHARS = 256


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[: limit - 24]}... ({len(text)} chars)"


class ServiceError(Exception):
    """A failure with a reason from the list; its status code comes with the reason."""

    def __init__(self, reason: Reason, message: str, retry_after_s: float | None = None, **metadata: object) -> None:
        message = _clip(message, MAX_MESSAGE_CHARS)
        super().__init__(message)
        self.reason = Reason(reason)
        self.message = message
        self.metadata = {k: _clip(str(v), MAX_METADATA_CHARS) for k, v in metadata.items()}
        if retry_after_s is None and self.code in RETRYABLE_CODES:
            retry_after_s = DEFAULT_RETRY_AFTER_S
        self.retry_after_s = retry_after_s

    @property
    def code(self) -> grpc.StatusCode:
        return STATUS_CODES[self.reason]

    def __reduce__(self):  # picklable across Ray processes
        return (_restore, (self.reason.value, self.message, self.retry_after_s, self.metadata))

    def status_bytes(self) -> bytes:
        """The serialized google.rpc.Status (ErrorInfo, and RetryInfo when retryable)."""
        details = [error_details_pb2.ErrorInfo(reason=self.reason.name, domain=DOMAIN, metadata=self.metadata)]
        if self.retry_after_s is not None:
            retry = error_details_pb2.RetryInfo()
            retry.retry_delay.FromNanoseconds(int(self.retry_after_s * 1e9))
            details.append(retry)
        packed = []
        for detail in details:
            any_detail = any_pb2.Any()
            any_detail.Pack(detail)
            packed.append(any_detail)
        return status_pb2.Status(code=self.code.value[0], message=self.message, details=packed).SerializeToString()

    def stream_details(self) -> str:
        """The status message of a failed stream (Ray's proxy drops a stream's trailers): the reason leads."""
        return f"{self.reason.name}: {self.message}"


def _restore(reason: int, message: str, retry_after_s: float | None, metadata: dict[str, str]) -> ServiceError:
    return ServiceError(Reason(reason), message, retry_after_s, **metadata)
