"""Collector `kernel`: the running kernel's release, version and architecture (/proc/sys/kernel)."""

from __future__ import annotations

from dataclasses import dataclass

from ..hostroot import HostRoot
from ..kernel import KernelIdentity, read_kernel_identity
from ..status import SourceStatus


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
