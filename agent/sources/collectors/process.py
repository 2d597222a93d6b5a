"""Collector `process`: what one VM's process says of itself (/proc/PID/status, /proc/PID/stat).

`thp_enabled` is the first read of the process's own files in a VM's sample. When it finds the
process gone (ENOENT or ESRCH, and /proc/PID/stat confirms: gone, or its pid now another process's)
nothing of the VM was read: `ProcessGone` makes it a note, not a VM row of unknowns. `same_process`,
the last read, tells a process that exited or whose pid was reused while it was read: that VM was
partly sampled, and stays a row with the error.
"""

from __future__ import annotations

from eptwatch.agent.sources.collectors.base import ProcessGone, status_from_read_error
from eptwatch.agent.sources.discovery import DiscoveredVm, parse_stat, parse_status_thp_enabled
from eptwatch.agent.sources.hostroot import HostReadError, HostRoot
from eptwatch.agent.sources.status import ParseError, SourceState, SourceStatus

# HostReadError kinds that mean "no such process (any more)": ENOENT on open, ESRCH on a held file.
_GONE_KINDS = ("absent", "gone")


class ProcessCollector:
    name = "process"

    def __init__(self, root: HostRoot) -> None:
        self.root = root

    def thp_enabled(self, vm: DiscoveredVm) -> tuple[bool | None, tuple[SourceStatus, ...]]:
        """THP_enabled of the process (False after prctl(PR_SET_THP_DISABLE)); None if unknown.
        Raises ProcessGone if the process is gone already."""
        try:
            return parse_status_thp_enabled(self.root.read_text(self.root.proc(vm.pid, "status"), limit=65536)), ()
        except HostReadError as exc:
            if exc.kind in _GONE_KINDS:
                gone = self._gone(vm)
                if gone is not None:
                    raise ProcessGone(vm, gone) from exc
            return None, (status_from_read_error("process.status", exc),)

    def _gone(self, vm: DiscoveredVm) -> str | None:
        """Why the process discovery found is no more, or None if it still is (a status file
        missing from a tree that has the rest is that file's problem, not the process's)."""
        path = self.root.proc(vm.pid, "stat")
        try:
            _, start = parse_stat(self.root.read_text(path, limit=4096), str(path))
        except HostReadError as exc:
            return "exited before it was sampled" if exc.kind in _GONE_KINDS else None
        except ParseError:
            return None
        if start != vm.start_time_ticks:
            return f"exited before it was sampled (its pid is now another process's, start time {vm.start_time_ticks} -> {start})"
        return None

    def same_process(self, vm: DiscoveredVm) -> tuple[bool, tuple[SourceStatus, ...]]:
        """Whether the pid still names the process discovery pinned (by start time)."""
        path = self.root.proc(vm.pid, "stat")
        try:
            _, start = parse_stat(self.root.read_text(path, limit=4096), str(path))
        except (HostReadError, ParseError) as exc:
            return False, (SourceStatus("process", SourceState.ERROR, f"pid {vm.pid} exited during the sample: {exc}", str(path)),)
        if start != vm.start_time_ticks:
            return False, (SourceStatus("process", SourceState.ERROR,
                                        f"pid {vm.pid} was reused during the sample (start time {vm.start_time_ticks} -> {start}): discarded", str(path)),)
        return True, ()
