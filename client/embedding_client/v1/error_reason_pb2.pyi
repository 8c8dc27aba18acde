from google.protobuf import descriptor_pb2 as _descriptor_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from typing import ClassVar as _ClassVar

DESCRIPTOR: _descriptor.FileDescriptor

class ErrorReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_REASON_UNSPECIFIED: _ClassVar[ErrorReason]
    ERROR_REASON_MALFORMED_REQUEST: _ClassVar[ErrorReason]
    ERROR_REASON_NO_INPUTS: _ClassVar[ErrorReason]
    ERROR_REASON_EMPTY_INPUT: _ClassVar[ErrorReason]
    ERROR_REASON_INPUT_MISSING: _ClassVar[ErrorReason]
    ERROR_REASON_TOO_MANY_INPUTS: _ClassVar[ErrorReason]
    ERROR_REASON_INPUT_TOO_LARGE: _ClassVar[ErrorReason]
    ERROR_REASON_INPUT_TOO_LONG: _ClassVar[ErrorReason]
    ERROR_REASON_REQUEST_TOO_LARGE: _ClassVar[ErrorReason]
    ERROR_REASON_INVALID_DIMENSIONS: _ClassVar[ErrorReason]
    ERROR_REASON_INVALID_TRUNCATION: _ClassVar[ErrorReason]
    ERROR_REASON_INVALID_ENCODING: _ClassVar[ErrorReason]
    ERROR_REASON_TOKEN_ID_OUT_OF_RANGE: _ClassVar[ErrorReason]
    ERROR_REASON_UNKNOWN_PROMPT: _ClassVar[ErrorReason]
    ERROR_REASON_MODEL_NOT_FOUND: _ClassVar[ErrorReason]
    ERROR_REASON_SERVICE_UNKNOWN: _ClassVar[ErrorReason]
    ERROR_REASON_API_KEY_MISSING: _ClassVar[ErrorReason]
    ERROR_REASON_API_KEY_INVALID: _ClassVar[ErrorReason]
    ERROR_REASON_LOOPBACK_ONLY: _ClassVar[ErrorReason]
    ERROR_REASON_OVERLOADED: _ClassVar[ErrorReason]
    ERROR_REASON_MODEL_UNAVAILABLE: _ClassVar[ErrorReason]
    ERROR_REASON_SERVICE_UNAVAILABLE: _ClassVar[ErrorReason]
    ERROR_REASON_SHUTTING_DOWN: _ClassVar[ErrorReason]
    ERROR_REASON_TIMEOUT: _ClassVar[ErrorReason]
    ERROR_REASON_INTERNAL: _ClassVar[ErrorReason]
    ERROR_REASON_MODEL_REFUSED: _ClassVar[ErrorReason]
    ERROR_REASON_WRONG_MODEL_KIND: _ClassVar[ErrorReason]
    ERROR_REASON_EMPTY_QUERY: _ClassVar[ErrorReason]
    ERROR_REASON_INVALID_TOP: _ClassVar[ErrorReason]
    ERROR_REASON_NO_MODEL_OF_KIND: _ClassVar[ErrorReason]
    ERROR_REASON_JOB_NOT_FOUND: _ClassVar[ErrorReason]
    ERROR_REASON_JOBS_DISABLED: _ClassVar[ErrorReason]
    ERROR_REASON_JOB_LIMIT_REACHED: _ClassVar[ErrorReason]
    ERROR_REASON_DATASET_NOT_ALLOWED: _ClassVar[ErrorReason]
    ERROR_REASON_INVALID_JOB: _ClassVar[ErrorReason]
ERROR_REASON_UNSPECIFIED: ErrorReason
ERROR_REASON_MALFORMED_REQUEST: ErrorReason
ERROR_REASON_NO_INPUTS: ErrorReason
ERROR_REASON_EMPTY_INPUT: ErrorReason
ERROR_REASON_INPUT_MISSING: ErrorReason
ERROR_REASON_TOO_MANY_INPUTS: ErrorReason
ERROR_REASON_INPUT_TOO_LARGE: ErrorReason
ERROR_REASON_INPUT_TOO_LONG: ErrorReason
ERROR_REASON_REQUEST_TOO_LARGE: ErrorReason
ERROR_REASON_INVALID_DIMENSIONS: ErrorReason
ERROR_REASON_INVALID_TRUNCATION: ErrorReason
ERROR_REASON_INVALID_ENCODING: ErrorReason
ERROR_REASON_TOKEN_ID_OUT_OF_RANGE: ErrorReason
ERROR_REASON_UNKNOWN_PROMPT: ErrorReason
ERROR_REASON_MODEL_NOT_FOUND: ErrorReason
ERROR_REASON_SERVICE_UNKNOWN: ErrorReason
ERROR_REASON_API_KEY_MISSING: ErrorReason
ERROR_REASON_API_KEY_INVALID: ErrorReason
ERROR_REASON_LOOPBACK_ONLY: ErrorReason
ERROR_REASON_OVERLOADED: ErrorReason
ERROR_REASON_MODEL_UNAVAILABLE: ErrorReason
ERROR_REASON_SERVICE_UNAVAILABLE: ErrorReason
ERROR_REASON_SHUTTING_DOWN: ErrorReason
ERROR_REASON_TIMEOUT: ErrorReason
ERROR_REASON_INTERNAL: ErrorReason
ERROR_REASON_MODEL_REFUSED: ErrorReason
ERROR_REASON_WRONG_MODEL_KIND: ErrorReason
ERROR_REASON_EMPTY_QUERY: ErrorReason
ERROR_REASON_INVALID_TOP: ErrorReason
ERROR_REASON_NO_MODEL_OF_KIND: ErrorReason
ERROR_REASON_JOB_NOT_FOUND: ErrorReason
ERROR_REASON_JOBS_DISABLED: ErrorReason
ERROR_REASON_JOB_LIMIT_REACHED: ErrorReason
ERROR_REASON_DATASET_NOT_ALLOWED: ErrorReason
ERROR_REASON_INVALID_JOB: ErrorReason
STATUS_CODE_FIELD_NUMBER: _ClassVar[int]
status_code: _descriptor.FieldDescriptor
