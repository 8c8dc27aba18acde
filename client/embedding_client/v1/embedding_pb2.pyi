from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_KIND_UNSPECIFIED: _ClassVar[ModelKind]
    MODEL_KIND_EMBEDDING: _ClassVar[ModelKind]
    MODEL_KIND_RERANK: _ClassVar[ModelKind]
    MODEL_KIND_SPARSE: _ClassVar[ModelKind]
    MODEL_KIND_CLASSIFY: _ClassVar[ModelKind]

class TruncationPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRUNCATION_POLICY_UNSPECIFIED: _ClassVar[TruncationPolicy]
    TRUNCATION_POLICY_END: _ClassVar[TruncationPolicy]
    TRUNCATION_POLICY_START: _ClassVar[TruncationPolicy]
    TRUNCATION_POLICY_REJECT: _ClassVar[TruncationPolicy]
    TRUNCATION_POLICY_WINDOWS: _ClassVar[TruncationPolicy]

class VectorEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VECTOR_ENCODING_UNSPECIFIED: _ClassVar[VectorEncoding]
    VECTOR_ENCODING_FLOAT: _ClassVar[VectorEncoding]
    VECTOR_ENCODING_FLOAT32_LE: _ClassVar[VectorEncoding]
    VECTOR_ENCODING_INT8: _ClassVar[VectorEncoding]
    VECTOR_ENCODING_UINT8: _ClassVar[VectorEncoding]
    VECTOR_ENCODING_BINARY: _ClassVar[VectorEncoding]
    VECTOR_ENCODING_UBINARY: _ClassVar[VectorEncoding]

class NodeState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NODE_STATE_UNSPECIFIED: _ClassVar[NodeState]
    NODE_STATE_HEALTHY: _ClassVar[NodeState]
    NODE_STATE_QUARANTINED: _ClassVar[NodeState]
    NODE_STATE_DRAINING: _ClassVar[NodeState]
    NODE_STATE_RECYCLED: _ClassVar[NodeState]

class DatasetFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DATASET_FORMAT_UNSPECIFIED: _ClassVar[DatasetFormat]
    DATASET_FORMAT_JSONL: _ClassVar[DatasetFormat]
    DATASET_FORMAT_PARQUET: _ClassVar[DatasetFormat]

class JobStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATUS_UNSPECIFIED: _ClassVar[JobStatus]
    JOB_STATUS_VALIDATING: _ClassVar[JobStatus]
    JOB_STATUS_IN_PROGRESS: _ClassVar[JobStatus]
    JOB_STATUS_FINALIZING: _ClassVar[JobStatus]
    JOB_STATUS_CANCELLING: _ClassVar[JobStatus]
    JOB_STATUS_COMPLETED: _ClassVar[JobStatus]
    JOB_STATUS_FAILED: _ClassVar[JobStatus]
    JOB_STATUS_EXPIRED: _ClassVar[JobStatus]
    JOB_STATUS_CANCELLED: _ClassVar[JobStatus]
MODEL_KIND_UNSPECIFIED: ModelKind
MODEL_KIND_EMBEDDING: ModelKind
MODEL_KIND_RERANK: ModelKind
MODEL_KIND_SPARSE: ModelKind
MODEL_KIND_CLASSIFY: ModelKind
TRUNCATION_POLICY_UNSPECIFIED: TruncationPolicy
TRUNCATION_POLICY_END: TruncationPolicy
TRUNCATION_POLICY_START: TruncationPolicy
TRUNCATION_POLICY_REJECT: TruncationPolicy
TRUNCATION_POLICY_WINDOWS: TruncationPolicy
VECTOR_ENCODING_UNSPECIFIED: VectorEncoding
VECTOR_ENCODING_FLOAT: VectorEncoding
VECTOR_ENCODING_FLOAT32_LE: VectorEncoding
VECTOR_ENCODING_INT8: VectorEncoding
VECTOR_ENCODING_UINT8: VectorEncoding
VECTOR_ENCODING_BINARY: VectorEncoding
VECTOR_ENCODING_UBINARY: VectorEncoding
NODE_STATE_UNSPECIFIED: NodeState
NODE_STATE_HEALTHY: NodeState
NODE_STATE_QUARANTINED: NodeState
NODE_STATE_DRAINING: NodeState
NODE_STATE_RECYCLED: NodeState
DATASET_FORMAT_UNSPECIFIED: DatasetFormat
DATASET_FORMAT_JSONL: DatasetFormat
DATASET_FORMAT_PARQUET: DatasetFormat
JOB_STATUS_UNSPECIFIED: JobStatus
JOB_STATUS_VALIDATING: JobStatus
JOB_STATUS_IN_PROGRESS: JobStatus
JOB_STATUS_FINALIZING: JobStatus
JOB_STATUS_CANCELLING: JobStatus
JOB_STATUS_COMPLETED: JobStatus
JOB_STATUS_FAILED: JobStatus
JOB_STATUS_EXPIRED: JobStatus
JOB_STATUS_CANCELLED: JobStatus

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class EmbedInput(_message.Message):
    __slots__ = ("text", "token_ids")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: TokenIds
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Union[TokenIds, _Mapping]] = ...) -> None: ...

class EmbedRequest(_message.Message):
    __slots__ = ("model", "inputs", "dimensions", "normalize", "truncation", "prompt_name", "encoding")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_FIELD_NUMBER: _ClassVar[int]
    TRUNCATION_FIELD_NUMBER: _ClassVar[int]
    PROMPT_NAME_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    model: str
    inputs: _containers.RepeatedCompositeFieldContainer[EmbedInput]
    dimensions: int
    normalize: bool
    truncation: TruncationPolicy
    prompt_name: str
    encoding: VectorEncoding
    def __init__(self, model: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[EmbedInput, _Mapping]]] = ..., dimensions: _Optional[int] = ..., normalize: _Optional[bool] = ..., truncation: _Optional[_Union[TruncationPolicy, str]] = ..., prompt_name: _Optional[str] = ..., encoding: _Optional[_Union[VectorEncoding, str]] = ...) -> None: ...

class Embedding(_message.Message):
    __slots__ = ("index", "values", "float32_le", "tokens", "packed")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    FLOAT32_LE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    PACKED_FIELD_NUMBER: _ClassVar[int]
    index: int
    values: _containers.RepeatedScalarFieldContainer[float]
    float32_le: bytes
    tokens: int
    packed: bytes
    def __init__(self, index: _Optional[int] = ..., values: _Optional[_Iterable[float]] = ..., float32_le: _Optional[bytes] = ..., tokens: _Optional[int] = ..., packed: _Optional[bytes] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "total_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    total_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., total_tokens: _Optional[int] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("queue_time_ns", "inference_time_ns", "total_time_ns")
    QUEUE_TIME_NS_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_TIME_NS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TIME_NS_FIELD_NUMBER: _ClassVar[int]
    queue_time_ns: int
    inference_time_ns: int
    total_time_ns: int
    def __init__(self, queue_time_ns: _Optional[int] = ..., inference_time_ns: _Optional[int] = ..., total_time_ns: _Optional[int] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("model", "embeddings", "dimensions", "usage", "timing")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    model: str
    embeddings: _containers.RepeatedCompositeFieldContainer[Embedding]
    dimensions: int
    usage: Usage
    timing: Timing
    def __init__(self, model: _Optional[str] = ..., embeddings: _Optional[_Iterable[_Union[Embedding, _Mapping]]] = ..., dimensions: _Optional[int] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ...) -> None: ...

class EmbedStreamRequest(_message.Message):
    __slots__ = ("model", "inputs", "dimensions", "normalize", "truncation", "prompt_name", "encoding")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_FIELD_NUMBER: _ClassVar[int]
    TRUNCATION_FIELD_NUMBER: _ClassVar[int]
    PROMPT_NAME_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    model: str
    inputs: _containers.RepeatedCompositeFieldContainer[EmbedInput]
    dimensions: int
    normalize: bool
    truncation: TruncationPolicy
    prompt_name: str
    encoding: VectorEncoding
    def __init__(self, model: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[EmbedInput, _Mapping]]] = ..., dimensions: _Optional[int] = ..., normalize: _Optional[bool] = ..., truncation: _Optional[_Union[TruncationPolicy, str]] = ..., prompt_name: _Optional[str] = ..., encoding: _Optional[_Union[VectorEncoding, str]] = ...) -> None: ...

class EmbedStreamResponse(_message.Message):
    __slots__ = ("model", "embeddings", "dimensions", "usage", "timing")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    model: str
    embeddings: _containers.RepeatedCompositeFieldContainer[Embedding]
    dimensions: int
    usage: Usage
    timing: Timing
    def __init__(self, model: _Optional[str] = ..., embeddings: _Optional[_Iterable[_Union[Embedding, _Mapping]]] = ..., dimensions: _Optional[int] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ...) -> None: ...

class Model(_message.Message):
    __slots__ = ("name", "dimension", "max_sequence_length", "prompts", "device", "backend", "vocab_size", "is_default", "source", "precision", "accuracy", "refused", "quantization", "long_inputs", "kind", "labels", "activation")
    class PromptsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQUENCE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    LONG_INPUTS_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    name: str
    dimension: int
    max_sequence_length: int
    prompts: _containers.ScalarMap[str, str]
    device: str
    backend: str
    vocab_size: int
    is_default: bool
    source: str
    precision: str
    accuracy: ModelAccuracy
    refused: str
    quantization: QuantizationRanges
    long_inputs: LongInputWindows
    kind: ModelKind
    labels: _containers.RepeatedScalarFieldContainer[str]
    activation: str
    def __init__(self, name: _Optional[str] = ..., dimension: _Optional[int] = ..., max_sequence_length: _Optional[int] = ..., prompts: _Optional[_Mapping[str, str]] = ..., device: _Optional[str] = ..., backend: _Optional[str] = ..., vocab_size: _Optional[int] = ..., is_default: _Optional[bool] = ..., source: _Optional[str] = ..., precision: _Optional[str] = ..., accuracy: _Optional[_Union[ModelAccuracy, _Mapping]] = ..., refused: _Optional[str] = ..., quantization: _Optional[_Union[QuantizationRanges, _Mapping]] = ..., long_inputs: _Optional[_Union[LongInputWindows, _Mapping]] = ..., kind: _Optional[_Union[ModelKind, str]] = ..., labels: _Optional[_Iterable[str]] = ..., activation: _Optional[str] = ...) -> None: ...

class LongInputWindows(_message.Message):
    __slots__ = ("window_tokens", "overlap_tokens", "max_windows")
    WINDOW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OVERLAP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_WINDOWS_FIELD_NUMBER: _ClassVar[int]
    window_tokens: int
    overlap_tokens: int
    max_windows: int
    def __init__(self, window_tokens: _Optional[int] = ..., overlap_tokens: _Optional[int] = ..., max_windows: _Optional[int] = ...) -> None: ...

class QuantizationRanges(_message.Message):
    __slots__ = ("dimensions", "normalized", "min", "max", "calibration_sentences")
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    NORMALIZED_FIELD_NUMBER: _ClassVar[int]
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_SENTENCES_FIELD_NUMBER: _ClassVar[int]
    dimensions: int
    normalized: bool
    min: _containers.RepeatedScalarFieldContainer[float]
    max: _containers.RepeatedScalarFieldContainer[float]
    calibration_sentences: int
    def __init__(self, dimensions: _Optional[int] = ..., normalized: _Optional[bool] = ..., min: _Optional[_Iterable[float]] = ..., max: _Optional[_Iterable[float]] = ..., calibration_sentences: _Optional[int] = ...) -> None: ...

class ModelAccuracy(_message.Message):
    __slots__ = ("reference", "canary_min_cosine", "canary_threshold", "gate_sentences", "mean_cosine", "recall_at_10", "min_mean_cosine", "min_recall_at_10")
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    CANARY_MIN_COSINE_FIELD_NUMBER: _ClassVar[int]
    CANARY_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    GATE_SENTENCES_FIELD_NUMBER: _ClassVar[int]
    MEAN_COSINE_FIELD_NUMBER: _ClassVar[int]
    RECALL_AT_10_FIELD_NUMBER: _ClassVar[int]
    MIN_MEAN_COSINE_FIELD_NUMBER: _ClassVar[int]
    MIN_RECALL_AT_10_FIELD_NUMBER: _ClassVar[int]
    reference: str
    canary_min_cosine: float
    canary_threshold: float
    gate_sentences: int
    mean_cosine: float
    recall_at_10: float
    min_mean_cosine: float
    min_recall_at_10: float
    def __init__(self, reference: _Optional[str] = ..., canary_min_cosine: _Optional[float] = ..., canary_threshold: _Optional[float] = ..., gate_sentences: _Optional[int] = ..., mean_cosine: _Optional[float] = ..., recall_at_10: _Optional[float] = ..., min_mean_cosine: _Optional[float] = ..., min_recall_at_10: _Optional[float] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServiceLimits(_message.Message):
    __slots__ = ("max_inputs_per_request", "max_inputs_per_stream", "max_chars_per_input", "max_token_ids_per_input", "max_request_bytes", "max_documents_per_rerank", "max_documents_per_rerank_stream", "max_sparse_terms", "max_query_tokens", "max_labels_per_result", "max_token_ids_per_detokenize")
    MAX_INPUTS_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_INPUTS_PER_STREAM_FIELD_NUMBER: _ClassVar[int]
    MAX_CHARS_PER_INPUT_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKEN_IDS_PER_INPUT_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_DOCUMENTS_PER_RERANK_FIELD_NUMBER: _ClassVar[int]
    MAX_DOCUMENTS_PER_RERANK_STREAM_FIELD_NUMBER: _ClassVar[int]
    MAX_SPARSE_TERMS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUERY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_LABELS_PER_RESULT_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKEN_IDS_PER_DETOKENIZE_FIELD_NUMBER: _ClassVar[int]
    max_inputs_per_request: int
    max_inputs_per_stream: int
    max_chars_per_input: int
    max_token_ids_per_input: int
    max_request_bytes: int
    max_documents_per_rerank: int
    max_documents_per_rerank_stream: int
    max_sparse_terms: int
    max_query_tokens: int
    max_labels_per_result: int
    max_token_ids_per_detokenize: int
    def __init__(self, max_inputs_per_request: _Optional[int] = ..., max_inputs_per_stream: _Optional[int] = ..., max_chars_per_input: _Optional[int] = ..., max_token_ids_per_input: _Optional[int] = ..., max_request_bytes: _Optional[int] = ..., max_documents_per_rerank: _Optional[int] = ..., max_documents_per_rerank_stream: _Optional[int] = ..., max_sparse_terms: _Optional[int] = ..., max_query_tokens: _Optional[int] = ..., max_labels_per_result: _Optional[int] = ..., max_token_ids_per_detokenize: _Optional[int] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "default_model", "limits")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODEL_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[Model]
    default_model: str
    limits: ServiceLimits
    def __init__(self, models: _Optional[_Iterable[_Union[Model, _Mapping]]] = ..., default_model: _Optional[str] = ..., limits: _Optional[_Union[ServiceLimits, _Mapping]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("name", "dimensions", "normalize")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dimensions: int
    normalize: bool
    def __init__(self, name: _Optional[str] = ..., dimensions: _Optional[int] = ..., normalize: _Optional[bool] = ...) -> None: ...

class GetModelResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: Model
    def __init__(self, model: _Optional[_Union[Model, _Mapping]] = ...) -> None: ...

class NodeReplica(_message.Message):
    __slots__ = ("replica_id", "model", "refused")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    model: str
    refused: str
    def __init__(self, replica_id: _Optional[str] = ..., model: _Optional[str] = ..., refused: _Optional[str] = ...) -> None: ...

class Node(_message.Message):
    __slots__ = ("node_id", "node_ip", "state", "reason", "since_unix_ms", "replicas", "action_error", "failed_actions")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_IP_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SINCE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    ACTION_ERROR_FIELD_NUMBER: _ClassVar[int]
    FAILED_ACTIONS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    node_ip: str
    state: NodeState
    reason: str
    since_unix_ms: int
    replicas: _containers.RepeatedCompositeFieldContainer[NodeReplica]
    action_error: str
    failed_actions: int
    def __init__(self, node_id: _Optional[str] = ..., node_ip: _Optional[str] = ..., state: _Optional[_Union[NodeState, str]] = ..., reason: _Optional[str] = ..., since_unix_ms: _Optional[int] = ..., replicas: _Optional[_Iterable[_Union[NodeReplica, _Mapping]]] = ..., action_error: _Optional[str] = ..., failed_actions: _Optional[int] = ...) -> None: ...

class WatchNodesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WatchNodesResponse(_message.Message):
    __slots__ = ("version", "nodes")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    version: int
    nodes: _containers.RepeatedCompositeFieldContainer[Node]
    def __init__(self, version: _Optional[int] = ..., nodes: _Optional[_Iterable[_Union[Node, _Mapping]]] = ...) -> None: ...

class RerankRequest(_message.Message):
    __slots__ = ("model", "query", "documents", "top_n", "return_documents", "truncation", "activation")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    TOP_N_FIELD_NUMBER: _ClassVar[int]
    RETURN_DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATION_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    model: str
    query: str
    documents: _containers.RepeatedScalarFieldContainer[str]
    top_n: int
    return_documents: bool
    truncation: TruncationPolicy
    activation: bool
    def __init__(self, model: _Optional[str] = ..., query: _Optional[str] = ..., documents: _Optional[_Iterable[str]] = ..., top_n: _Optional[int] = ..., return_documents: _Optional[bool] = ..., truncation: _Optional[_Union[TruncationPolicy, str]] = ..., activation: _Optional[bool] = ...) -> None: ...

class RerankResult(_message.Message):
    __slots__ = ("index", "score", "document", "tokens")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    index: int
    score: float
    document: str
    tokens: int
    def __init__(self, index: _Optional[int] = ..., score: _Optional[float] = ..., document: _Optional[str] = ..., tokens: _Optional[int] = ...) -> None: ...

class RerankResponse(_message.Message):
    __slots__ = ("model", "results", "usage", "timing")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    model: str
    results: _containers.RepeatedCompositeFieldContainer[RerankResult]
    usage: Usage
    timing: Timing
    def __init__(self, model: _Optional[str] = ..., results: _Optional[_Iterable[_Union[RerankResult, _Mapping]]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ...) -> None: ...

class RerankStreamRequest(_message.Message):
    __slots__ = ("model", "query", "documents", "return_documents", "truncation", "activation")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    RETURN_DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATION_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    model: str
    query: str
    documents: _containers.RepeatedScalarFieldContainer[str]
    return_documents: bool
    truncation: TruncationPolicy
    activation: bool
    def __init__(self, model: _Optional[str] = ..., query: _Optional[str] = ..., documents: _Optional[_Iterable[str]] = ..., return_documents: _Optional[bool] = ..., truncation: _Optional[_Union[TruncationPolicy, str]] = ..., activation: _Optional[bool] = ...) -> None: ...

class RerankStreamResponse(_message.Message):
    __slots__ = ("model", "results", "usage", "timing")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    model: str
    results: _containers.RepeatedCompositeFieldContainer[RerankResult]
    usage: Usage
    timing: Timing
    def __init__(self, model: _Optional[str] = ..., results: _Optional[_Iterable[_Union[RerankResult, _Mapping]]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ...) -> None: ...

class EmbedSparseRequest(_message.Message):
    __slots__ = ("model", "inputs", "truncation", "top_k", "return_tokens")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATION_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    RETURN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    model: str
    inputs: _containers.RepeatedScalarFieldContainer[str]
    truncation: TruncationPolicy
    top_k: int
    return_tokens: bool
    def __init__(self, model: _Optional[str] = ..., inputs: _Optional[_Iterable[str]] = ..., truncation: _Optional[_Union[TruncationPolicy, str]] = ..., top_k: _Optional[int] = ..., return_tokens: _Optional[bool] = ...) -> None: ...

class SparseEmbedding(_message.Message):
    __slots__ = ("index", "indices", "values", "tokens", "terms", "active_terms")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TERMS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_TERMS_FIELD_NUMBER: _ClassVar[int]
    index: int
    indices: _containers.RepeatedScalarFieldContainer[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    tokens: int
    terms: _containers.RepeatedScalarFieldContainer[str]
    active_terms: int
    def __init__(self, index: _Optional[int] = ..., indices: _Optional[_Iterable[int]] = ..., values: _Optional[_Iterable[float]] = ..., tokens: _Optional[int] = ..., terms: _Optional[_Iterable[str]] = ..., active_terms: _Optional[int] = ...) -> None: ...

class EmbedSparseResponse(_message.Message):
    __slots__ = ("model", "embeddings", "dimensions", "usage", "timing")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    model: str
    embeddings: _containers.RepeatedCompositeFieldContainer[SparseEmbedding]
    dimensions: int
    usage: Usage
    timing: Timing
    def __init__(self, model: _Optional[str] = ..., embeddings: _Optional[_Iterable[_Union[SparseEmbedding, _Mapping]]] = ..., dimensions: _Optional[int] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ...) -> None: ...

class ClassifyInput(_message.Message):
    __slots__ = ("text", "text_pair")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TEXT_PAIR_FIELD_NUMBER: _ClassVar[int]
    text: str
    text_pair: str
    def __init__(self, text: _Optional[str] = ..., text_pair: _Optional[str] = ...) -> None: ...

class ClassifyRequest(_message.Message):
    __slots__ = ("model", "inputs", "top_k", "raw_scores", "truncation")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    RAW_SCORES_FIELD_NUMBER: _ClassVar[int]
    TRUNCATION_FIELD_NUMBER: _ClassVar[int]
    model: str
    inputs: _containers.RepeatedCompositeFieldContainer[ClassifyInput]
    top_k: int
    raw_scores: bool
    truncation: TruncationPolicy
    def __init__(self, model: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[ClassifyInput, _Mapping]]] = ..., top_k: _Optional[int] = ..., raw_scores: _Optional[bool] = ..., truncation: _Optional[_Union[TruncationPolicy, str]] = ...) -> None: ...

class LabelScore(_message.Message):
    __slots__ = ("label", "label_id", "score")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    LABEL_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    label: str
    label_id: int
    score: float
    def __init__(self, label: _Optional[str] = ..., label_id: _Optional[int] = ..., score: _Optional[float] = ...) -> None: ...

class Classification(_message.Message):
    __slots__ = ("index", "labels", "tokens")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    index: int
    labels: _containers.RepeatedCompositeFieldContainer[LabelScore]
    tokens: int
    def __init__(self, index: _Optional[int] = ..., labels: _Optional[_Iterable[_Union[LabelScore, _Mapping]]] = ..., tokens: _Optional[int] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("model", "classifications", "usage", "timing")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CLASSIFICATIONS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    model: str
    classifications: _containers.RepeatedCompositeFieldContainer[Classification]
    usage: Usage
    timing: Timing
    def __init__(self, model: _Optional[str] = ..., classifications: _Optional[_Iterable[_Union[Classification, _Mapping]]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ...) -> None: ...

class ClassifyStreamRequest(_message.Message):
    __slots__ = ("model", "inputs", "top_k", "raw_scores", "truncation")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    RAW_SCORES_FIELD_NUMBER: _ClassVar[int]
    TRUNCATION_FIELD_NUMBER: _ClassVar[int]
    model: str
    inputs: _containers.RepeatedCompositeFieldContainer[ClassifyInput]
    top_k: int
    raw_scores: bool
    truncation: TruncationPolicy
    def __init__(self, model: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[ClassifyInput, _Mapping]]] = ..., top_k: _Optional[int] = ..., raw_scores: _Optional[bool] = ..., truncation: _Optional[_Union[TruncationPolicy, str]] = ...) -> None: ...

class ClassifyStreamResponse(_message.Message):
    __slots__ = ("model", "classifications", "usage", "timing")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CLASSIFICATIONS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    model: str
    classifications: _containers.RepeatedCompositeFieldContainer[Classification]
    usage: Usage
    timing: Timing
    def __init__(self, model: _Optional[str] = ..., classifications: _Optional[_Iterable[_Union[Classification, _Mapping]]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ...) -> None: ...

class TokenizeRequest(_message.Message):
    __slots__ = ("model", "inputs", "add_special_tokens", "return_tokens", "return_offsets")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    ADD_SPECIAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RETURN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RETURN_OFFSETS_FIELD_NUMBER: _ClassVar[int]
    model: str
    inputs: _containers.RepeatedScalarFieldContainer[str]
    add_special_tokens: bool
    return_tokens: bool
    return_offsets: bool
    def __init__(self, model: _Optional[str] = ..., inputs: _Optional[_Iterable[str]] = ..., add_special_tokens: _Optional[bool] = ..., return_tokens: _Optional[bool] = ..., return_offsets: _Optional[bool] = ...) -> None: ...

class TokenizedInput(_message.Message):
    __slots__ = ("index", "ids", "tokens", "starts", "ends", "special")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    STARTS_FIELD_NUMBER: _ClassVar[int]
    ENDS_FIELD_NUMBER: _ClassVar[int]
    SPECIAL_FIELD_NUMBER: _ClassVar[int]
    index: int
    ids: _containers.RepeatedScalarFieldContainer[int]
    tokens: _containers.RepeatedScalarFieldContainer[str]
    starts: _containers.RepeatedScalarFieldContainer[int]
    ends: _containers.RepeatedScalarFieldContainer[int]
    special: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, index: _Optional[int] = ..., ids: _Optional[_Iterable[int]] = ..., tokens: _Optional[_Iterable[str]] = ..., starts: _Optional[_Iterable[int]] = ..., ends: _Optional[_Iterable[int]] = ..., special: _Optional[_Iterable[bool]] = ...) -> None: ...

class TokenizeResponse(_message.Message):
    __slots__ = ("model", "inputs", "max_sequence_length", "usage")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQUENCE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    model: str
    inputs: _containers.RepeatedCompositeFieldContainer[TokenizedInput]
    max_sequence_length: int
    usage: Usage
    def __init__(self, model: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[TokenizedInput, _Mapping]]] = ..., max_sequence_length: _Optional[int] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ...) -> None: ...

class DetokenizeRequest(_message.Message):
    __slots__ = ("model", "inputs", "skip_special_tokens")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    SKIP_SPECIAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    model: str
    inputs: _containers.RepeatedCompositeFieldContainer[TokenIds]
    skip_special_tokens: bool
    def __init__(self, model: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[TokenIds, _Mapping]]] = ..., skip_special_tokens: _Optional[bool] = ...) -> None: ...

class DetokenizeResponse(_message.Message):
    __slots__ = ("model", "texts")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    model: str
    texts: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model: _Optional[str] = ..., texts: _Optional[_Iterable[str]] = ...) -> None: ...

class CreateJobRequest(_message.Message):
    __slots__ = ("model", "input_uri", "input_format", "text_column", "id_column", "dimensions", "encoding", "output_uri", "prompt_name", "metadata", "request_id")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUT_URI_FIELD_NUMBER: _ClassVar[int]
    INPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    TEXT_COLUMN_FIELD_NUMBER: _ClassVar[int]
    ID_COLUMN_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_URI_FIELD_NUMBER: _ClassVar[int]
    PROMPT_NAME_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    input_uri: str
    input_format: DatasetFormat
    text_column: str
    id_column: str
    dimensions: int
    encoding: VectorEncoding
    output_uri: str
    prompt_name: str
    metadata: _containers.ScalarMap[str, str]
    request_id: str
    def __init__(self, model: _Optional[str] = ..., input_uri: _Optional[str] = ..., input_format: _Optional[_Union[DatasetFormat, str]] = ..., text_column: _Optional[str] = ..., id_column: _Optional[str] = ..., dimensions: _Optional[int] = ..., encoding: _Optional[_Union[VectorEncoding, str]] = ..., output_uri: _Optional[str] = ..., prompt_name: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., request_id: _Optional[str] = ...) -> None: ...

class JobError(_message.Message):
    __slots__ = ("code", "message", "line")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    LINE_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    line: int
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ..., line: _Optional[int] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("id", "status", "model", "input_uri", "output_uri", "rows_total", "rows_done", "rows_failed", "rows_per_second", "created_at_ms", "status_times_ms", "errors", "partial", "metadata", "expires_at_ms")
    class StatusTimesMsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUT_URI_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_URI_FIELD_NUMBER: _ClassVar[int]
    ROWS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ROWS_DONE_FIELD_NUMBER: _ClassVar[int]
    ROWS_FAILED_FIELD_NUMBER: _ClassVar[int]
    ROWS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    STATUS_TIMES_MS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_MS_FIELD_NUMBER: _ClassVar[int]
    id: str
    status: JobStatus
    model: str
    input_uri: str
    output_uri: str
    rows_total: int
    rows_done: int
    rows_failed: int
    rows_per_second: float
    created_at_ms: int
    status_times_ms: _containers.ScalarMap[str, int]
    errors: _containers.RepeatedCompositeFieldContainer[JobError]
    partial: bool
    metadata: _containers.ScalarMap[str, str]
    expires_at_ms: int
    def __init__(self, id: _Optional[str] = ..., status: _Optional[_Union[JobStatus, str]] = ..., model: _Optional[str] = ..., input_uri: _Optional[str] = ..., output_uri: _Optional[str] = ..., rows_total: _Optional[int] = ..., rows_done: _Optional[int] = ..., rows_failed: _Optional[int] = ..., rows_per_second: _Optional[float] = ..., created_at_ms: _Optional[int] = ..., status_times_ms: _Optional[_Mapping[str, int]] = ..., errors: _Optional[_Iterable[_Union[JobError, _Mapping]]] = ..., partial: _Optional[bool] = ..., metadata: _Optional[_Mapping[str, str]] = ..., expires_at_ms: _Optional[int] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("after", "limit")
    AFTER_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    after: str
    limit: int
    def __init__(self, after: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "has_more")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    HAS_MORE_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    has_more: bool
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ..., has_more: _Optional[bool] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class CreateJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class GetJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class CancelJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class WatchJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...
