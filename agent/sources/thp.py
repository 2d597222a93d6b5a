"""THP policy: sysfs settings, the kvm nx_huge_pages parameter, and tmpfs huge= mount options."""

from __future__ import annotations

import re
from dataclasses import dataclass

from eptwatch.agent.sources.hostroot import HostReadError, HostRoot
from eptwatch.agent.sources.status import ParseError, SourceState, SourceStatus

_BRACKETED = re.compile(r"\[([a-z_+]+)\]")


@dataclass(frozen=True)
class ThpSettings:
    enabled: str | None = None  # transparent_hugepage/enabled: always, madvise, never
    shmem_enabled: str | None = None  # always, within_size, advise, never, deny, force
    defrag: str | None = None
    nx_huge_pages: str | None = None  # /sys/module/kvm/parameters/nx_huge_pages: auto, force, off, Y, N
    itlb_multihit: str | None = None  # /sys/devices/system/cpu/vulnerabilities/itlb_multihit


def parse_bracketed(text: str, name: str) -> str:
    """"always [madvise] never" -> "madvise": the kernel marks the active choice with brackets."""
    found = _BRACKETED.findall(text)
    if len(found) != 1:
        raise ParseError(name, f"expected exactly one [selected] choice, got {text.strip()[:80]!r}")
    return str(found[0])


@dataclass(frozen=True)
class Mount:
    mount_point: str
    fstype: str
    options: tuple[str, ...]  # per-mount and per-superblock options together
    source: str

    def option(self, key: str) -> str | None:
        for opt in self.options:
            k, sep, v = opt.partition("=")
            if k == key:
                return v if sep else ""
        return None


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str, name: str) -> list[Mount]:
    """Parse /proc/PID/mountinfo (see proc(5)): "id parent maj:min root mountpoint opts [tags] - fstype source superopts"."""
    mounts: list[Mount] = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line:
            continue
        left, sep, right = line.partition(" - ")
        if not sep:
            raise ParseError(name, f"expected ' - ' separating mount fields from the filesystem type, got {line[:80]!r}", lineno)
        lf, rf = left.split(" "), right.split(" ")
        if len(lf) < 6 or len(rf) < 3:
            raise ParseError(name, f"expected at least 6 fields before ' - ' and 3 after, got {line[:80]!r}", lineno)
        options = tuple(lf[5].split(",")) + tuple(rf[2].split(","))
        mounts.append(Mount(_unescape(lf[4]), rf[0], options, _unescape(rf[1])))
    return mounts


def mount_for_path(mounts: list[Mount], path: str) -> Mount | None:
    """The mount a path lives on: the longest matching mount point, the later one when stacked."""
    best: Mount | None = None
    for m in mounts:
        mp = m.mount_point.rstrip("/") or "/"
        if path == mp or path.startswith(mp + "/") or mp == "/":
            if best is None or len(mp) >= len(best.mount_point.rstrip("/") or "/"):
                best = m
    return best


def read_thp_settings(root: HostRoot) -> tuple[ThpSettings, list[SourceStatus]]:
    statuses: list[SourceStatus] = []
    values: dict[str, str | None] = {}
    thp_dir = ("kernel", "mm", "transparent_hugepage")
    for key, parts, bracketed in (
        ("enabled", (*thp_dir, "enabled"), True),
        ("shmem_enabled", (*thp_dir, "shmem_enabled"), True),
        ("defrag", (*thp_dir, "defrag"), True),
        ("nx_huge_pages", ("module", "kvm", "parameters", "nx_huge_pages"), False),
        ("itlb_multihit", ("devices", "system", "cpu", "vulnerabilities", "itlb_multihit"), False),
    ):
        path = root.sys(*parts)
        try:
            text = root.read_text(path, limit=4096)
            values[key] = parse_bracketed(text, str(path)) if bracketed else text.strip()
        except HostReadError as exc:
            values[key] = None
            state = SourceState.UNAVAILABLE if exc.kind == "absent" else SourceState.ERROR
            statuses.append(SourceStatus(f"thp.{key}", state, str(exc), str(path)))
        except ParseError as exc:
            values[key] = None
            statuses.append(SourceStatus(f"thp.{key}", SourceState.ERROR, str(exc), str(path)))
    if not statuses:
        statuses.append(SourceStatus("thp", SourceState.OK))
    return ThpSettings(**values), statuses
