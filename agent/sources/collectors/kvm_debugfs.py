"""Collector `kvm_debugfs`: KVM's debugfs directory, its host-wide counters and the names of its
per-VM directories (`kvm/<pid>-<fd>/`, which discovery takes as VM candidates). The per-VM counters
are the `kvm_debugfs_vm` counter source's."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from eptwatch.agent.sources.hostroot import HostRoot
from eptwatch.agent.sources.kvm_debugfs import (
    CounterScope,
    KvmCounterValues,
    debugfs_kvm_dir,
    list_vm_dirs,
    read_counters,
)
from eptwatch.agent.sources.status import SourceStatus


@dataclass(frozen=True)
class KvmDebugfsReading:
    kvm_dir: Path | None  # None: no debugfs kvm/ (not mounted, kvm not loaded, lockdown)
    global_counters: KvmCounterValues | None  # summed over all VMs
    vm_dirs: tuple[tuple[int, int], ...]  # (pid, vm fd) of each per-VM directory
    statuses: tuple[SourceStatus, ...]


class KvmDebugfsCollector:
    name = "kvm_debugfs"

    def __init__(self, root: HostRoot) -> None:
        self.root = root

    def collect(self) -> KvmDebugfsReading:
        kvm_dir, status = debugfs_kvm_dir(self.root)
        if kvm_dir is None:
            return KvmDebugfsReading(None, None, (), (status,))
        global_counters, global_status = read_counters(self.root, kvm_dir, CounterScope.GLOBAL_DEBUGFS, "kvm_debugfs.global")
        return KvmDebugfsReading(kvm_dir, global_counters, tuple(list_vm_dirs(self.root, kvm_dir)), (status, global_status))
