from . import node_service_pb2 as _node_service_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LinkMessage(_message.Message):
    __slots__ = ("id", "step", "token", "failure", "release", "health", "ack", "posted")
    ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    POSTED_FIELD_NUMBER: _ClassVar[int]
    id: int
    step: _node_service_pb2.StepRequest
    token: _node_service_pb2.TokenRequest
    failure: _node_service_pb2.FailureRequest
    release: _node_service_pb2.ReleaseRequest
    health: _node_service_pb2.HealthRequest
    ack: LinkAck
    posted: bool
    def __init__(self, id: _Optional[int] = ..., step: _Optional[_Union[_node_service_pb2.StepRequest, _Mapping]] = ..., token: _Optional[_Union[_node_service_pb2.TokenRequest, _Mapping]] = ..., failure: _Optional[_Union[_node_service_pb2.FailureRequest, _Mapping]] = ..., release: _Optional[_Union[_node_service_pb2.ReleaseRequest, _Mapping]] = ..., health: _Optional[_Union[_node_service_pb2.HealthRequest, _Mapping]] = ..., ack: _Optional[_Union[LinkAck, _Mapping]] = ..., posted: _Optional[bool] = ...) -> None: ...

class LinkAck(_message.Message):
    __slots__ = ("error", "wanted", "health")
    ERROR_FIELD_NUMBER: _ClassVar[int]
    WANTED_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    error: str
    wanted: bool
    health: _node_service_pb2.HealthReply
    def __init__(self, error: _Optional[str] = ..., wanted: _Optional[bool] = ..., health: _Optional[_Union[_node_service_pb2.HealthReply, _Mapping]] = ...) -> None: ...
