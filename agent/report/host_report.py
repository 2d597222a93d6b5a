"""Domain objects -> the wire contract (eptwatch.v1.HostReport), and its JSON form."""

from __future__ import annotations

import json

from eptwatch.agent import __version__
from eptwatch.agent.model.predicate import Cause, Era, Estimate
from eptwatch.agent.model.sampler import HostSample, VmSample
from eptwatch.agent.sources.bounds import MAX_BYTES
from eptwatch.agent.sources.guest_ram import Backing, GuestRamMapping
from eptwatch.agent.sources.kvm_debugfs import CounterScope, KvmCounterValues
from eptwatch.agent.sources.status import SourceState, SourceStatus
from eptwatch.common.wire import message_to_dict  # re-exported: its home before eptwatch.common
from eptwatch.v1 import report_pb2 as pb

_ERA = {
    Era.UNKNOWN: pb.PREDICATE_ERA_UNSPECIFIED,
    Era.MAPCOUNT_HEURISTIC: pb.PREDICATE_ERA_MAPCOUNT_HEURISTIC,
    Era.COMPOUND_MAP_UNFIXED: pb.PREDICATE_ERA_COMPOUND_MAP_UNFIXED,
    Era.COMPOUND_MAP_FIXED: pb.PREDICATE_ERA_COMPOUND_MAP_FIXED,
    Era.HOST_PAGE_WALK: pb.PREDICATE_ERA_HOST_PAGE_WALK,
}
_STATE = {
    SourceState.OK: pb.SOURCE_STATE_OK,
    SourceState.PARTIAL: pb.SOURCE_STATE_PARTIAL,
    SourceState.UNAVAILABLE: pb.SOURCE_STATE_UNAVAILABLE,
    SourceState.ERROR: pb.SOURCE_STATE_ERROR,
}
_BACKING = {
    Backing.ANONYMOUS: pb.BACKING_KIND_ANONYMOUS,
    Backing.SHMEM: pb.BACKING_KIND_SHMEM,
    Backing.MEMFD: pb.BACKING_KIND_MEMFD,
    Backing.HUGETLBFS: pb.BACKING_KIND_HUGETLBFS,
    Backing.FILE: pb.BACKING_KIND_FILE,
}
_SCOPE = {
    CounterScope.PER_VM_DEBUGFS: pb.COUNTER_SCOPE_PER_VM_DEBUGFS,
    CounterScope.BINARY_STATS: pb.COUNTER_SCOPE_BINARY_STATS,
    CounterScope.GLOBAL_DEBUGFS: pb.COUNTER_SCOPE_GLOBAL_DEBUGFS,
    CounterScope.QMP_QUERY_STATS: pb.COUNTER_SCOPE_QMP_QUERY_STATS,
}
_SMAPS_MODE = {"full": pb.SMAPS_MODE_FULL, "rollup": pb.SMAPS_MODE_ROLLUP, "reused": pb.SMAPS_MODE_REUSED}
CAUSE_TO_PB: dict[Cause, int] = {
    Cause.HEALTHY: pb.CAUSE_HEALTHY,
    Cause.KNOWN_PAGE_CACHE_THP_BUG: pb.CAUSE_KNOWN_PAGE_CACHE_THP_BUG,
    Cause.EXPECTED_FALSE_NEGATIVE: pb.CAUSE_EXPECTED_FALSE_NEGATIVE,
    Cause.NX_SPLIT: pb.CAUSE_NX_SPLIT,
    Cause.THP_DISABLED: pb.CAUSE_THP_DISABLED,
    Cause.HOST_MAPPING_NOT_HUGE: pb.CAUSE_HOST_MAPPING_NOT_HUGE,
    Cause.UNEXPLAINED: pb.CAUSE_UNEXPLAINED,
    Cause.UNKNOWN: pb.CAUSE_UNKNOWN,
    Cause.IMPLAUSIBLE: pb.CAUSE_IMPLAUSIBLE,
}


def status_to_pb(s: SourceStatus) -> pb.SourceStatus:
    return pb.SourceStatus(source=s.source, state=_STATE[s.state], reason=s.reason, path=s.path)  # type: ignore[arg-type]


# The most each counter can be on a machine of at most bounds.MAX_BYTES of guest RAM (2^52 bytes:
# 2^40 pages of 4 KiB, 2^31 of 2 MiB, 2^22 of 1 GiB). A reading above it is not sent: the aggregator
# rejects such a report whole, and the estimate already names the reading (Cause.IMPLAUSIBLE).
WIRE_COUNTER_MAX: dict[str, int] = {
    "pages_4k": MAX_BYTES >> 12, "pages_2m": MAX_BYTES >> 21, "pages_1g": MAX_BYTES >> 30,
    "large_pages": MAX_BYTES >> 21, "nx_lpage_splits": MAX_BYTES >> 21,
}


def counters_to_pb(c: KvmCounterValues) -> pb.KvmCounters:
    msg = pb.KvmCounters(scope=_SCOPE[c.scope], naming=c.naming, path=c.path)  # type: ignore[arg-type]
    for attr, maximum in WIRE_COUNTER_MAX.items():
        value = getattr(c, attr)
        if value is not None and value <= maximum:  # absent stays absent: unknown is not 0
            setattr(msg, attr, value)
    return msg


def mapping_to_pb(m: GuestRamMapping) -> pb.GuestRamMapping:
    return pb.GuestRamMapping(
        start=m.start, end=m.end, path=m.path, backing=_BACKING[m.backing],  # type: ignore[arg-type]
        size_bytes=m.size_bytes, rss_bytes=m.rss_bytes, anon_huge_bytes=m.anon_huge_bytes,
        shmem_pmd_mapped_bytes=m.shmem_pmd_mapped_bytes, file_pmd_mapped_bytes=m.file_pmd_mapped_bytes,
        hugetlb_bytes=m.hugetlb_bytes, pmd_aligned=m.pmd_aligned, tmpfs_huge=m.tmpfs_huge or "",
        inode=m.inode, other_mapper_pids=list(m.other_mapper_pids or ()),
    )


def vm_to_pb(s: VmSample) -> pb.VmSample:
    msg = pb.VmSample(
        vm_id=s.vm.vm_id, name=s.vm.identity.name, uuid=s.vm.identity.uuid, pid=s.vm.pid,
        pid_start_time_ticks=s.vm.start_time_ticks, vm_fds=list(s.vm.vm_fds), discovered_by=list(s.vm.discovered_by),
        smaps_mode=_SMAPS_MODE[s.smaps_mode], smaps_read_cost_seconds=s.smaps_cost_seconds or 0.0,  # type: ignore[arg-type]
        guest_ram_bytes=s.guest_ram_bytes, guest_ram=[mapping_to_pb(m) for m in s.mappings],
        sources=[status_to_pb(x) for x in s.statuses],
    )
    if s.counters is not None:
        msg.kvm.CopyFrom(counters_to_pb(s.counters))
    if s.thp_enabled_for_process is not None:
        msg.thp_enabled_for_process = s.thp_enabled_for_process
    return msg


def estimate_to_pb(e: Estimate) -> pb.VmEstimate:
    msg = pb.VmEstimate(
        vm_id=e.vm_id, cause=CAUSE_TO_PB[e.cause],  # type: ignore[arg-type]
        breakdown=[pb.LossShare(cause=CAUSE_TO_PB[c], lost_huge_2m=n) for c, n in e.breakdown],  # type: ignore[arg-type]
        uncertainty=list(e.uncertainty), explanation=e.explanation,
    )
    for attr in ("host_huge_capacity_2m", "observed_huge_2m", "allowed_huge_2m", "lost_huge_2m", "lost_ratio"):
        value = getattr(e, attr)
        if value is not None:
            setattr(msg, attr, value)
    return msg


def host_report(sample: HostSample, sequence: int = 0, agent_instance: str = "", labels: dict[str, str] | None = None) -> pb.HostReport:
    msg = pb.HostReport(
        host_id=sample.host_id, labels=labels or {}, agent_version=__version__, agent_instance=agent_instance,
        sequence=sequence, vms=[vm_to_pb(v) for v in sample.vms], estimates=[estimate_to_pb(e) for e in sample.estimates],
        sources=[status_to_pb(s) for s in sample.statuses],
    )
    msg.sample_time.FromNanoseconds(int(sample.sample_time * 1e9))
    if sample.kernel is not None:
        msg.kernel.release, msg.kernel.version, msg.kernel.machine = sample.kernel.release, sample.kernel.version, sample.kernel.machine
    msg.kernel.era = _ERA[sample.era.era]  # type: ignore[assignment]
    msg.kernel.era_basis = sample.era.basis
    t = sample.thp
    msg.thp.enabled, msg.thp.shmem_enabled, msg.thp.defrag = t.enabled or "", t.shmem_enabled or "", t.defrag or ""
    msg.thp.nx_huge_pages, msg.thp.itlb_multihit = t.nx_huge_pages or "", t.itlb_multihit or ""
    if sample.global_counters is not None:
        msg.global_kvm.CopyFrom(counters_to_pb(sample.global_counters))
    if sample.host_estimate is not None:
        msg.host_estimate.CopyFrom(estimate_to_pb(sample.host_estimate))
    return msg


def report_to_json(report: pb.HostReport) -> str:
    return json.dumps(message_to_dict(report), indent=2, sort_keys=True)
