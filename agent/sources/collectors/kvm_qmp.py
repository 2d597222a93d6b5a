"""Counter source `kvm_qmp`: QEMU's QMP query-stats (see ..kvm_qmp), the counters without debugfs.

Live host only (the monitor sockets are the host's). KVM refuses its stats ioctl on a VM fd to every
process but QEMU; QEMU itself can read them for us. A monitor that failed (busy, unreachable) is left
alone for a growing number of intervals (kvm_qmp.QmpBackoff, per process).
"""

from __future__ import annotations

from eptwatch.agent.sources import kvm_qmp
from eptwatch.agent.sources.collectors.base import HostFacts, VmKey, vm_key
from eptwatch.agent.sources.collectors.kvm_counters import CounterReading
from eptwatch.agent.sources.discovery import DiscoveredVm
from eptwatch.agent.sources.hostroot import HostRoot
from eptwatch.agent.sources.status import SourceState, SourceStatus


class QmpCounters:
    name = "kvm_qmp"

    def __init__(self, root: HostRoot, enabled: bool = True, timeout_seconds: float = kvm_qmp.DEFAULT_TIMEOUT_SECONDS,
                 backoff_max_intervals: int = kvm_qmp.DEFAULT_BACKOFF_MAX_INTERVALS) -> None:
        self.root = root
        self.enabled = enabled
        self.timeout_seconds = timeout_seconds
        self.backoff_max_intervals = backoff_max_intervals
        self._backoffs: dict[VmKey, kvm_qmp.QmpBackoff] = {}

    def read(self, vm: DiscoveredVm, host: HostFacts) -> CounterReading:
        if not (self.enabled and self.root.is_live and vm.identity.is_qemu):
            return CounterReading(None, ())
        backoff = self._backoffs.get(vm_key(vm))
        if backoff is None:
            backoff = self._backoffs[vm_key(vm)] = kvm_qmp.QmpBackoff(self.backoff_max_intervals)
        if backoff.skip():
            return CounterReading(None, (SourceStatus(self.name, SourceState.UNAVAILABLE, backoff.skip_note()),))
        try:
            counters, notes = kvm_qmp.read_qmp_counters(self.root, vm.pid, self.timeout_seconds)
        except kvm_qmp.QmpUnavailable as exc:
            backoff.failed(str(exc))
            why = "; ".join(x for x in (str(exc), backoff.failure_note()) if x)
            return CounterReading(None, (SourceStatus(self.name, SourceState.UNAVAILABLE, why),))
        backoff.succeeded()
        return CounterReading(counters, (SourceStatus(self.name, SourceState.OK, "; ".join(notes), counters.path),))

    def retain(self, live: set[VmKey]) -> None:
        for key in [k for k in self._backoffs if k not in live]:
            del self._backoffs[key]
