"""Kernel identity: release, version string and architecture (/proc/sys/kernel/*)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from eptwatch.agent.sources.hostroot import HostReadError, HostRoot
from eptwatch.agent.sources.status import SourceState, SourceStatus

_RELEASE = re.compile(r"(\d+)\.(\d+)(?:\.(\d+))?(.*)", re.DOTALL)
_ARCH_IN_RELEASE = re.compile(r"[.-](x86_64|aarch64|amd64|arm64)\b")


@dataclass(frozen=True)
class KernelVersion:
    major: int
    minor: int
    patch: int
    extra: str  # everything after major.minor[.patch], e.g. "-28-amd64" or "-305.el8.x86_64"


@dataclass(frozen=True)
class KernelIdentity:
    release: str  # /proc/sys/kernel/osrelease (uname -r)
    version: str  # /proc/sys/kernel/version (uname -v)
    machine: str  # x86_64, aarch64; "" when unknown


def parse_release(release: str) -> KernelVersion | None:
    m = _RELEASE.fullmatch(release.strip())
    # A version number of more than 6 digits is no kernel's (and int() of thousands fails outright).
    if m is None or any(len(g) > 6 for g in m.groups()[:3] if g):
        return None
    return KernelVersion(int(m.group(1)), int(m.group(2)), int(m.group(3) or 0), m.group(4))


def read_kernel_identity(root: HostRoot) -> tuple[KernelIdentity | None, SourceStatus]:
    path = root.proc("sys", "kernel", "osrelease")
    try:
        release = root.read_text(path, limit=4096).strip()
    except HostReadError as exc:
        return None, SourceStatus("kernel", SourceState.ERROR, f"cannot read kernel release: {exc}", str(path))
    if parse_release(release) is None:
        return None, SourceStatus("kernel", SourceState.ERROR, f"{path}: expected a release like 5.4.0, got {release[:60]!r}", str(path))
    try:
        version = root.read_text(root.proc("sys", "kernel", "version"), limit=4096).strip()
    except HostReadError:
        version = ""
    machine = ""
    try:
        machine = root.read_text(root.proc("sys", "kernel", "arch"), limit=256).strip()  # 6.1+
    except HostReadError:
        m = _ARCH_IN_RELEASE.search(release)
        if m is not None:
            machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(m.group(1), m.group(1))
        elif root.is_live:
            machine = os.uname().machine
    return KernelIdentity(release, version, machine), SourceStatus("kernel", SourceState.OK, path=str(path))
