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
    FLOAT32: _ClassVar[DType]
    FLOAT64: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
    INT64: _ClassVar[DType]
    INT32: _ClassVar[DType]
    INT16: _ClassVar[DType]
    INT8: _ClassVar[DType]
    UINT8: _ClassVar[DType]
    BOOL: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT64: DType
FLOAT16: DType
BFLOAT16: DType
INT64: DType
INT32: DType
INT16: DType
INT8: DType
UINT8: DType
BOOL: DType

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class CurriculumState(_message.Message):
    __slots__ = ("epoch", "step", "lam", "adv_weight", "purpose", "method", "schedule", "log_density", "density_class")
    class ScheduleEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    LAM_FIELD_NUMBER: _ClassVar[int]
    ADV_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    PURPOSE_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    LOG_DENSITY_FIELD_NUMBER: _ClassVar[int]
    DENSITY_CLASS_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    step: int
    lam: float
    adv_weight: float
    purpose: str
    method: str
    schedule: _containers.ScalarMap[str, float]
    log_density: bool
    density_class: int
    def __init__(self, epoch: _Optional[int] = ..., step: _Optional[int] = ..., lam: _Optional[float] = ..., adv_weight: _Optional[float] = ..., purpose: _Optional[str] = ..., method: _Optional[str] = ..., schedule: _Optional[_Mapping[str, float]] = ..., log_density: _Optional[bool] = ..., density_class: _Optional[int] = ...) -> None: ...

class PrivacyStatus(_message.Message):
    __slots__ = ("mechanism", "epsilon_budget", "epsilon_spent", "delta", "unit")
    MECHANISM_FIELD_NUMBER: _ClassVar[int]
    EPSILON_BUDGET_FIELD_NUMBER: _ClassVar[int]
    EPSILON_SPENT_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    mechanism: str
    epsilon_budget: float
    epsilon_spent: float
    delta: float
    unit: str
    def __init__(self, mechanism: _Optional[str] = ..., epsilon_budget: _Optional[float] = ..., epsilon_spent: _Optional[float] = ..., delta: _Optional[float] = ..., unit: _Optional[str] = ...) -> None: ...

class TeacherDescription(_message.Message):
    __slots__ = ("name", "client", "model", "num_classes", "input_shape", "mean", "std", "access_modes", "has_feature_statistics", "num_samples", "label_counts", "privacy", "max_batch", "terms", "evaluates_student", "unknown_output", "log_density_output", "draws_density")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    ACCESS_MODES_FIELD_NUMBER: _ClassVar[int]
    HAS_FEATURE_STATISTICS_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    LABEL_COUNTS_FIELD_NUMBER: _ClassVar[int]
    PRIVACY_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    TERMS_FIELD_NUMBER: _ClassVar[int]
    EVALUATES_STUDENT_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    LOG_DENSITY_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    DRAWS_DENSITY_FIELD_NUMBER: _ClassVar[int]
    name: str
    client: int
    model: str
    num_classes: int
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    mean: _containers.RepeatedScalarFieldContainer[float]
    std: _containers.RepeatedScalarFieldContainer[float]
    access_modes: _containers.RepeatedScalarFieldContainer[str]
    has_feature_statistics: bool
    num_samples: int
    label_counts: _containers.RepeatedScalarFieldContainer[int]
    privacy: PrivacyStatus
    max_batch: int
    terms: _containers.RepeatedScalarFieldContainer[str]
    evaluates_student: bool
    unknown_output: bool
    log_density_output: bool
    draws_density: bool
    def __init__(self, name: _Optional[str] = ..., client: _Optional[int] = ..., model: _Optional[str] = ..., num_classes: _Optional[int] = ..., input_shape: _Optional[_Iterable[int]] = ..., mean: _Optional[_Iterable[float]] = ..., std: _Optional[_Iterable[float]] = ..., access_modes: _Optional[_Iterable[str]] = ..., has_feature_statistics: _Optional[bool] = ..., num_samples: _Optional[int] = ..., label_counts: _Optional[_Iterable[int]] = ..., privacy: _Optional[_Union[PrivacyStatus, _Mapping]] = ..., max_batch: _Optional[int] = ..., terms: _Optional[_Iterable[str]] = ..., evaluates_student: _Optional[bool] = ..., unknown_output: _Optional[bool] = ..., log_density_output: _Optional[bool] = ..., draws_density: _Optional[bool] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("inputs", "state", "bn_loss", "labels", "keep", "terms")
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    BN_LOSS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    KEEP_FIELD_NUMBER: _ClassVar[int]
    TERMS_FIELD_NUMBER: _ClassVar[int]
    inputs: Tensor
    state: CurriculumState
    bn_loss: bool
    labels: bool
    keep: bool
    terms: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, inputs: _Optional[_Union[Tensor, _Mapping]] = ..., state: _Optional[_Union[CurriculumState, _Mapping]] = ..., bn_loss: _Optional[bool] = ..., labels: _Optional[bool] = ..., keep: _Optional[bool] = ..., terms: _Optional[_Iterable[str]] = ...) -> None: ...

class ForwardReply(_message.Message):
    __slots__ = ("logits", "bn_loss", "labels", "terms")
    class TermsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    BN_LOSS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    TERMS_FIELD_NUMBER: _ClassVar[int]
    logits: Tensor
    bn_loss: float
    labels: Tensor
    terms: _containers.ScalarMap[str, float]
    def __init__(self, logits: _Optional[_Union[Tensor, _Mapping]] = ..., bn_loss: _Optional[float] = ..., labels: _Optional[_Union[Tensor, _Mapping]] = ..., terms: _Optional[_Mapping[str, float]] = ...) -> None: ...

class BackwardRequest(_message.Message):
    __slots__ = ("inputs", "grad_logits", "state", "grad_bn_loss", "forward_id", "grad_terms")
    class GradTermsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    GRAD_LOGITS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    GRAD_BN_LOSS_FIELD_NUMBER: _ClassVar[int]
    FORWARD_ID_FIELD_NUMBER: _ClassVar[int]
    GRAD_TERMS_FIELD_NUMBER: _ClassVar[int]
    inputs: Tensor
    grad_logits: Tensor
    state: CurriculumState
    grad_bn_loss: float
    forward_id: int
    grad_terms: _containers.ScalarMap[str, float]
    def __init__(self, inputs: _Optional[_Union[Tensor, _Mapping]] = ..., grad_logits: _Optional[_Union[Tensor, _Mapping]] = ..., state: _Optional[_Union[CurriculumState, _Mapping]] = ..., grad_bn_loss: _Optional[float] = ..., forward_id: _Optional[int] = ..., grad_terms: _Optional[_Mapping[str, float]] = ...) -> None: ...

class BackwardReply(_message.Message):
    __slots__ = ("grad_inputs",)
    GRAD_INPUTS_FIELD_NUMBER: _ClassVar[int]
    grad_inputs: Tensor
    def __init__(self, grad_inputs: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class DrawRequest(_message.Message):
    __slots__ = ("state", "count", "density_class", "seed")
    STATE_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    DENSITY_CLASS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    state: CurriculumState
    count: int
    density_class: int
    seed: int
    def __init__(self, state: _Optional[_Union[CurriculumState, _Mapping]] = ..., count: _Optional[int] = ..., density_class: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class DrawReply(_message.Message):
    __slots__ = ("inputs",)
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    inputs: Tensor
    def __init__(self, inputs: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class Status(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class Spent(_message.Message):
    __slots__ = ("forward_calls", "backward_calls", "samples", "bytes", "refused", "privacy", "draw_calls", "drawn_samples")
    FORWARD_CALLS_FIELD_NUMBER: _ClassVar[int]
    BACKWARD_CALLS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    PRIVACY_FIELD_NUMBER: _ClassVar[int]
    DRAW_CALLS_FIELD_NUMBER: _ClassVar[int]
    DRAWN_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    forward_calls: int
    backward_calls: int
    samples: int
    bytes: int
    refused: int
    privacy: PrivacyStatus
    draw_calls: int
    drawn_samples: int
    def __init__(self, forward_calls: _Optional[int] = ..., backward_calls: _Optional[int] = ..., samples: _Optional[int] = ..., bytes: _Optional[int] = ..., refused: _Optional[int] = ..., privacy: _Optional[_Union[PrivacyStatus, _Mapping]] = ..., draw_calls: _Optional[int] = ..., drawn_samples: _Optional[int] = ...) -> None: ...

class NamedTensor(_message.Message):
    __slots__ = ("name", "tensor")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    name: str
    tensor: Tensor
    def __init__(self, name: _Optional[str] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class EvaluateRequest(_message.Message):
    __slots__ = ("model", "args_json", "weights", "state")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ARGS_JSON_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    model: str
    args_json: str
    weights: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    state: CurriculumState
    def __init__(self, model: _Optional[str] = ..., args_json: _Optional[str] = ..., weights: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ..., state: _Optional[_Union[CurriculumState, _Mapping]] = ...) -> None: ...

class Evaluation(_message.Message):
    __slots__ = ("correct", "examples", "epsilon", "privacy")
    CORRECT_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    PRIVACY_FIELD_NUMBER: _ClassVar[int]
    correct: float
    examples: float
    epsilon: float
    privacy: PrivacyStatus
    def __init__(self, correct: _Optional[float] = ..., examples: _Optional[float] = ..., epsilon: _Optional[float] = ..., privacy: _Optional[_Union[PrivacyStatus, _Mapping]] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("session", "description", "agent_version", "max_message_bytes")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    session: str
    description: TeacherDescription
    agent_version: str
    max_message_bytes: int
    def __init__(self, session: _Optional[str] = ..., description: _Optional[_Union[TeacherDescription, _Mapping]] = ..., agent_version: _Optional[str] = ..., max_message_bytes: _Optional[int] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("session", "teacher", "max_message_bytes")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    TEACHER_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    session: str
    teacher: str
    max_message_bytes: int
    def __init__(self, session: _Optional[str] = ..., teacher: _Optional[str] = ..., max_message_bytes: _Optional[int] = ...) -> None: ...

class Goodbye(_message.Message):
    __slots__ = ("reason", "aborted")
    REASON_FIELD_NUMBER: _ClassVar[int]
    ABORTED_FIELD_NUMBER: _ClassVar[int]
    reason: str
    aborted: bool
    def __init__(self, reason: _Optional[str] = ..., aborted: _Optional[bool] = ...) -> None: ...

class HubMessage(_message.Message):
    __slots__ = ("id", "welcome", "forward", "backward", "goodbye", "evaluate", "draw")
    ID_FIELD_NUMBER: _ClassVar[int]
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    FORWARD_FIELD_NUMBER: _ClassVar[int]
    BACKWARD_FIELD_NUMBER: _ClassVar[int]
    GOODBYE_FIELD_NUMBER: _ClassVar[int]
    EVALUATE_FIELD_NUMBER: _ClassVar[int]
    DRAW_FIELD_NUMBER: _ClassVar[int]
    id: int
    welcome: Welcome
    forward: ForwardRequest
    backward: BackwardRequest
    goodbye: Goodbye
    evaluate: EvaluateRequest
    draw: DrawRequest
    def __init__(self, id: _Optional[int] = ..., welcome: _Optional[_Union[Welcome, _Mapping]] = ..., forward: _Optional[_Union[ForwardRequest, _Mapping]] = ..., backward: _Optional[_Union[BackwardRequest, _Mapping]] = ..., goodbye: _Optional[_Union[Goodbye, _Mapping]] = ..., evaluate: _Optional[_Union[EvaluateRequest, _Mapping]] = ..., draw: _Optional[_Union[DrawRequest, _Mapping]] = ...) -> None: ...

class AgentMessage(_message.Message):
    __slots__ = ("id", "hello", "forward", "backward", "error", "spent", "evaluation", "draw")
    ID_FIELD_NUMBER: _ClassVar[int]
    HELLO_FIELD_NUMBER: _ClassVar[int]
    FORWARD_FIELD_NUMBER: _ClassVar[int]
    BACKWARD_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SPENT_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    DRAW_FIELD_NUMBER: _ClassVar[int]
    id: int
    hello: Hello
    forward: ForwardReply
    backward: BackwardReply
    error: Status
    spent: Spent
    evaluation: Evaluation
    draw: DrawReply
    def __init__(self, id: _Optional[int] = ..., hello: _Optional[_Union[Hello, _Mapping]] = ..., forward: _Optional[_Union[ForwardReply, _Mapping]] = ..., backward: _Optional[_Union[BackwardReply, _Mapping]] = ..., error: _Optional[_Union[Status, _Mapping]] = ..., spent: _Optional[_Union[Spent, _Mapping]] = ..., evaluation: _Optional[_Union[Evaluation, _Mapping]] = ..., draw: _Optional[_Union[DrawReply, _Mapping]] = ...) -> None: ...
