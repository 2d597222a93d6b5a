"""Collector `discovery`: the VMs on the host (see ..discovery for how they are found).

Its status is built only once the sample is over (`discovery_status`): VMs found but not sampled
after all (exited before their first read, or dropped on a defect) are notes of discovery's too.
"""

from __future__ import annotations

from dataclasses import dataclass

from eptwatch.agent.sources.discovery import DiscoveredVm, discover_vms
from eptwatch.agent.sources.hostroot import HostRoot
from eptwatch.agent.sources.status import SourceState, SourceStatus


@dataclass(frozen=True)
class DiscoveryReading:
    vms: tuple[DiscoveredVm, ...]
    notes: tuple[str, ...]  # candidates dropped: exited, unreadable, stale


def discovery_status(notes: list[str] | tuple[str, ...]) -> SourceStatus:
    return SourceStatus("discovery", SourceState.PARTIAL if notes else SourceState.OK, "; ".join(notes))


class DiscoveryCollector:
    name = "discovery"

    def __init__(self, root: HostRoot, scan_fds: bool = True) -> None:
        self.root = root
        self.scan_fds = scan_fds

    def collect(self, debugfs_vm_dirs: tuple[tuple[int, int], ...]) -> DiscoveryReading:
        vms, notes = discover_vms(self.root, list(debugfs_vm_dirs), scan_fds=self.scan_fds)
        return DiscoveryReading(tuple(vms), tuple(notes))
