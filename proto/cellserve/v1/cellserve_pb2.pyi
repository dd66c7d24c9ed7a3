from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT64: _ClassVar[DType]
    DTYPE_INT64: _ClassVar[DType]
    DTYPE_INT32: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]

class CloseReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CLOSE_REASON_UNSPECIFIED: _ClassVar[CloseReason]
    CLOSE_REASON_CLIENT: _ClassVar[CloseReason]
    CLOSE_REASON_IDLE: _ClassVar[CloseReason]
    CLOSE_REASON_DRAIN: _ClassVar[CloseReason]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT64: DType
DTYPE_INT64: DType
DTYPE_INT32: DType
DTYPE_FLOAT16: DType
CLOSE_REASON_UNSPECIFIED: CloseReason
CLOSE_REASON_CLIENT: CloseReason
CLOSE_REASON_IDLE: CloseReason
CLOSE_REASON_DRAIN: CloseReason

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "raw")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    raw: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., raw: _Optional[bytes] = ...) -> None: ...

class StreamRequest(_message.Message):
    __slots__ = ("open", "step", "snapshot", "close")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    open: Open
    step: Step
    snapshot: Snapshot
    close: Close
    def __init__(self, open: _Optional[_Union[Open, _Mapping]] = ..., step: _Optional[_Union[Step, _Mapping]] = ..., snapshot: _Optional[_Union[Snapshot, _Mapping]] = ..., close: _Optional[_Union[Close, _Mapping]] = ...) -> None: ...

class Open(_message.Message):
    __slots__ = ("model", "resume_token", "idle_timeout_s")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_FIELD_NUMBER: _ClassVar[int]
    IDLE_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    model: str
    resume_token: bytes
    idle_timeout_s: int
    def __init__(self, model: _Optional[str] = ..., resume_token: _Optional[bytes] = ..., idle_timeout_s: _Optional[int] = ...) -> None: ...

class Step(_message.Message):
    __slots__ = ("seq", "input", "checkpoint")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    seq: int
    input: Tensor
    checkpoint: bool
    def __init__(self, seq: _Optional[int] = ..., input: _Optional[_Union[Tensor, _Mapping]] = ..., checkpoint: _Optional[bool] = ...) -> None: ...

class Snapshot(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Close(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StreamResponse(_message.Message):
    __slots__ = ("opened", "output", "snapshot", "closed", "error", "draining")
    OPENED_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    CLOSED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    opened: Opened
    output: Output
    snapshot: SnapshotTaken
    closed: Closed
    error: StepError
    draining: Draining
    def __init__(self, opened: _Optional[_Union[Opened, _Mapping]] = ..., output: _Optional[_Union[Output, _Mapping]] = ..., snapshot: _Optional[_Union[SnapshotTaken, _Mapping]] = ..., closed: _Optional[_Union[Closed, _Mapping]] = ..., error: _Optional[_Union[StepError, _Mapping]] = ..., draining: _Optional[_Union[Draining, _Mapping]] = ...) -> None: ...

class Opened(_message.Message):
    __slots__ = ("session_id", "model", "idle_timeout_s", "steps", "model_sha256")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IDLE_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    model: str
    idle_timeout_s: int
    steps: int
    model_sha256: str
    def __init__(self, session_id: _Optional[str] = ..., model: _Optional[str] = ..., idle_timeout_s: _Optional[int] = ..., steps: _Optional[int] = ..., model_sha256: _Optional[str] = ...) -> None: ...

class Output(_message.Message):
    __slots__ = ("seq", "output", "resume_token")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_FIELD_NUMBER: _ClassVar[int]
    seq: int
    output: Tensor
    resume_token: bytes
    def __init__(self, seq: _Optional[int] = ..., output: _Optional[_Union[Tensor, _Mapping]] = ..., resume_token: _Optional[bytes] = ...) -> None: ...

class SnapshotTaken(_message.Message):
    __slots__ = ("token", "steps", "expires_at_unix_ms")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    token: bytes
    steps: int
    expires_at_unix_ms: int
    def __init__(self, token: _Optional[bytes] = ..., steps: _Optional[int] = ..., expires_at_unix_ms: _Optional[int] = ...) -> None: ...

class Closed(_message.Message):
    __slots__ = ("steps", "reason", "message")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    steps: int
    reason: CloseReason
    message: str
    def __init__(self, steps: _Optional[int] = ..., reason: _Optional[_Union[CloseReason, str]] = ..., message: _Optional[str] = ...) -> None: ...

class StepError(_message.Message):
    __slots__ = ("seq", "code", "message")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    seq: int
    code: int
    message: str
    def __init__(self, seq: _Optional[int] = ..., code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class Draining(_message.Message):
    __slots__ = ("resume_token", "deadline_unix_ms")
    RESUME_TOKEN_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    resume_token: bytes
    deadline_unix_ms: int
    def __init__(self, resume_token: _Optional[bytes] = ..., deadline_unix_ms: _Optional[int] = ...) -> None: ...

class MultiplexRequest(_message.Message):
    __slots__ = ("seq", "open", "step", "snapshot", "close")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    OPEN_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    seq: int
    open: OpenSessions
    step: StepSessions
    snapshot: SnapshotSessions
    close: CloseSessions
    def __init__(self, seq: _Optional[int] = ..., open: _Optional[_Union[OpenSessions, _Mapping]] = ..., step: _Optional[_Union[StepSessions, _Mapping]] = ..., snapshot: _Optional[_Union[SnapshotSessions, _Mapping]] = ..., close: _Optional[_Union[CloseSessions, _Mapping]] = ...) -> None: ...

class OpenSessions(_message.Message):
    __slots__ = ("sessions",)
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedCompositeFieldContainer[SessionOpen]
    def __init__(self, sessions: _Optional[_Iterable[_Union[SessionOpen, _Mapping]]] = ...) -> None: ...

class SessionOpen(_message.Message):
    __slots__ = ("model", "resume_token", "idle_timeout_s", "key")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_FIELD_NUMBER: _ClassVar[int]
    IDLE_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    model: str
    resume_token: bytes
    idle_timeout_s: int
    key: str
    def __init__(self, model: _Optional[str] = ..., resume_token: _Optional[bytes] = ..., idle_timeout_s: _Optional[int] = ..., key: _Optional[str] = ...) -> None: ...

class StepSessions(_message.Message):
    __slots__ = ("handles", "input", "checkpoint")
    HANDLES_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    handles: _containers.RepeatedScalarFieldContainer[int]
    input: Tensor
    checkpoint: bool
    def __init__(self, handles: _Optional[_Iterable[int]] = ..., input: _Optional[_Union[Tensor, _Mapping]] = ..., checkpoint: _Optional[bool] = ...) -> None: ...

class SnapshotSessions(_message.Message):
    __slots__ = ("handles",)
    HANDLES_FIELD_NUMBER: _ClassVar[int]
    handles: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, handles: _Optional[_Iterable[int]] = ...) -> None: ...

class CloseSessions(_message.Message):
    __slots__ = ("handles",)
    HANDLES_FIELD_NUMBER: _ClassVar[int]
    handles: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, handles: _Optional[_Iterable[int]] = ...) -> None: ...

class MultiplexResponse(_message.Message):
    __slots__ = ("seq", "opened", "output", "snapshot", "closed", "draining", "error", "errors")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    OPENED_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    CLOSED_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    seq: int
    opened: SessionsOpened
    output: SessionsOutput
    snapshot: SessionsSnapshot
    closed: SessionsClosed
    draining: SessionsDraining
    error: StepError
    errors: _containers.RepeatedCompositeFieldContainer[EntryError]
    def __init__(self, seq: _Optional[int] = ..., opened: _Optional[_Union[SessionsOpened, _Mapping]] = ..., output: _Optional[_Union[SessionsOutput, _Mapping]] = ..., snapshot: _Optional[_Union[SessionsSnapshot, _Mapping]] = ..., closed: _Optional[_Union[SessionsClosed, _Mapping]] = ..., draining: _Optional[_Union[SessionsDraining, _Mapping]] = ..., error: _Optional[_Union[StepError, _Mapping]] = ..., errors: _Optional[_Iterable[_Union[EntryError, _Mapping]]] = ...) -> None: ...

class EntryError(_message.Message):
    __slots__ = ("index", "code", "message")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    index: int
    code: int
    message: str
    def __init__(self, index: _Optional[int] = ..., code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class SessionsOpened(_message.Message):
    __slots__ = ("sessions",)
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedCompositeFieldContainer[OpenedSession]
    def __init__(self, sessions: _Optional[_Iterable[_Union[OpenedSession, _Mapping]]] = ...) -> None: ...

class OpenedSession(_message.Message):
    __slots__ = ("handle", "key", "session_id", "model", "idle_timeout_s", "steps", "model_sha256")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IDLE_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    handle: int
    key: str
    session_id: str
    model: str
    idle_timeout_s: int
    steps: int
    model_sha256: str
    def __init__(self, handle: _Optional[int] = ..., key: _Optional[str] = ..., session_id: _Optional[str] = ..., model: _Optional[str] = ..., idle_timeout_s: _Optional[int] = ..., steps: _Optional[int] = ..., model_sha256: _Optional[str] = ...) -> None: ...

class SessionsOutput(_message.Message):
    __slots__ = ("output", "resume_tokens")
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKENS_FIELD_NUMBER: _ClassVar[int]
    output: Tensor
    resume_tokens: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, output: _Optional[_Union[Tensor, _Mapping]] = ..., resume_tokens: _Optional[_Iterable[bytes]] = ...) -> None: ...

class SessionsSnapshot(_message.Message):
    __slots__ = ("tokens", "steps", "expires_at_unix_ms")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedScalarFieldContainer[bytes]
    steps: _containers.RepeatedScalarFieldContainer[int]
    expires_at_unix_ms: int
    def __init__(self, tokens: _Optional[_Iterable[bytes]] = ..., steps: _Optional[_Iterable[int]] = ..., expires_at_unix_ms: _Optional[int] = ...) -> None: ...

class SessionsClosed(_message.Message):
    __slots__ = ("handles", "steps", "reason", "message")
    HANDLES_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    handles: _containers.RepeatedScalarFieldContainer[int]
    steps: _containers.RepeatedScalarFieldContainer[int]
    reason: CloseReason
    message: str
    def __init__(self, handles: _Optional[_Iterable[int]] = ..., steps: _Optional[_Iterable[int]] = ..., reason: _Optional[_Union[CloseReason, str]] = ..., message: _Optional[str] = ...) -> None: ...

class SessionsDraining(_message.Message):
    __slots__ = ("handles", "resume_tokens", "deadline_unix_ms")
    HANDLES_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    handles: _containers.RepeatedScalarFieldContainer[int]
    resume_tokens: _containers.RepeatedScalarFieldContainer[bytes]
    deadline_unix_ms: int
    def __init__(self, handles: _Optional[_Iterable[int]] = ..., resume_tokens: _Optional[_Iterable[bytes]] = ..., deadline_unix_ms: _Optional[int] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("model", "prompt", "max_tokens", "temperature", "top_k", "seed")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    model: str
    prompt: str
    max_tokens: int
    temperature: float
    top_k: int
    seed: int
    def __init__(self, model: _Optional[str] = ..., prompt: _Optional[str] = ..., max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("token_ids", "text")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: bytes
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[bytes] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "worker", "workers")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelSummary]
    worker: int
    workers: int
    def __init__(self, models: _Optional[_Iterable[_Union[ModelSummary, _Mapping]]] = ..., worker: _Optional[int] = ..., workers: _Optional[int] = ...) -> None: ...

class ModelInfoRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ModelInfoResponse(_message.Message):
    __slots__ = ("model", "manifest_json")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    model: ModelSummary
    manifest_json: str
    def __init__(self, model: _Optional[_Union[ModelSummary, _Mapping]] = ..., manifest_json: _Optional[str] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "role", "dtype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    role: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., role: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class ModelSummary(_message.Message):
    __slots__ = ("name", "version", "sha256", "input_kind", "layers", "hidden", "input_size", "output_size", "inputs", "outputs", "input_dtype", "frame", "time_axis", "output_frame", "example_frame", "max_message_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    INPUT_KIND_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    INPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    INPUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    TIME_AXIS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FRAME_FIELD_NUMBER: _ClassVar[int]
    EXAMPLE_FRAME_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    sha256: str
    input_kind: str
    layers: int
    hidden: int
    input_size: int
    output_size: int
    inputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    outputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    input_dtype: DType
    frame: _containers.RepeatedScalarFieldContainer[int]
    time_axis: bool
    output_frame: _containers.RepeatedScalarFieldContainer[int]
    example_frame: _containers.RepeatedScalarFieldContainer[int]
    max_message_bytes: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., sha256: _Optional[str] = ..., input_kind: _Optional[str] = ..., layers: _Optional[int] = ..., hidden: _Optional[int] = ..., input_size: _Optional[int] = ..., output_size: _Optional[int] = ..., inputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., input_dtype: _Optional[_Union[DType, str]] = ..., frame: _Optional[_Iterable[int]] = ..., time_axis: _Optional[bool] = ..., output_frame: _Optional[_Iterable[int]] = ..., example_frame: _Optional[_Iterable[int]] = ..., max_message_bytes: _Optional[int] = ...) -> None: ...
