"""What the collectors share: the key of a VM's per-process state, read errors as statuses, the
host facts per-VM collectors need, and per-collector wall time."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from eptwatch.agent.sources.discovery import DiscoveredVm
from eptwatch.agent.sources.hostroot import HostReadError
from eptwatch.agent.sources.status import SourceState, SourceStatus

# (pid, start time in clock ticks): one process, not a pid the kernel may hand to the next one.
VmKey = tuple[int, int]


def vm_key(vm: DiscoveredVm) -> VmKey:
    return (vm.pid, vm.start_time_ticks)


def status_from_read_error(source: str, exc: HostReadError) -> SourceStatus:
    state = SourceState.UNAVAILABLE if exc.kind == "absent" else SourceState.ERROR
    return SourceStatus(source, state, str(exc), str(exc.path))


@dataclass(frozen=True)
class HostFacts:
    """What the host-level collectors found that the per-VM ones need."""

    kvm_dir: Path | None  # debugfs kvm/, None when there is none
    # The running kernel's predicate (the model's era) depends on other processes mapping a guest-RAM
    # file: 169226f7e0's PageTransCompoundMap says "small" for a THP mapped elsewhere too. The model
    # decides; the collectors only learn whether to look.
    other_mappers_matter: bool


class ProcessGone(Exception):
    """The VM's process exited (or its pid now names another process) before any of its own
    /proc files was read: nothing of it was sampled, so it is a note, not a VM."""

    def __init__(self, vm: DiscoveredVm, detail: str) -> None:
        super().__init__(f"pid {vm.pid} ({', '.join(vm.discovered_by)}): {detail}")
        self.vm = vm


class Timings:
    """Wall seconds per collector in one sample, summed over VMs (node_exporter's
    scrape_collector_duration_seconds)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def add(self, collector: str, seconds: float) -> None:
        self.seconds[collector] = self.seconds.get(collector, 0.0) + seconds

    @contextmanager
    def timed(self, collector: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(collector, time.perf_counter() - t0)

    def items(self) -> tuple[tuple[str, float], ...]:
        return tuple(sorted(self.seconds.items()))
