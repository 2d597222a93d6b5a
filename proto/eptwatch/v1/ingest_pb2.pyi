from eptwatch.v1 import report_pb2 as _report_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AckStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACK_STATUS_UNSPECIFIED: _ClassVar[AckStatus]
    ACK_STATUS_APPLIED: _ClassVar[AckStatus]
    ACK_STATUS_DUPLICATE: _ClassVar[AckStatus]
    ACK_STATUS_REJECTED: _ClassVar[AckStatus]
ACK_STATUS_UNSPECIFIED: AckStatus
ACK_STATUS_APPLIED: AckStatus
ACK_STATUS_DUPLICATE: AckStatus
ACK_STATUS_REJECTED: AckStatus

class AgentMessage(_message.Message):
    __slots__ = ("reports", "spool_dropped_total", "departing")
    REPORTS_FIELD_NUMBER: _ClassVar[int]
    SPOOL_DROPPED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    DEPARTING_FIELD_NUMBER: _ClassVar[int]
    reports: _containers.RepeatedCompositeFieldContainer[_report_pb2.HostReport]
    spool_dropped_total: int
    departing: bool
    def __init__(self, reports: _Optional[_Iterable[_Union[_report_pb2.HostReport, _Mapping]]] = ..., spool_dropped_total: _Optional[int] = ..., departing: _Optional[bool] = ...) -> None: ...

class ReportAck(_message.Message):
    __slots__ = ("host_id", "agent_instance", "sequence", "status", "reason", "high_water_sequence")
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_INSTANCE_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    HIGH_WATER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    host_id: str
    agent_instance: str
    sequence: int
    status: AckStatus
    reason: str
    high_water_sequence: int
    def __init__(self, host_id: _Optional[str] = ..., agent_instance: _Optional[str] = ..., sequence: _Optional[int] = ..., status: _Optional[_Union[AckStatus, str]] = ..., reason: _Optional[str] = ..., high_water_sequence: _Optional[int] = ...) -> None: ...

class ServerMessage(_message.Message):
    __slots__ = ("acks",)
    ACKS_FIELD_NUMBER: _ClassVar[int]
    acks: _containers.RepeatedCompositeFieldContainer[ReportAck]
    def __init__(self, acks: _Optional[_Iterable[_Union[ReportAck, _Mapping]]] = ...) -> None: ...
