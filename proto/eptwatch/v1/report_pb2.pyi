import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PredicateEra(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PREDICATE_ERA_UNSPECIFIED: _ClassVar[PredicateEra]
    PREDICATE_ERA_MAPCOUNT_HEURISTIC: _ClassVar[PredicateEra]
    PREDICATE_ERA_COMPOUND_MAP_UNFIXED: _ClassVar[PredicateEra]
    PREDICATE_ERA_COMPOUND_MAP_FIXED: _ClassVar[PredicateEra]
    PREDICATE_ERA_HOST_PAGE_WALK: _ClassVar[PredicateEra]

class SourceState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SOURCE_STATE_UNSPECIFIED: _ClassVar[SourceState]
    SOURCE_STATE_OK: _ClassVar[SourceState]
    SOURCE_STATE_PARTIAL: _ClassVar[SourceState]
    SOURCE_STATE_UNAVAILABLE: _ClassVar[SourceState]
    SOURCE_STATE_ERROR: _ClassVar[SourceState]

class BackingKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BACKING_KIND_UNSPECIFIED: _ClassVar[BackingKind]
    BACKING_KIND_ANONYMOUS: _ClassVar[BackingKind]
    BACKING_KIND_SHMEM: _ClassVar[BackingKind]
    BACKING_KIND_MEMFD: _ClassVar[BackingKind]
    BACKING_KIND_HUGETLBFS: _ClassVar[BackingKind]
    BACKING_KIND_FILE: _ClassVar[BackingKind]

class SmapsMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SMAPS_MODE_UNSPECIFIED: _ClassVar[SmapsMode]
    SMAPS_MODE_FULL: _ClassVar[SmapsMode]
    SMAPS_MODE_ROLLUP: _ClassVar[SmapsMode]
    SMAPS_MODE_REUSED: _ClassVar[SmapsMode]

class CounterScope(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COUNTER_SCOPE_UNSPECIFIED: _ClassVar[CounterScope]
    COUNTER_SCOPE_PER_VM_DEBUGFS: _ClassVar[CounterScope]
    COUNTER_SCOPE_BINARY_STATS: _ClassVar[CounterScope]
    COUNTER_SCOPE_GLOBAL_DEBUGFS: _ClassVar[CounterScope]
    COUNTER_SCOPE_QMP_QUERY_STATS: _ClassVar[CounterScope]

class Cause(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CAUSE_UNSPECIFIED: _ClassVar[Cause]
    CAUSE_HEALTHY: _ClassVar[Cause]
    CAUSE_KNOWN_PAGE_CACHE_THP_BUG: _ClassVar[Cause]
    CAUSE_EXPECTED_FALSE_NEGATIVE: _ClassVar[Cause]
    CAUSE_NX_SPLIT: _ClassVar[Cause]
    CAUSE_THP_DISABLED: _ClassVar[Cause]
    CAUSE_HOST_MAPPING_NOT_HUGE: _ClassVar[Cause]
    CAUSE_UNEXPLAINED: _ClassVar[Cause]
    CAUSE_UNKNOWN: _ClassVar[Cause]
    CAUSE_IMPLAUSIBLE: _ClassVar[Cause]
PREDICATE_ERA_UNSPECIFIED: PredicateEra
PREDICATE_ERA_MAPCOUNT_HEURISTIC: PredicateEra
PREDICATE_ERA_COMPOUND_MAP_UNFIXED: PredicateEra
PREDICATE_ERA_COMPOUND_MAP_FIXED: PredicateEra
PREDICATE_ERA_HOST_PAGE_WALK: PredicateEra
SOURCE_STATE_UNSPECIFIED: SourceState
SOURCE_STATE_OK: SourceState
SOURCE_STATE_PARTIAL: SourceState
SOURCE_STATE_UNAVAILABLE: SourceState
SOURCE_STATE_ERROR: SourceState
BACKING_KIND_UNSPECIFIED: BackingKind
BACKING_KIND_ANONYMOUS: BackingKind
BACKING_KIND_SHMEM: BackingKind
BACKING_KIND_MEMFD: BackingKind
BACKING_KIND_HUGETLBFS: BackingKind
BACKING_KIND_FILE: BackingKind
SMAPS_MODE_UNSPECIFIED: SmapsMode
SMAPS_MODE_FULL: SmapsMode
SMAPS_MODE_ROLLUP: SmapsMode
SMAPS_MODE_REUSED: SmapsMode
COUNTER_SCOPE_UNSPECIFIED: CounterScope
COUNTER_SCOPE_PER_VM_DEBUGFS: CounterScope
COUNTER_SCOPE_BINARY_STATS: CounterScope
COUNTER_SCOPE_GLOBAL_DEBUGFS: CounterScope
COUNTER_SCOPE_QMP_QUERY_STATS: CounterScope
CAUSE_UNSPECIFIED: Cause
CAUSE_HEALTHY: Cause
CAUSE_KNOWN_PAGE_CACHE_THP_BUG: Cause
CAUSE_EXPECTED_FALSE_NEGATIVE: Cause
CAUSE_NX_SPLIT: Cause
CAUSE_THP_DISABLED: Cause
CAUSE_HOST_MAPPING_NOT_HUGE: Cause
CAUSE_UNEXPLAINED: Cause
CAUSE_UNKNOWN: Cause
CAUSE_IMPLAUSIBLE: Cause

class SourceStatus(_message.Message):
    __slots__ = ("source", "state", "reason", "path")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    source: str
    state: SourceState
    reason: str
    path: str
    def __init__(self, source: _Optional[str] = ..., state: _Optional[_Union[SourceState, str]] = ..., reason: _Optional[str] = ..., path: _Optional[str] = ...) -> None: ...

class KernelIdentity(_message.Message):
    __slots__ = ("release", "version", "machine", "era", "era_basis")
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MACHINE_FIELD_NUMBER: _ClassVar[int]
    ERA_FIELD_NUMBER: _ClassVar[int]
    ERA_BASIS_FIELD_NUMBER: _ClassVar[int]
    release: str
    version: str
    machine: str
    era: PredicateEra
    era_basis: str
    def __init__(self, release: _Optional[str] = ..., version: _Optional[str] = ..., machine: _Optional[str] = ..., era: _Optional[_Union[PredicateEra, str]] = ..., era_basis: _Optional[str] = ...) -> None: ...

class ThpSettings(_message.Message):
    __slots__ = ("enabled", "shmem_enabled", "defrag", "nx_huge_pages", "itlb_multihit")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    SHMEM_ENABLED_FIELD_NUMBER: _ClassVar[int]
    DEFRAG_FIELD_NUMBER: _ClassVar[int]
    NX_HUGE_PAGES_FIELD_NUMBER: _ClassVar[int]
    ITLB_MULTIHIT_FIELD_NUMBER: _ClassVar[int]
    enabled: str
    shmem_enabled: str
    defrag: str
    nx_huge_pages: str
    itlb_multihit: str
    def __init__(self, enabled: _Optional[str] = ..., shmem_enabled: _Optional[str] = ..., defrag: _Optional[str] = ..., nx_huge_pages: _Optional[str] = ..., itlb_multihit: _Optional[str] = ...) -> None: ...

class GuestRamMapping(_message.Message):
    __slots__ = ("start", "end", "path", "backing", "size_bytes", "rss_bytes", "anon_huge_bytes", "shmem_pmd_mapped_bytes", "file_pmd_mapped_bytes", "hugetlb_bytes", "pmd_aligned", "tmpfs_huge", "inode", "other_mapper_pids")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    BACKING_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    ANON_HUGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHMEM_PMD_MAPPED_BYTES_FIELD_NUMBER: _ClassVar[int]
    FILE_PMD_MAPPED_BYTES_FIELD_NUMBER: _ClassVar[int]
    HUGETLB_BYTES_FIELD_NUMBER: _ClassVar[int]
    PMD_ALIGNED_FIELD_NUMBER: _ClassVar[int]
    TMPFS_HUGE_FIELD_NUMBER: _ClassVar[int]
    INODE_FIELD_NUMBER: _ClassVar[int]
    OTHER_MAPPER_PIDS_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    path: str
    backing: BackingKind
    size_bytes: int
    rss_bytes: int
    anon_huge_bytes: int
    shmem_pmd_mapped_bytes: int
    file_pmd_mapped_bytes: int
    hugetlb_bytes: int
    pmd_aligned: bool
    tmpfs_huge: str
    inode: int
    other_mapper_pids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ..., path: _Optional[str] = ..., backing: _Optional[_Union[BackingKind, str]] = ..., size_bytes: _Optional[int] = ..., rss_bytes: _Optional[int] = ..., anon_huge_bytes: _Optional[int] = ..., shmem_pmd_mapped_bytes: _Optional[int] = ..., file_pmd_mapped_bytes: _Optional[int] = ..., hugetlb_bytes: _Optional[int] = ..., pmd_aligned: _Optional[bool] = ..., tmpfs_huge: _Optional[str] = ..., inode: _Optional[int] = ..., other_mapper_pids: _Optional[_Iterable[int]] = ...) -> None: ...

class KvmCounters(_message.Message):
    __slots__ = ("scope", "naming", "pages_4k", "pages_2m", "pages_1g", "large_pages", "nx_lpage_splits", "path")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    NAMING_FIELD_NUMBER: _ClassVar[int]
    PAGES_4K_FIELD_NUMBER: _ClassVar[int]
    PAGES_2M_FIELD_NUMBER: _ClassVar[int]
    PAGES_1G_FIELD_NUMBER: _ClassVar[int]
    LARGE_PAGES_FIELD_NUMBER: _ClassVar[int]
    NX_LPAGE_SPLITS_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    scope: CounterScope
    naming: str
    pages_4k: int
    pages_2m: int
    pages_1g: int
    large_pages: int
    nx_lpage_splits: int
    path: str
    def __init__(self, scope: _Optional[_Union[CounterScope, str]] = ..., naming: _Optional[str] = ..., pages_4k: _Optional[int] = ..., pages_2m: _Optional[int] = ..., pages_1g: _Optional[int] = ..., large_pages: _Optional[int] = ..., nx_lpage_splits: _Optional[int] = ..., path: _Optional[str] = ...) -> None: ...

class VmSample(_message.Message):
    __slots__ = ("vm_id", "name", "uuid", "pid", "pid_start_time_ticks", "vm_fds", "discovered_by", "smaps_mode", "smaps_read_cost_seconds", "guest_ram_bytes", "guest_ram", "kvm", "thp_enabled_for_process", "sources")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    PID_START_TIME_TICKS_FIELD_NUMBER: _ClassVar[int]
    VM_FDS_FIELD_NUMBER: _ClassVar[int]
    DISCOVERED_BY_FIELD_NUMBER: _ClassVar[int]
    SMAPS_MODE_FIELD_NUMBER: _ClassVar[int]
    SMAPS_READ_COST_SECONDS_FIELD_NUMBER: _ClassVar[int]
    GUEST_RAM_BYTES_FIELD_NUMBER: _ClassVar[int]
    GUEST_RAM_FIELD_NUMBER: _ClassVar[int]
    KVM_FIELD_NUMBER: _ClassVar[int]
    THP_ENABLED_FOR_PROCESS_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    vm_id: str
    name: str
    uuid: str
    pid: int
    pid_start_time_ticks: int
    vm_fds: _containers.RepeatedScalarFieldContainer[int]
    discovered_by: _containers.RepeatedScalarFieldContainer[str]
    smaps_mode: SmapsMode
    smaps_read_cost_seconds: float
    guest_ram_bytes: int
    guest_ram: _containers.RepeatedCompositeFieldContainer[GuestRamMapping]
    kvm: KvmCounters
    thp_enabled_for_process: bool
    sources: _containers.RepeatedCompositeFieldContainer[SourceStatus]
    def __init__(self, vm_id: _Optional[str] = ..., name: _Optional[str] = ..., uuid: _Optional[str] = ..., pid: _Optional[int] = ..., pid_start_time_ticks: _Optional[int] = ..., vm_fds: _Optional[_Iterable[int]] = ..., discovered_by: _Optional[_Iterable[str]] = ..., smaps_mode: _Optional[_Union[SmapsMode, str]] = ..., smaps_read_cost_seconds: _Optional[float] = ..., guest_ram_bytes: _Optional[int] = ..., guest_ram: _Optional[_Iterable[_Union[GuestRamMapping, _Mapping]]] = ..., kvm: _Optional[_Union[KvmCounters, _Mapping]] = ..., thp_enabled_for_process: _Optional[bool] = ..., sources: _Optional[_Iterable[_Union[SourceStatus, _Mapping]]] = ...) -> None: ...

class LossShare(_message.Message):
    __slots__ = ("cause", "lost_huge_2m")
    CAUSE_FIELD_NUMBER: _ClassVar[int]
    LOST_HUGE_2M_FIELD_NUMBER: _ClassVar[int]
    cause: Cause
    lost_huge_2m: int
    def __init__(self, cause: _Optional[_Union[Cause, str]] = ..., lost_huge_2m: _Optional[int] = ...) -> None: ...

class VmEstimate(_message.Message):
    __slots__ = ("vm_id", "host_huge_capacity_2m", "observed_huge_2m", "allowed_huge_2m", "lost_huge_2m", "lost_ratio", "cause", "breakdown", "uncertainty", "explanation")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    HOST_HUGE_CAPACITY_2M_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_HUGE_2M_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_HUGE_2M_FIELD_NUMBER: _ClassVar[int]
    LOST_HUGE_2M_FIELD_NUMBER: _ClassVar[int]
    LOST_RATIO_FIELD_NUMBER: _ClassVar[int]
    CAUSE_FIELD_NUMBER: _ClassVar[int]
    BREAKDOWN_FIELD_NUMBER: _ClassVar[int]
    UNCERTAINTY_FIELD_NUMBER: _ClassVar[int]
    EXPLANATION_FIELD_NUMBER: _ClassVar[int]
    vm_id: str
    host_huge_capacity_2m: int
    observed_huge_2m: int
    allowed_huge_2m: int
    lost_huge_2m: int
    lost_ratio: float
    cause: Cause
    breakdown: _containers.RepeatedCompositeFieldContainer[LossShare]
    uncertainty: _containers.RepeatedScalarFieldContainer[str]
    explanation: str
    def __init__(self, vm_id: _Optional[str] = ..., host_huge_capacity_2m: _Optional[int] = ..., observed_huge_2m: _Optional[int] = ..., allowed_huge_2m: _Optional[int] = ..., lost_huge_2m: _Optional[int] = ..., lost_ratio: _Optional[float] = ..., cause: _Optional[_Union[Cause, str]] = ..., breakdown: _Optional[_Iterable[_Union[LossShare, _Mapping]]] = ..., uncertainty: _Optional[_Iterable[str]] = ..., explanation: _Optional[str] = ...) -> None: ...

class HostReport(_message.Message):
    __slots__ = ("host_id", "labels", "agent_version", "agent_instance", "sequence", "sample_time", "kernel", "thp", "vms", "estimates", "global_kvm", "host_estimate", "sources")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    AGENT_INSTANCE_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_TIME_FIELD_NUMBER: _ClassVar[int]
    KERNEL_FIELD_NUMBER: _ClassVar[int]
    THP_FIELD_NUMBER: _ClassVar[int]
    VMS_FIELD_NUMBER: _ClassVar[int]
    ESTIMATES_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_KVM_FIELD_NUMBER: _ClassVar[int]
    HOST_ESTIMATE_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    host_id: str
    labels: _containers.ScalarMap[str, str]
    agent_version: str
    agent_instance: str
    sequence: int
    sample_time: _timestamp_pb2.Timestamp
    kernel: KernelIdentity
    thp: ThpSettings
    vms: _containers.RepeatedCompositeFieldContainer[VmSample]
    estimates: _containers.RepeatedCompositeFieldContainer[VmEstimate]
    global_kvm: KvmCounters
    host_estimate: VmEstimate
    sources: _containers.RepeatedCompositeFieldContainer[SourceStatus]
    def __init__(self, host_id: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., agent_version: _Optional[str] = ..., agent_instance: _Optional[str] = ..., sequence: _Optional[int] = ..., sample_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., kernel: _Optional[_Union[KernelIdentity, _Mapping]] = ..., thp: _Optional[_Union[ThpSettings, _Mapping]] = ..., vms: _Optional[_Iterable[_Union[VmSample, _Mapping]]] = ..., estimates: _Optional[_Iterable[_Union[VmEstimate, _Mapping]]] = ..., global_kvm: _Optional[_Union[KvmCounters, _Mapping]] = ..., host_estimate: _Optional[_Union[VmEstimate, _Mapping]] = ..., sources: _Optional[_Iterable[_Union[SourceStatus, _Mapping]]] = ...) -> None: ...
