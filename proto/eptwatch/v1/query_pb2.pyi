import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from eptwatch.v1 import report_pb2 as _report_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KernelVerdict(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KERNEL_VERDICT_UNSPECIFIED: _ClassVar[KernelVerdict]
    KERNEL_VERDICT_OK: _ClassVar[KernelVerdict]
    KERNEL_VERDICT_REGRESSED: _ClassVar[KernelVerdict]
    KERNEL_VERDICT_KNOWN_BAD: _ClassVar[KernelVerdict]
    KERNEL_VERDICT_INSUFFICIENT_HOSTS: _ClassVar[KernelVerdict]
KERNEL_VERDICT_UNSPECIFIED: KernelVerdict
KERNEL_VERDICT_OK: KernelVerdict
KERNEL_VERDICT_REGRESSED: KernelVerdict
KERNEL_VERDICT_KNOWN_BAD: KernelVerdict
KERNEL_VERDICT_INSUFFICIENT_HOSTS: KernelVerdict

class Rollup(_message.Message):
    __slots__ = ("hosts", "vms", "host_huge_capacity_2m", "observed_huge_2m", "lost_huge_2m", "lost_explained_2m", "lost_unexplained_2m", "known_bug_vms", "lost_ratio", "vms_by_cause", "lost_by_cause_2m")
    class VmsByCauseEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class LostByCause2mEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    HOSTS_FIELD_NUMBER: _ClassVar[int]
    VMS_FIELD_NUMBER: _ClassVar[int]
    HOST_HUGE_CAPACITY_2M_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_HUGE_2M_FIELD_NUMBER: _ClassVar[int]
    LOST_HUGE_2M_FIELD_NUMBER: _ClassVar[int]
    LOST_EXPLAINED_2M_FIELD_NUMBER: _ClassVar[int]
    LOST_UNEXPLAINED_2M_FIELD_NUMBER: _ClassVar[int]
    KNOWN_BUG_VMS_FIELD_NUMBER: _ClassVar[int]
    LOST_RATIO_FIELD_NUMBER: _ClassVar[int]
    VMS_BY_CAUSE_FIELD_NUMBER: _ClassVar[int]
    LOST_BY_CAUSE_2M_FIELD_NUMBER: _ClassVar[int]
    hosts: int
    vms: int
    host_huge_capacity_2m: int
    observed_huge_2m: int
    lost_huge_2m: int
    lost_explained_2m: int
    lost_unexplained_2m: int
    known_bug_vms: int
    lost_ratio: float
    vms_by_cause: _containers.ScalarMap[str, int]
    lost_by_cause_2m: _containers.ScalarMap[str, int]
    def __init__(self, hosts: _Optional[int] = ..., vms: _Optional[int] = ..., host_huge_capacity_2m: _Optional[int] = ..., observed_huge_2m: _Optional[int] = ..., lost_huge_2m: _Optional[int] = ..., lost_explained_2m: _Optional[int] = ..., lost_unexplained_2m: _Optional[int] = ..., known_bug_vms: _Optional[int] = ..., lost_ratio: _Optional[float] = ..., vms_by_cause: _Optional[_Mapping[str, int]] = ..., lost_by_cause_2m: _Optional[_Mapping[str, int]] = ...) -> None: ...

class KernelRollup(_message.Message):
    __slots__ = ("kernel_release", "era", "rollup", "verdict", "regressed", "known_bad", "compared_to", "compared_lost_ratio", "evidence")
    KERNEL_RELEASE_FIELD_NUMBER: _ClassVar[int]
    ERA_FIELD_NUMBER: _ClassVar[int]
    ROLLUP_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    REGRESSED_FIELD_NUMBER: _ClassVar[int]
    KNOWN_BAD_FIELD_NUMBER: _ClassVar[int]
    COMPARED_TO_FIELD_NUMBER: _ClassVar[int]
    COMPARED_LOST_RATIO_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_FIELD_NUMBER: _ClassVar[int]
    kernel_release: str
    era: _report_pb2.PredicateEra
    rollup: Rollup
    verdict: KernelVerdict
    regressed: bool
    known_bad: bool
    compared_to: str
    compared_lost_ratio: float
    evidence: str
    def __init__(self, kernel_release: _Optional[str] = ..., era: _Optional[_Union[_report_pb2.PredicateEra, str]] = ..., rollup: _Optional[_Union[Rollup, _Mapping]] = ..., verdict: _Optional[_Union[KernelVerdict, str]] = ..., regressed: _Optional[bool] = ..., known_bad: _Optional[bool] = ..., compared_to: _Optional[str] = ..., compared_lost_ratio: _Optional[float] = ..., evidence: _Optional[str] = ...) -> None: ...

class LabelRollup(_message.Message):
    __slots__ = ("label", "value", "rollup")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    ROLLUP_FIELD_NUMBER: _ClassVar[int]
    label: str
    value: str
    rollup: Rollup
    def __init__(self, label: _Optional[str] = ..., value: _Optional[str] = ..., rollup: _Optional[_Union[Rollup, _Mapping]] = ...) -> None: ...

class HostSummary(_message.Message):
    __slots__ = ("host_id", "kernel_release", "era", "labels", "stale", "sample_time", "received", "vms", "host_huge_capacity_2m", "observed_huge_2m", "lost_huge_2m", "lost_unexplained_2m", "lost_ratio", "vms_by_cause", "agent_version", "agent_instance", "sequence", "status", "problem", "lost_by_cause_2m")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class VmsByCauseEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class LostByCause2mEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    KERNEL_RELEASE_FIELD_NUMBER: _ClassVar[int]
    ERA_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    STALE_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_TIME_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    VMS_FIELD_NUMBER: _ClassVar[int]
    HOST_HUGE_CAPACITY_2M_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_HUGE_2M_FIELD_NUMBER: _ClassVar[int]
    LOST_HUGE_2M_FIELD_NUMBER: _ClassVar[int]
    LOST_UNEXPLAINED_2M_FIELD_NUMBER: _ClassVar[int]
    LOST_RATIO_FIELD_NUMBER: _ClassVar[int]
    VMS_BY_CAUSE_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    AGENT_INSTANCE_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    LOST_BY_CAUSE_2M_FIELD_NUMBER: _ClassVar[int]
    host_id: str
    kernel_release: str
    era: _report_pb2.PredicateEra
    labels: _containers.ScalarMap[str, str]
    stale: bool
    sample_time: _timestamp_pb2.Timestamp
    received: _timestamp_pb2.Timestamp
    vms: int
    host_huge_capacity_2m: int
    observed_huge_2m: int
    lost_huge_2m: int
    lost_unexplained_2m: int
    lost_ratio: float
    vms_by_cause: _containers.ScalarMap[str, int]
    agent_version: str
    agent_instance: str
    sequence: int
    status: str
    problem: str
    lost_by_cause_2m: _containers.ScalarMap[str, int]
    def __init__(self, host_id: _Optional[str] = ..., kernel_release: _Optional[str] = ..., era: _Optional[_Union[_report_pb2.PredicateEra, str]] = ..., labels: _Optional[_Mapping[str, str]] = ..., stale: _Optional[bool] = ..., sample_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., received: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., vms: _Optional[int] = ..., host_huge_capacity_2m: _Optional[int] = ..., observed_huge_2m: _Optional[int] = ..., lost_huge_2m: _Optional[int] = ..., lost_unexplained_2m: _Optional[int] = ..., lost_ratio: _Optional[float] = ..., vms_by_cause: _Optional[_Mapping[str, int]] = ..., agent_version: _Optional[str] = ..., agent_instance: _Optional[str] = ..., sequence: _Optional[int] = ..., status: _Optional[str] = ..., problem: _Optional[str] = ..., lost_by_cause_2m: _Optional[_Mapping[str, int]] = ...) -> None: ...

class FleetSummary(_message.Message):
    __slots__ = ("generated_at", "total", "hosts_stale", "hosts_departed", "kernels", "labels", "worst_hosts", "newest_report", "oldest_fresh_report", "stale_after_seconds", "hosts_invalid")
    GENERATED_AT_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    HOSTS_STALE_FIELD_NUMBER: _ClassVar[int]
    HOSTS_DEPARTED_FIELD_NUMBER: _ClassVar[int]
    KERNELS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    WORST_HOSTS_FIELD_NUMBER: _ClassVar[int]
    NEWEST_REPORT_FIELD_NUMBER: _ClassVar[int]
    OLDEST_FRESH_REPORT_FIELD_NUMBER: _ClassVar[int]
    STALE_AFTER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    HOSTS_INVALID_FIELD_NUMBER: _ClassVar[int]
    generated_at: _timestamp_pb2.Timestamp
    total: Rollup
    hosts_stale: int
    hosts_departed: int
    kernels: _containers.RepeatedCompositeFieldContainer[KernelRollup]
    labels: _containers.RepeatedCompositeFieldContainer[LabelRollup]
    worst_hosts: _containers.RepeatedCompositeFieldContainer[HostSummary]
    newest_report: _timestamp_pb2.Timestamp
    oldest_fresh_report: _timestamp_pb2.Timestamp
    stale_after_seconds: float
    hosts_invalid: int
    def __init__(self, generated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., total: _Optional[_Union[Rollup, _Mapping]] = ..., hosts_stale: _Optional[int] = ..., hosts_departed: _Optional[int] = ..., kernels: _Optional[_Iterable[_Union[KernelRollup, _Mapping]]] = ..., labels: _Optional[_Iterable[_Union[LabelRollup, _Mapping]]] = ..., worst_hosts: _Optional[_Iterable[_Union[HostSummary, _Mapping]]] = ..., newest_report: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., oldest_fresh_report: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., stale_after_seconds: _Optional[float] = ..., hosts_invalid: _Optional[int] = ...) -> None: ...

class GetFleetRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListKernelsRequest(_message.Message):
    __slots__ = ("era", "verdict")
    ERA_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    era: str
    verdict: str
    def __init__(self, era: _Optional[str] = ..., verdict: _Optional[str] = ...) -> None: ...

class ListKernelsResponse(_message.Message):
    __slots__ = ("kernels",)
    KERNELS_FIELD_NUMBER: _ClassVar[int]
    kernels: _containers.RepeatedCompositeFieldContainer[KernelRollup]
    def __init__(self, kernels: _Optional[_Iterable[_Union[KernelRollup, _Mapping]]] = ...) -> None: ...

class ListHostsRequest(_message.Message):
    __slots__ = ("kernel_release", "labels", "status", "cause", "limit", "offset")
    KERNEL_RELEASE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CAUSE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    kernel_release: str
    labels: _containers.RepeatedScalarFieldContainer[str]
    status: str
    cause: str
    limit: int
    offset: int
    def __init__(self, kernel_release: _Optional[str] = ..., labels: _Optional[_Iterable[str]] = ..., status: _Optional[str] = ..., cause: _Optional[str] = ..., limit: _Optional[int] = ..., offset: _Optional[int] = ...) -> None: ...

class ListHostsResponse(_message.Message):
    __slots__ = ("hosts", "total")
    HOSTS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    hosts: _containers.RepeatedCompositeFieldContainer[HostSummary]
    total: int
    def __init__(self, hosts: _Optional[_Iterable[_Union[HostSummary, _Mapping]]] = ..., total: _Optional[int] = ...) -> None: ...

class GetHostRequest(_message.Message):
    __slots__ = ("host_id",)
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    host_id: str
    def __init__(self, host_id: _Optional[str] = ...) -> None: ...

class HostDetail(_message.Message):
    __slots__ = ("summary", "latest_report")
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    LATEST_REPORT_FIELD_NUMBER: _ClassVar[int]
    summary: HostSummary
    latest_report: _report_pb2.HostReport
    def __init__(self, summary: _Optional[_Union[HostSummary, _Mapping]] = ..., latest_report: _Optional[_Union[_report_pb2.HostReport, _Mapping]] = ...) -> None: ...
