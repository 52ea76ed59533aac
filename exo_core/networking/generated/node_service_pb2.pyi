from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RequestState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REQUEST_UNKNOWN: _ClassVar[RequestState]
    REQUEST_ACTIVE: _ClassVar[RequestState]
    REQUEST_RELEASED: _ClassVar[RequestState]
    REQUEST_QUEUED: _ClassVar[RequestState]
REQUEST_UNKNOWN: RequestState
REQUEST_ACTIVE: RequestState
REQUEST_RELEASED: RequestState
REQUEST_QUEUED: RequestState

class Tensor(_message.Message):
    __slots__ = ("data", "dtype", "shape")
    DATA_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, data: _Optional[bytes] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class Shard(_message.Message):
    __slots__ = ("model_id", "start_layer", "end_layer", "n_layers")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    START_LAYER_FIELD_NUMBER: _ClassVar[int]
    END_LAYER_FIELD_NUMBER: _ClassVar[int]
    N_LAYERS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    start_layer: int
    end_layer: int
    n_layers: int
    def __init__(self, model_id: _Optional[str] = ..., start_layer: _Optional[int] = ..., end_layer: _Optional[int] = ..., n_layers: _Optional[int] = ...) -> None: ...

class PlanStage(_message.Message):
    __slots__ = ("node_id", "shard")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    shard: Shard
    def __init__(self, node_id: _Optional[str] = ..., shard: _Optional[_Union[Shard, _Mapping]] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "seed", "presence_penalty", "frequency_penalty", "top_logprobs")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    seed: int
    presence_penalty: float
    frequency_penalty: float
    top_logprobs: int
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., presence_penalty: _Optional[float] = ..., frequency_penalty: _Optional[float] = ..., top_logprobs: _Optional[int] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("request_id", "attempt", "origin", "plan", "stage_index", "sampling", "max_tokens", "eos_token_ids", "step", "start_pos", "tokens", "hidden", "messages_json", "replayed", "deliver", "constraint", "reuse_from", "more", "card_json")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    STAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    START_POS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_JSON_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    DELIVER_FIELD_NUMBER: _ClassVar[int]
    CONSTRAINT_FIELD_NUMBER: _ClassVar[int]
    REUSE_FROM_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    CARD_JSON_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    attempt: int
    origin: str
    plan: _containers.RepeatedCompositeFieldContainer[PlanStage]
    stage_index: int
    sampling: SamplingParams
    max_tokens: int
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    step: int
    start_pos: int
    tokens: Tensor
    hidden: Tensor
    messages_json: str
    replayed: _containers.RepeatedScalarFieldContainer[int]
    deliver: TokenRequest
    constraint: str
    reuse_from: str
    more: bool
    card_json: str
    def __init__(self, request_id: _Optional[str] = ..., attempt: _Optional[int] = ..., origin: _Optional[str] = ..., plan: _Optional[_Iterable[_Union[PlanStage, _Mapping]]] = ..., stage_index: _Optional[int] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., max_tokens: _Optional[int] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., step: _Optional[int] = ..., start_pos: _Optional[int] = ..., tokens: _Optional[_Union[Tensor, _Mapping]] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., messages_json: _Optional[str] = ..., replayed: _Optional[_Iterable[int]] = ..., deliver: _Optional[_Union[TokenRequest, _Mapping]] = ..., constraint: _Optional[str] = ..., reuse_from: _Optional[str] = ..., more: _Optional[bool] = ..., card_json: _Optional[str] = ...) -> None: ...

class StepReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TokenTopLogprob(_message.Message):
    __slots__ = ("token", "logprob")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    token: int
    logprob: float
    def __init__(self, token: _Optional[int] = ..., logprob: _Optional[float] = ...) -> None: ...

class TokenRequest(_message.Message):
    __slots__ = ("request_id", "attempt", "step", "token", "logprob", "top_logprobs", "finish_reason", "error", "error_code")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    attempt: int
    step: int
    token: int
    logprob: float
    top_logprobs: _containers.RepeatedCompositeFieldContainer[TokenTopLogprob]
    finish_reason: str
    error: str
    error_code: str
    def __init__(self, request_id: _Optional[str] = ..., attempt: _Optional[int] = ..., step: _Optional[int] = ..., token: _Optional[int] = ..., logprob: _Optional[float] = ..., top_logprobs: _Optional[_Iterable[_Union[TokenTopLogprob, _Mapping]]] = ..., finish_reason: _Optional[str] = ..., error: _Optional[str] = ..., error_code: _Optional[str] = ...) -> None: ...

class TokenReply(_message.Message):
    __slots__ = ("wanted",)
    WANTED_FIELD_NUMBER: _ClassVar[int]
    wanted: bool
    def __init__(self, wanted: _Optional[bool] = ...) -> None: ...

class FailureRequest(_message.Message):
    __slots__ = ("request_id", "attempt", "node_id", "reason", "code")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    attempt: int
    node_id: str
    reason: str
    code: str
    def __init__(self, request_id: _Optional[str] = ..., attempt: _Optional[int] = ..., node_id: _Optional[str] = ..., reason: _Optional[str] = ..., code: _Optional[str] = ...) -> None: ...

class FailureReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("request_id", "up_to_attempt", "keep")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    UP_TO_ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    KEEP_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    up_to_attempt: int
    keep: bool
    def __init__(self, request_id: _Optional[str] = ..., up_to_attempt: _Optional[int] = ..., keep: _Optional[bool] = ...) -> None: ...

class ReleaseReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ("request_id", "attempt")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    attempt: int
    def __init__(self, request_id: _Optional[str] = ..., attempt: _Optional[int] = ...) -> None: ...

class HealthReply(_message.Message):
    __slots__ = ("ok", "node_id", "request_state")
    OK_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_STATE_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    node_id: str
    request_state: RequestState
    def __init__(self, ok: _Optional[bool] = ..., node_id: _Optional[str] = ..., request_state: _Optional[_Union[RequestState, str]] = ...) -> None: ...

class Flops(_message.Message):
    __slots__ = ("fp32", "fp16", "int8")
    FP32_FIELD_NUMBER: _ClassVar[int]
    FP16_FIELD_NUMBER: _ClassVar[int]
    INT8_FIELD_NUMBER: _ClassVar[int]
    fp32: float
    fp16: float
    int8: float
    def __init__(self, fp32: _Optional[float] = ..., fp16: _Optional[float] = ..., int8: _Optional[float] = ...) -> None: ...

class DeviceCapabilities(_message.Message):
    __slots__ = ("model", "chip", "memory", "flops")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CHIP_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    FLOPS_FIELD_NUMBER: _ClassVar[int]
    model: str
    chip: str
    memory: int
    flops: Flops
    def __init__(self, model: _Optional[str] = ..., chip: _Optional[str] = ..., memory: _Optional[int] = ..., flops: _Optional[_Union[Flops, _Mapping]] = ...) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("node_id", "address", "port", "capabilities", "engine", "supports_sharding", "models", "active_requests", "servers", "hub_formats", "link_port")
    class ServersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    SUPPORTS_SHARDING_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    SERVERS_FIELD_NUMBER: _ClassVar[int]
    HUB_FORMATS_FIELD_NUMBER: _ClassVar[int]
    LINK_PORT_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    port: int
    capabilities: DeviceCapabilities
    engine: str
    supports_sharding: bool
    models: _containers.RepeatedScalarFieldContainer[str]
    active_requests: int
    servers: _containers.ScalarMap[str, int]
    hub_formats: _containers.RepeatedScalarFieldContainer[str]
    link_port: int
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., port: _Optional[int] = ..., capabilities: _Optional[_Union[DeviceCapabilities, _Mapping]] = ..., engine: _Optional[str] = ..., supports_sharding: _Optional[bool] = ..., models: _Optional[_Iterable[str]] = ..., active_requests: _Optional[int] = ..., servers: _Optional[_Mapping[str, int]] = ..., hub_formats: _Optional[_Iterable[str]] = ..., link_port: _Optional[int] = ...) -> None: ...

class NodeInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TextGenerationRequest(_message.Message):
    __slots__ = ("request_id", "model_id", "messages_json", "prompt", "sampling", "max_tokens", "stop", "extra_json", "delivered")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_JSON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    EXTRA_JSON_FIELD_NUMBER: _ClassVar[int]
    DELIVERED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model_id: str
    messages_json: str
    prompt: str
    sampling: SamplingParams
    max_tokens: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    extra_json: str
    delivered: str
    def __init__(self, request_id: _Optional[str] = ..., model_id: _Optional[str] = ..., messages_json: _Optional[str] = ..., prompt: _Optional[str] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., max_tokens: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., extra_json: _Optional[str] = ..., delivered: _Optional[str] = ...) -> None: ...

class ToolCall(_message.Message):
    __slots__ = ("id", "name", "arguments")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARGUMENTS_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    arguments: str
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., arguments: _Optional[str] = ...) -> None: ...

class TextDeltaReply(_message.Message):
    __slots__ = ("text", "finish_reason", "prompt_tokens", "completion_tokens", "error", "unavailable", "status", "tool_calls")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    UNAVAILABLE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALLS_FIELD_NUMBER: _ClassVar[int]
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    error: str
    unavailable: bool
    status: int
    tool_calls: _containers.RepeatedCompositeFieldContainer[ToolCall]
    def __init__(self, text: _Optional[str] = ..., finish_reason: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., error: _Optional[str] = ..., unavailable: _Optional[bool] = ..., status: _Optional[int] = ..., tool_calls: _Optional[_Iterable[_Union[ToolCall, _Mapping]]] = ...) -> None: ...
