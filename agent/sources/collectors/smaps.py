"""Collector `smaps`: one VM's guest RAM and the host's huge pages under it (/proc/PID/smaps or
smaps_rollup, with /proc/PID/mountinfo for the backing files' filesystems).

Reading smaps walks QEMU's page tables under its mmap lock, stalling the guest's faults, so the
collector keeps an adaptive per-process budget: a full smaps read over budget switches that process to
smaps_rollup, a rollup over budget makes it skip intervals (reusing the last reading), and both say so.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from eptwatch.agent.sources.bounds import MAX_BYTES
from eptwatch.agent.sources.collectors.base import HostFacts, VmKey, status_from_read_error, vm_key
from eptwatch.agent.sources.collectors.file_mappers import FileMappers
from eptwatch.agent.sources.discovery import DiscoveredVm
from eptwatch.agent.sources.guest_ram import (
    Backing,
    GuestRamMapping,
    HostHuge,
    attribute_guest_ram,
    on_internal_shm_mount,
)
from eptwatch.agent.sources.hostroot import HostReadError, HostRoot
from eptwatch.agent.sources.smaps import LargeVmaScanner, Vma, parse_smaps_rollup
from eptwatch.agent.sources.status import ParseError, SourceState, SourceStatus
from eptwatch.agent.sources.thp import Mount, mount_for_path, parse_mountinfo

SMAPS_FULL, SMAPS_ROLLUP, SMAPS_REUSED = "full", "rollup", "reused"


@dataclass(frozen=True)
class SmapsReading:
    mode: str  # SMAPS_FULL, SMAPS_ROLLUP, or SMAPS_REUSED (the previous reading, over budget)
    cost_seconds: float | None  # CPU seconds the read cost
    mappings: tuple[GuestRamMapping, ...]  # full smaps only
    host_huge: HostHuge | None  # None: unknown
    whole_process: bool  # host_huge is smaps_rollup's whole-process total, not the guest RAM's
    statuses: tuple[SourceStatus, ...]

    def discarded(self) -> SmapsReading:
        """The same reading with its numbers dropped (they may be another process's)."""
        return replace(self, host_huge=None, mappings=(), whole_process=False)


@dataclass
class _Budget:
    mode: str = SMAPS_FULL
    skip_left: int = 0
    since_full: int = 0
    last: SmapsReading | None = None


def with_tmpfs_huge(m: GuestRamMapping, mounts: list[Mount]) -> GuestRamMapping:
    """The mapping with its tmpfs mount's huge= policy, if it is a file on a tmpfs."""
    # /dev/zero and SysV segments live on the kernel's internal shm mount, whose policy is
    # shmem_enabled: the tmpfs mounted at /dev (containers) says nothing about them.
    if m.backing is not Backing.SHMEM or not m.path.startswith("/") or on_internal_shm_mount(m):
        return m
    mount = mount_for_path(mounts, m.path)
    if mount is None or mount.fstype != "tmpfs":
        return m
    return replace(m, tmpfs_huge=mount.option("huge") or "never")  # tmpfs default is huge=never


class SmapsCollector:
    name = "smaps"

    def __init__(self, root: HostRoot, *, smaps_mode: str = "auto", guest_ram_min_bytes: int, budget_seconds: float,
                 full_retry_intervals: int, max_skip_intervals: int, check_other_mappers: bool = True,
                 cpu_clock: Callable[[], float] = time.thread_time) -> None:
        self.root = root
        self.smaps_mode = smaps_mode  # auto | full | rollup
        self.guest_ram_min_bytes = guest_ram_min_bytes
        self.budget_seconds = budget_seconds
        self.full_retry_intervals = full_retry_intervals
        self.max_skip_intervals = max_skip_intervals
        self.check_other_mappers = check_other_mappers
        self.cpu_clock = cpu_clock
        self.file_mappers = FileMappers(root)
        self._budgets: dict[VmKey, _Budget] = {}
        # Full smaps is read into one reused buffer (see scan_smaps).
        # Full smaps streams through one reused scanner and its small buffer (see scan_smaps).
        self._scanner = LargeVmaScanner()

    def begin_sample(self) -> None:
        self.file_mappers.reset()

    def retain(self, live: set[VmKey]) -> None:
        for key in [k for k in self._budgets if k not in live]:
            del self._budgets[key]  # exited or pid reused: its history no longer applies

    def _budget(self, vm: DiscoveredVm) -> _Budget:
        budget = self._budgets.get(vm_key(vm))
        if budget is None:
            budget = self._budgets[vm_key(vm)] = _Budget()
        return budget

    def reuse(self, vm: DiscoveredVm) -> SmapsReading | None:
        """The previous reading, if this process is to skip this interval (over budget)."""
        budget = self._budget(vm)
        if budget.skip_left <= 0 or budget.last is None:
            return None
        budget.skip_left -= 1
        note = f"over budget: reusing the previous sample ({budget.skip_left} more interval(s) to skip)"
        return replace(budget.last, mode=SMAPS_REUSED, statuses=(SourceStatus("smaps", SourceState.OK, note),))

    def read(self, vm: DiscoveredVm, host: HostFacts) -> SmapsReading:
        budget = self._budget(vm)
        mode = self.smaps_mode if self.smaps_mode != "auto" else budget.mode
        if mode == SMAPS_ROLLUP and self.smaps_mode == "auto" and budget.since_full >= self.full_retry_intervals:
            mode = SMAPS_FULL
        statuses: list[SourceStatus] = []
        host_huge: HostHuge | None = None
        mappings: tuple[GuestRamMapping, ...] = ()
        whole_process = False
        t0 = self.cpu_clock()
        if mode == SMAPS_ROLLUP:
            host_huge, read_ok = self._read_rollup(vm, statuses)
            whole_process = host_huge is not None
            if not read_ok:  # kernel before 4.14: no smaps_rollup, full smaps is all there is
                mode = SMAPS_FULL
        if mode == SMAPS_FULL:
            found = self._read_full(vm, host.other_mappers_matter, statuses)
            if found is not None:
                mappings = tuple(found)
                host_huge = HostHuge.from_mappings(mappings)
        cost = self.cpu_clock() - t0
        return SmapsReading(mode, cost, mappings, host_huge, whole_process, tuple(statuses))

    def finish(self, vm: DiscoveredVm, reading: SmapsReading) -> tuple[SourceStatus, ...]:
        """Keep `reading` (numbers dropped if the process changed) for reuse, and adapt the
        process's budget to its cost; the statuses say when that changes what the next sample reads."""
        budget = self._budget(vm)
        budget.last = reading
        cost = reading.cost_seconds if reading.cost_seconds is not None else 0.0
        limit = self.budget_seconds
        if self.smaps_mode != "auto":
            return ()
        if reading.mode == SMAPS_FULL:
            budget.since_full = 0
            if cost > limit:
                budget.mode = SMAPS_ROLLUP
                return (SourceStatus("smaps.budget", SourceState.OK, f"full smaps cost {cost:.3f} s CPU > budget {limit:.3f} s: using smaps_rollup next"),)
            budget.mode = SMAPS_FULL
            return ()
        budget.since_full += 1
        if cost > limit:
            budget.skip_left = min(self.max_skip_intervals, math.ceil(cost / limit) - 1) if limit > 0 else self.max_skip_intervals
            return (SourceStatus("smaps.budget", SourceState.OK, f"smaps_rollup cost {cost:.3f} s CPU > budget {limit:.3f} s: skipping {budget.skip_left} interval(s)"),)
        return ()

    def _read_rollup(self, vm: DiscoveredVm, statuses: list[SourceStatus]) -> tuple[HostHuge | None, bool]:
        path = self.root.proc(vm.pid, "smaps_rollup")
        try:
            r = parse_smaps_rollup(self.root.read_text(path), str(path))
        except HostReadError as exc:
            if exc.kind == "absent":
                return None, False
            statuses.append(status_from_read_error("smaps", exc))
            return None, True
        except ParseError as exc:
            statuses.append(SourceStatus("smaps", SourceState.ERROR, str(exc), str(path)))
            return None, True
        statuses.append(SourceStatus("smaps", SourceState.OK, "smaps_rollup: whole-process totals", str(path)))
        huge = HostHuge(
            anon_thp_2m=(r.anon_huge_bytes or 0) >> 21,
            shmem_thp_2m=(r.shmem_pmd_mapped_bytes or 0) >> 21,
            file_thp_2m=(r.file_pmd_mapped_bytes or 0) >> 21,
            hugetlb_2m=r.hugetlb_bytes >> 21,
            hugetlb_1g_bytes=0,
            resident_bytes=(r.rss_bytes or 0) + r.hugetlb_bytes,
        )
        return huge, True

    def _read_full(self, vm: DiscoveredVm, other_mappers_matter: bool, statuses: list[SourceStatus]) -> list[GuestRamMapping] | None:
        path = self.root.proc(vm.pid, "smaps")
        try:
            vmas = self.scan_smaps(path)
        except HostReadError as exc:
            statuses.append(status_from_read_error("smaps", exc))
            return None
        except ParseError as exc:
            statuses.append(SourceStatus("smaps", SourceState.ERROR, str(exc), str(path)))
            return None
        mounts = self._mounts(vm, statuses)

        def fstype(p: str) -> str | None:
            m = mount_for_path(mounts, p) if mounts else None
            return m.fstype if m is not None else None

        mappings = attribute_guest_ram(vmas, fstype, self.guest_ram_min_bytes)
        guest_ram_bytes = sum(m.size_bytes for m in mappings)
        if guest_ram_bytes > MAX_BYTES:
            # Each field is bounded by the parser; their sum can still be no machine's memory.
            statuses.append(SourceStatus("smaps", SourceState.ERROR,
                                         f"guest RAM mappings total {guest_ram_bytes} bytes, above {MAX_BYTES}: implausible, not used", str(path)))
            return None
        mappings = [with_tmpfs_huge(m, mounts) for m in mappings]
        if self.check_other_mappers and other_mappers_matter:
            mappings = self._with_other_mappers(vm.pid, mappings)
        statuses.append(SourceStatus("smaps", SourceState.OK, f"{len(mappings)} guest-RAM mapping(s)", str(path)))
        return mappings

    def scan_smaps(self, path: Path) -> list[Vma]:
        """The VMAs of one process's smaps big enough to be guest RAM, each parsed strictly (see
        smaps.scan_large_vmas). Raises HostReadError or ParseError.

        The file (megabytes for a big QEMU) is read in chunks into the scanner's small reused buffer and
        each chunk is scanned while it is in cache; the file is never held whole. bench/smaps_cost.py
        measures this function against `cat`."""
        self._scanner.start(str(path), self.guest_ram_min_bytes)
        self.root.read_bytes(path, into=self._scanner)
        return self._scanner.finish()

    def _mounts(self, vm: DiscoveredVm, statuses: list[SourceStatus]) -> list[Mount]:
        path = self.root.proc(vm.pid, "mountinfo")
        try:
            return parse_mountinfo(self.root.read_text(path, limit=16 * 1024 * 1024), str(path))
        except HostReadError as exc:
            statuses.append(status_from_read_error("mountinfo", exc))
        except ParseError as exc:
            statuses.append(SourceStatus("mountinfo", SourceState.ERROR, str(exc), str(path)))
        return []

    def _with_other_mappers(self, pid: int, mappings: list[GuestRamMapping]) -> list[GuestRamMapping]:
        """Other processes mapping the same guest-RAM file make 169226f7e0's predicate say "small"."""
        wanted = {(m.dev, m.inode) for m in mappings if m.backing in (Backing.SHMEM, Backing.MEMFD, Backing.FILE) and m.inode}
        if not wanted:
            return mappings
        index = self.file_mappers.index()
        found = {k: index.get(k, set()) - {pid} for k in wanted}
        return [replace(m, other_mapper_pids=tuple(sorted(found.get((m.dev, m.inode), ())))) if (m.dev, m.inode) in found else m for m in mappings]
