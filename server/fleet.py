"""In-memory fleet state: the latest report of every host, kept as compact summaries.

A summary keeps what rollups, alerting and the API need (kernel, era, labels, per-VM numbers and
causes), not whole reports: 100,000 hosts with 20 VMs each must fit in well under a GiB. Domain only:
nothing here knows gRPC or HTTP.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from eptwatch.v1 import report_pb2 as pb

EXPLAINED_CAUSES = frozenset({pb.CAUSE_KNOWN_PAGE_CACHE_THP_BUG, pb.CAUSE_EXPECTED_FALSE_NEGATIVE, pb.CAUSE_NX_SPLIT})


@dataclass(frozen=True, slots=True)
class VmSummary:
    vm_id: str
    capacity_2m: int | None
    observed_2m: int | None
    lost_2m: int | None
    lost_explained_2m: int  # loss the model attributes to a known cause
    lost_unexplained_2m: int
    cause: int  # pb.Cause


@dataclass(frozen=True, slots=True)
class HostSummary:
    host_id: str
    agent_instance: str
    sequence: int
    sample_time: float
    received: float
    kernel_release: str
    era: int  # pb.PredicateEra
    labels: tuple[tuple[str, str], ...]
    vms: tuple[VmSummary, ...]
    agent_version: str

    @property
    def capacity_2m(self) -> int:
        return sum(v.capacity_2m or 0 for v in self.vms if v.lost_2m is not None)

    @property
    def lost_2m(self) -> int:
        return sum(v.lost_2m or 0 for v in self.vms)


def _opt(msg: pb.VmEstimate, field: str) -> int | None:
    return int(getattr(msg, field)) if msg.HasField(field) else None


def summarise(r: pb.HostReport, received: float) -> HostSummary:
    vms = []
    for e in r.estimates:
        explained = sum(s.lost_huge_2m for s in e.breakdown if s.cause in EXPLAINED_CAUSES)
        unexplained = sum(s.lost_huge_2m for s in e.breakdown if s.cause == pb.CAUSE_UNEXPLAINED)
        vms.append(VmSummary(e.vm_id, _opt(e, "host_huge_capacity_2m"), _opt(e, "observed_huge_2m"), _opt(e, "lost_huge_2m"),
                             explained, unexplained, int(e.cause)))
    return HostSummary(
        host_id=r.host_id, agent_instance=r.agent_instance, sequence=r.sequence,
        sample_time=r.sample_time.seconds + r.sample_time.nanos / 1e9, received=received,
        kernel_release=r.kernel.release, era=int(r.kernel.era), labels=tuple(sorted(r.labels.items())),
        vms=tuple(vms), agent_version=r.agent_version,
    )


class FleetState:
    """Latest summary per host. Written from the event loop, read from HTTP threads: a reader takes
    `hosts()` (a shallow copy under a lock) and works on immutable summaries."""

    def __init__(self) -> None:
        self._hosts: dict[str, HostSummary] = {}
        self._lock = threading.Lock()

    def put(self, summary: HostSummary) -> None:
        with self._lock:
            current = self._hosts.get(summary.host_id)
            if current is None or summary.sample_time >= current.sample_time:
                self._hosts[summary.host_id] = summary

    def hosts(self) -> dict[str, HostSummary]:
        with self._lock:
            return dict(self._hosts)

    def get(self, host_id: str) -> HostSummary | None:
        with self._lock:
            return self._hosts.get(host_id)

    def __len__(self) -> int:
        return len(self._hosts)
