"""KVM's huge-mapping counters from debugfs, in all three naming eras.

<= 5.13 `largepages`, 5.14 `lpages`, >= 5.15 `pages_4k`/`pages_2m`/`pages_1g`; NX splits as
`nx_largepages_splitted` (< 5.14) or `nx_lpage_splits`. Files directly under `kvm/` sum over all VMs;
`kvm/<pid>-<vmfd>/` holds one VM's. All are gauges of current mappings.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from pathlib import Path

from eptwatch.agent.sources.bounds import MAX_FD, MAX_PID, MAX_U64, parse_bounded, small_decimal
from eptwatch.agent.sources.hostroot import HostReadError, HostRoot
from eptwatch.agent.sources.status import ParseError, SourceState, SourceStatus

_VM_DIR = re.compile(r"(\d+)-(\d+)")
# File name -> KvmCounterValues field.
_FILES: dict[str, str] = {
    "pages_4k": "pages_4k",
    "pages_2m": "pages_2m",
    "pages_1g": "pages_1g",
    "lpages": "large_pages",
    "largepages": "large_pages",
    "nx_lpage_splits": "nx_lpage_splits",
    "nx_largepages_splitted": "nx_lpage_splits",
}


class CounterScope(enum.Enum):
    PER_VM_DEBUGFS = "per_vm_debugfs"
    # Wire value kept for old reports; no agent source makes it (KVM_GET_STATS_FD is refused outside QEMU).
    BINARY_STATS = "binary_stats"
    GLOBAL_DEBUGFS = "global_debugfs"
    QMP_QUERY_STATS = "qmp_query_stats"  # QEMU's QMP query-stats: the same binary stats, read by QEMU itself


@dataclass(frozen=True)
class KvmCounterValues:
    naming: str  # "pages_Nx" (>= 5.15), "lpages" (5.14), "largepages" (<= 5.13)
    scope: CounterScope
    pages_4k: int | None = None
    pages_2m: int | None = None
    pages_1g: int | None = None
    large_pages: int | None = None  # legacy: every huge mapping counts once
    nx_lpage_splits: int | None = None
    path: str = ""

    @property
    def has_huge_count(self) -> bool:
        return self.pages_2m is not None or self.large_pages is not None


def parse_counter(text: str, name: str) -> int:
    """One debugfs counter: a decimal u64 and a newline."""
    # A u64 is what the kernel can print; whether it is a plausible count is the model's question.
    return parse_bounded(text, name, "counter", MAX_U64)


def parse_vm_dir_name(name: str) -> tuple[int, int] | None:
    """(pid, vm fd) of a `kvm/<pid>-<fd>` directory; None for any other name or one out of range."""
    m = _VM_DIR.fullmatch(name)
    if m is None:
        return None
    pid, fd = small_decimal(m.group(1), MAX_PID), small_decimal(m.group(2), MAX_FD)
    return (pid, fd) if pid is not None and fd is not None else None


def naming_of(files: set[str]) -> str | None:
    if "pages_2m" in files or "pages_4k" in files:
        return "pages_Nx"
    if "lpages" in files:
        return "lpages"
    if "largepages" in files:
        return "largepages"
    return None


def read_counters(root: HostRoot, directory: Path, scope: CounterScope, source: str) -> tuple[KvmCounterValues | None, SourceStatus]:
    try:
        files = set(root.listdir(directory))
    except HostReadError as exc:
        state = SourceState.UNAVAILABLE if exc.kind in ("absent", "denied") else SourceState.ERROR
        return None, SourceStatus(source, state, str(exc), str(directory))
    naming = naming_of(files)
    if naming is None:
        return None, SourceStatus(source, SourceState.UNAVAILABLE, f"{directory}: no huge-mapping counter (pages_2m, lpages, largepages)", str(directory))
    values: dict[str, int] = {}
    problems: list[str] = []
    for fname, attr in _FILES.items():
        if fname not in files:
            continue
        path = directory / fname
        try:
            values[attr] = parse_counter(root.read_text(path, limit=4096), str(path))
        except HostReadError as exc:
            problems.append(str(exc))
        except ParseError as exc:
            problems.append(str(exc))
    counters = KvmCounterValues(naming=naming, scope=scope, path=str(directory), **values)
    if not counters.has_huge_count:
        reason = "; ".join(problems) or f"{directory}: huge-mapping counter unreadable"
        return None, SourceStatus(source, SourceState.ERROR, reason, str(directory))
    if problems:
        return counters, SourceStatus(source, SourceState.PARTIAL, "; ".join(problems), str(directory))
    return counters, SourceStatus(source, SourceState.OK, path=str(directory))


def debugfs_kvm_dir(root: HostRoot) -> tuple[Path | None, SourceStatus]:
    """The kvm/ directory in debugfs, or why there is none (not mounted, kvm not loaded, lockdown)."""
    kvm = root.debug("kvm")
    try:
        root.listdir(kvm)
        return kvm, SourceStatus("kvm_debugfs", SourceState.OK, path=str(kvm))
    except HostReadError as exc:
        if exc.kind == "denied":
            return None, SourceStatus("kvm_debugfs", SourceState.UNAVAILABLE, f"{kvm}: refused (lockdown, or not root)", str(kvm))
        if exc.kind != "absent":
            return None, SourceStatus("kvm_debugfs", SourceState.ERROR, str(exc), str(kvm))
    try:
        mounted = bool(root.listdir(root.debugfs))
    except HostReadError:
        mounted = False
    reason = f"{kvm}: kvm module not loaded" if mounted else f"debugfs not mounted at {root.debugfs}"
    return None, SourceStatus("kvm_debugfs", SourceState.UNAVAILABLE, reason, str(kvm))


def list_vm_dirs(root: HostRoot, kvm_dir: Path) -> list[tuple[int, int]]:
    try:
        names = root.listdir(kvm_dir)
    except HostReadError:
        return []
    return [pv for n in names if (pv := parse_vm_dir_name(n)) is not None]
