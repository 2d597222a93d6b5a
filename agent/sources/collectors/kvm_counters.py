"""Collector `kvm_counters`: one VM's huge-mapping counters from the first source that has them.

Sources are tried in order (cheapest and most direct first); each says whether it applies to the VM
at all (no status: not tried) and, if it does, how it went. A new counter source is one new file
with a class satisfying `CounterSource`, added to the chain the sampler builds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from eptwatch.agent.sources.collectors.base import HostFacts, VmKey
from eptwatch.agent.sources.discovery import DiscoveredVm
from eptwatch.agent.sources.kvm_debugfs import KvmCounterValues
from eptwatch.agent.sources.status import SourceState, SourceStatus

# The status when no source applied; the wording predates the sources' split and is kept (reports).
NO_SOURCE_REASON = "no per-VM counters (no per-VM debugfs directory, no readable VM fd)"


@dataclass(frozen=True)
class CounterReading:
    counters: KvmCounterValues | None
    statuses: tuple[SourceStatus, ...]  # empty: the source does not apply to this VM


class CounterSource(Protocol):
    name: str

    def read(self, vm: DiscoveredVm, host: HostFacts) -> CounterReading: ...

    def retain(self, live: set[VmKey]) -> None:
        """Forget per-VM state of every process not in `live` (exited, or its pid reused)."""


class KvmCountersCollector:
    name = "kvm_counters"

    def __init__(self, sources: Sequence[CounterSource]) -> None:
        self.sources = tuple(sources)

    def collect(self, vm: DiscoveredVm, host: HostFacts) -> CounterReading:
        statuses: list[SourceStatus] = []
        for source in self.sources:
            got = source.read(vm, host)
            statuses.extend(got.statuses)
            if got.counters is not None:
                return CounterReading(got.counters, tuple(statuses))
        if not statuses:
            statuses.append(SourceStatus("kvm_counters.vm", SourceState.UNAVAILABLE, NO_SOURCE_REASON))
        return CounterReading(None, tuple(statuses))

    def retain(self, live: set[VmKey]) -> None:
        for source in self.sources:
            source.retain(live)
