from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EndSearchRequest(_message.Message):
    __slots__ = ("search_id",)
    SEARCH_ID_FIELD_NUMBER: _ClassVar[int]
    search_id: str
    def __init__(self, search_id: _Optional[str] = ...) -> None: ...

class EndSearchResponse(_message.Message):
    __slots__ = ("freed_bytes",)
    FREED_BYTES_FIELD_NUMBER: _ClassVar[int]
    freed_bytes: int
    def __init__(self, freed_bytes: _Optional[int] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("request_id", "problem", "candidates", "aggregates", "return_step_scores", "truncate_left", "soft_min_temperature", "timeout_ms", "prefix_steps", "search_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    AGGREGATES_FIELD_NUMBER: _ClassVar[int]
    RETURN_STEP_SCORES_FIELD_NUMBER: _ClassVar[int]
    TRUNCATE_LEFT_FIELD_NUMBER: _ClassVar[int]
    SOFT_MIN_TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_STEPS_FIELD_NUMBER: _ClassVar[int]
    SEARCH_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    problem: str
    candidates: _containers.RepeatedCompositeFieldContainer[Candidate]
    aggregates: _containers.RepeatedScalarFieldContainer[str]
    return_step_scores: bool
    truncate_left: bool
    soft_min_temperature: float
    timeout_ms: int
    prefix_steps: _containers.RepeatedScalarFieldContainer[str]
    search_id: str
    def __init__(self, request_id: _Optional[str] = ..., problem: _Optional[str] = ..., candidates: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ..., aggregates: _Optional[_Iterable[str]] = ..., return_step_scores: _Optional[bool] = ..., truncate_left: _Optional[bool] = ..., soft_min_temperature: _Optional[float] = ..., timeout_ms: _Optional[int] = ..., prefix_steps: _Optional[_Iterable[str]] = ..., search_id: _Optional[str] = ...) -> None: ...

class Candidate(_message.Message):
    __slots__ = ("steps", "tokens")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    steps: Steps
    tokens: TokenIds
    def __init__(self, steps: _Optional[_Union[Steps, _Mapping]] = ..., tokens: _Optional[_Union[TokenIds, _Mapping]] = ...) -> None: ...

class Steps(_message.Message):
    __slots__ = ("steps",)
    STEPS_FIELD_NUMBER: _ClassVar[int]
    steps: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, steps: _Optional[_Iterable[str]] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids", "step_positions")
    IDS_FIELD_NUMBER: _ClassVar[int]
    STEP_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    step_positions: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., step_positions: _Optional[_Iterable[int]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("request_id", "candidates", "timing")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    candidates: _containers.RepeatedCompositeFieldContainer[CandidateScores]
    timing: Timing
    def __init__(self, request_id: _Optional[str] = ..., candidates: _Optional[_Iterable[_Union[CandidateScores, _Mapping]]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ...) -> None: ...

class CandidateScores(_message.Message):
    __slots__ = ("step_scores", "aggregates", "num_tokens", "num_truncated_steps", "cached_tokens")
    class AggregatesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STEP_SCORES_FIELD_NUMBER: _ClassVar[int]
    AGGREGATES_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_TRUNCATED_STEPS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    step_scores: _containers.RepeatedScalarFieldContainer[float]
    aggregates: _containers.ScalarMap[str, float]
    num_tokens: int
    num_truncated_steps: int
    cached_tokens: int
    def __init__(self, step_scores: _Optional[_Iterable[float]] = ..., aggregates: _Optional[_Mapping[str, float]] = ..., num_tokens: _Optional[int] = ..., num_truncated_steps: _Optional[int] = ..., cached_tokens: _Optional[int] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("queue_ms", "tokenize_ms", "compute_ms", "total_ms")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    TOKENIZE_MS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    tokenize_ms: float
    compute_ms: float
    total_ms: float
    def __init__(self, queue_ms: _Optional[float] = ..., tokenize_ms: _Optional[float] = ..., compute_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class ScoreStreamResponse(_message.Message):
    __slots__ = ("request_id", "response", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    response: ScoreResponse
    error: Error
    def __init__(self, request_id: _Optional[str] = ..., response: _Optional[_Union[ScoreResponse, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message", "field", "error_id")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    ERROR_ID_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    field: str
    error_id: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., field: _Optional[str] = ..., error_id: _Optional[str] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("model", "family", "preset", "precision", "max_seq_len", "max_batch_tokens", "max_queued_requests", "max_queued_tokens", "max_receive_message_bytes", "max_send_message_bytes", "devices", "aggregates", "stepscore_version", "onnxruntime_version", "grpc_version", "format_description", "manifest_json", "max_candidates", "max_steps_per_candidate", "max_problem_chars", "max_step_chars", "max_request_chars", "max_stream_inflight", "stream_stall_seconds", "replica_id", "prefix_cache_bytes")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    PRESET_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_RECEIVE_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_SEND_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    AGGREGATES_FIELD_NUMBER: _ClassVar[int]
    STEPSCORE_VERSION_FIELD_NUMBER: _ClassVar[int]
    ONNXRUNTIME_VERSION_FIELD_NUMBER: _ClassVar[int]
    GRPC_VERSION_FIELD_NUMBER: _ClassVar[int]
    FORMAT_DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    MAX_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_PER_CANDIDATE_FIELD_NUMBER: _ClassVar[int]
    MAX_PROBLEM_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_STEP_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_STREAM_INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    STREAM_STALL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    model: str
    family: str
    preset: str
    precision: str
    max_seq_len: int
    max_batch_tokens: int
    max_queued_requests: int
    max_queued_tokens: int
    max_receive_message_bytes: int
    max_send_message_bytes: int
    devices: _containers.RepeatedScalarFieldContainer[str]
    aggregates: _containers.RepeatedScalarFieldContainer[str]
    stepscore_version: str
    onnxruntime_version: str
    grpc_version: str
    format_description: str
    manifest_json: str
    max_candidates: int
    max_steps_per_candidate: int
    max_problem_chars: int
    max_step_chars: int
    max_request_chars: int
    max_stream_inflight: int
    stream_stall_seconds: float
    replica_id: str
    prefix_cache_bytes: int
    def __init__(self, model: _Optional[str] = ..., family: _Optional[str] = ..., preset: _Optional[str] = ..., precision: _Optional[str] = ..., max_seq_len: _Optional[int] = ..., max_batch_tokens: _Optional[int] = ..., max_queued_requests: _Optional[int] = ..., max_queued_tokens: _Optional[int] = ..., max_receive_message_bytes: _Optional[int] = ..., max_send_message_bytes: _Optional[int] = ..., devices: _Optional[_Iterable[str]] = ..., aggregates: _Optional[_Iterable[str]] = ..., stepscore_version: _Optional[str] = ..., onnxruntime_version: _Optional[str] = ..., grpc_version: _Optional[str] = ..., format_description: _Optional[str] = ..., manifest_json: _Optional[str] = ..., max_candidates: _Optional[int] = ..., max_steps_per_candidate: _Optional[int] = ..., max_problem_chars: _Optional[int] = ..., max_step_chars: _Optional[int] = ..., max_request_chars: _Optional[int] = ..., max_stream_inflight: _Optional[int] = ..., stream_stall_seconds: _Optional[float] = ..., replica_id: _Optional[str] = ..., prefix_cache_bytes: _Optional[int] = ...) -> None: ...
