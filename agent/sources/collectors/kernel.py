"""Collector `kernel`: the running kernel's release, version and architecture (/proc/sys/kernel)."""

from __future__ import annotations

from dataclasses import dataclass

from eptwatch.agent.sources.hostroot import HostRoot
from eptwatch.agent.sources.kernel import KernelIdentity, read_kernel_identity
from eptwatch.agent.sources.status import SourceStatus


@dataclass(frozen=True)
class KernelReading:
    kernel: KernelIdentity | None  # None: unreadable (the status says why)
    statuses: tuple[SourceStatus, ...]


class KernelCollector:
    name = "kernel"

    def __init__(self, root: HostRoot) -> None:
        self.root = root

    def collect(self) -> KernelReading:
        kernel, status = read_kernel_identity(self.root)
        return KernelReading(kernel, (status,))
