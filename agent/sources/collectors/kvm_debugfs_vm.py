"""Counter source `kvm_debugfs.vm`: debugfs `kvm/<pid>-<fd>/`, one VM's own counters, in whichever
of the three naming eras the kernel uses (largepages <= 5.13, lpages 5.14, pages_Nx >= 5.15: the
reader in ..kvm_debugfs tells them apart)."""

from __future__ import annotations

from eptwatch.agent.sources.collectors.base import HostFacts, VmKey
from eptwatch.agent.sources.collectors.kvm_counters import CounterReading
from eptwatch.agent.sources.discovery import DiscoveredVm
from eptwatch.agent.sources.hostroot import HostRoot
from eptwatch.agent.sources.kvm_debugfs import CounterScope, read_counters
from eptwatch.agent.sources.status import SourceStatus


class DebugfsVmCounters:
    name = "kvm_debugfs.vm"

    def __init__(self, root: HostRoot) -> None:
        self.root = root

    def read(self, vm: DiscoveredVm, host: HostFacts) -> CounterReading:
        if host.kvm_dir is None:
            return CounterReading(None, ())
        statuses: list[SourceStatus] = []
        for fd in vm.vm_fds:
            d = host.kvm_dir / f"{vm.pid}-{fd}"
            if not self.root.exists(d):
                continue
            counters, status = read_counters(self.root, d, CounterScope.PER_VM_DEBUGFS, self.name)
            statuses.append(status)
            if counters is not None:
                return CounterReading(counters, tuple(statuses))
        return CounterReading(None, tuple(statuses))

    def retain(self, live: set[VmKey]) -> None:
        pass  # stateless
