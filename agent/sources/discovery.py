"""VM discovery: the union of QEMU pids named by KVM's per-VM debugfs directories, processes holding
an `anon_inode:kvm-vm` fd, and processes whose comm/cmdline is QEMU. Identity from QEMU's command line.

Pids are reused: each process is pinned by its start time (/proc/PID/stat field 22) so a sample can
tell "the same VM" from "a new process that got the old pid".
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from eptwatch.agent.sources.bounds import MAX_BYTES, MAX_FD, MAX_PID, MAX_U64, parse_bounded, small_decimal
from eptwatch.agent.sources.hostroot import HostReadError, HostRoot
from eptwatch.agent.sources.status import ParseError

KVM_VM_FD_LINK = "anon_inode:kvm-vm"
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)[bB]?")
_SUFFIX = {"": 1024 * 1024, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}  # QEMU's -m defaults to MiB


@dataclass(frozen=True)
class QemuIdentity:
    name: str = ""  # -name guest=X or -name X
    uuid: str = ""  # -uuid
    memory_bytes: int | None = None  # -m
    is_qemu: bool = False


@dataclass(frozen=True)
class DiscoveredVm:
    pid: int
    start_time_ticks: int
    comm: str
    identity: QemuIdentity
    vm_fds: tuple[int, ...] = ()
    discovered_by: tuple[str, ...] = ()

    @property
    def vm_id(self) -> str:
        return self.identity.uuid or self.identity.name or f"pid-{self.pid}"


def split_qemu_opts(value: str) -> list[str]:
    """QEMU option strings separate with ',' and escape a literal comma as ',,'."""
    parts, cur, i = [], [], 0
    while i < len(value):
        ch = value[i]
        if ch == ",":
            if i + 1 < len(value) and value[i + 1] == ",":
                cur.append(",")
                i += 2
                continue
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    parts.append("".join(cur))
    return parts


def _parse_size(text: str, default_suffix: str = "") -> int | None:
    """QEMU's -m size in bytes; None when it is not a size at all. A size beyond MAX_BYTES (a
    400-digit -m, which float() makes inf) is a ParseError: the process is not sampled."""
    m = _SIZE.fullmatch(text.strip())
    if m is None:
        return None
    suffix = (m.group(2) or default_suffix).lower()
    whole = m.group(1).split(".", 1)[0].lstrip("0")
    if len(whole) > len(str(MAX_BYTES)):
        raise ParseError("cmdline", f"-m {text[:20]!r}...: a {len(whole)}-digit memory size is out of range")
    value = int(float(m.group(1)) * _SUFFIX[suffix])
    if value > MAX_BYTES:
        raise ParseError("cmdline", f"-m {text[:40]!r}: {value} bytes is out of range (at most {MAX_BYTES})")
    return value


def parse_cmdline(raw: bytes) -> list[str]:
    """/proc/PID/cmdline: NUL-separated argv (a trailing NUL; empty for kernel threads)."""
    text = raw.decode("utf-8", errors="replace")
    args = text.split("\0")
    if args and args[-1] == "":
        args.pop()
    return args


def _is_qemu(comm: str, argv: list[str]) -> bool:
    exe = argv[0].rsplit("/", 1)[-1] if argv else ""
    return comm.startswith(("qemu-system", "qemu-kvm", "kvm")) or exe.startswith(("qemu-system", "qemu-kvm"))


def parse_qemu_identity(argv: list[str], comm: str = "") -> QemuIdentity:
    """Name, uuid and -m of a QEMU command line. Raises ParseError for a -m out of range."""
    name = uuid = ""
    memory: int | None = None
    it = iter(range(len(argv)))
    for i in it:
        arg = argv[i]
        opt = arg[1:] if arg.startswith("--") else arg
        value = argv[i + 1] if i + 1 < len(argv) else None
        if opt in ("-name", "-uuid", "-m") and value is None:
            break
        if opt == "-name" and value is not None:
            for j, part in enumerate(split_qemu_opts(value)):
                k, sep, v = part.partition("=")
                if sep and k == "guest":
                    name = v
                elif not sep and j == 0:
                    name = part
            next(it, None)
        elif opt == "-uuid" and value is not None:
            uuid = value.strip().lower()
            next(it, None)
        elif opt == "-m" and value is not None:
            for j, part in enumerate(split_qemu_opts(value)):
                k, sep, v = part.partition("=")
                if sep and k == "size":
                    memory = _parse_size(v)
                elif not sep and j == 0:
                    memory = _parse_size(part)
            next(it, None)
    return QemuIdentity(name=name, uuid=uuid, memory_bytes=memory, is_qemu=_is_qemu(comm, argv))


def parse_stat(text: str, name: str) -> tuple[str, int]:
    """(comm, starttime in clock ticks) from /proc/PID/stat. comm may hold spaces and ')'."""
    open_paren, close_paren = text.find("("), text.rfind(")")
    if open_paren < 0 or close_paren < open_paren:
        raise ParseError(name, f"expected 'pid (comm) state ...', got {text[:60]!r}")
    rest = text[close_paren + 2 :].split()
    # rest[0] is field 3 (state); starttime is field 22.
    if len(rest) < 20 or not rest[19].isdigit():
        raise ParseError(name, f"expected at least 22 fields with a numeric starttime, got {len(rest) + 2}")
    return text[open_paren + 1 : close_paren], parse_bounded(rest[19], name, "starttime", MAX_U64)


def parse_status_thp_enabled(text: str) -> bool | None:
    """THP_enabled from /proc/PID/status (5.0+): 0 after prctl(PR_SET_THP_DISABLE)."""
    for line in text.split("\n"):
        if line.startswith("THP_enabled:"):
            v = line.split(":", 1)[1].strip()
            return {"1": True, "0": False}.get(v)
    return None


def _numeric_dirs(root: HostRoot) -> list[int]:
    # A name of digits beyond pid_max is not a process the kernel made: skipped.
    return sorted(pid for n in root.listdir(root.procfs) if (pid := small_decimal(n, MAX_PID)) is not None)


def vm_fds_of(root: HostRoot, pid: int) -> list[int]:
    """fds of `pid` that are KVM VM fds. Racing with exit or close: whatever vanished is skipped.
    One confined open of the fd directory, then a plain readlinkat per fd (HostRoot.readlinks)."""
    try:
        links = root.readlinks(root.proc(pid, "fd"))
    except HostReadError:
        return []
    return sorted(fd for name, target in links if target == KVM_VM_FD_LINK and (fd := small_decimal(name, MAX_FD)) is not None)


# comm (at most 15 characters) or argv[0] of a process that may be a VMM: only these, and the pids
# KVM's debugfs names, have their fds looked at. A host has thousands of fds, nearly all in processes
# that are no VMM; reading every fd link cost more than the whole smaps scan of a VM.
_VMM_NAMES = ("qemu-system", "qemu-kvm", "kvm", "firecracker", "cloud-hyperviso", "crosvm", "lkvm")


def _vmm_kind(root: HostRoot, pid: int, comm: str) -> str | None:
    """"qemu" for a process named QEMU by comm or argv[0] (QEMU's `-name ...,process=X` renames comm,
    not argv), "vmm" for another name in _VMM_NAMES (found only if it holds a VM fd), else None.
    comm first (one small read); cmdline only when comm does not settle it."""
    if comm.startswith(("qemu-system", "qemu-kvm")):
        return "qemu"
    try:
        raw = root.read_bytes(root.proc(pid, "cmdline"), limit=4096)
    except HostReadError:
        raw = b""
    exe = raw.split(b"\0", 1)[0].rsplit(b"/", 1)[-1]
    if exe.startswith((b"qemu-system", b"qemu-kvm")):
        return "qemu"
    return "vmm" if comm.startswith(_VMM_NAMES) else None


@dataclass
class _Candidate:
    by: set[str] = field(default_factory=set)
    fds: set[int] = field(default_factory=set)


def discover_vms(root: HostRoot, debugfs_vm_dirs: list[tuple[int, int]], scan_fds: bool = True) -> tuple[list[DiscoveredVm], list[str]]:
    """Return the VMs found and notes about candidates dropped (exited, unreadable, stale).

    Cost grows with the number of processes (one comm read each, a cmdline read for those whose comm
    is not a VMM's) and with the fds of VMM processes, not with every fd on the host."""
    candidates: dict[int, _Candidate] = {}
    notes: list[str] = []
    for pid, fd in debugfs_vm_dirs:
        if not (0 < pid <= MAX_PID and 0 <= fd <= MAX_FD):
            notes.append(f"debugfs kvm/{pid}-{fd}: pid or fd out of range, ignored")
            continue
        c = candidates.setdefault(pid, _Candidate())
        c.by.add("debugfs")
        c.fds.add(fd)
    try:
        pids = _numeric_dirs(root)
    except HostReadError as exc:
        notes.append(f"cannot list processes: {exc}")
        pids = []
    for pid in pids:
        named = pid in candidates  # by debugfs
        kind: str | None = None
        if not named:
            try:
                comm = root.read_text(root.proc(pid, "comm"), limit=256).strip()
            except HostReadError:
                continue  # exited (or unreadable) and named by nothing else
            kind = _vmm_kind(root, pid, comm)
            if kind is None:
                continue
        if scan_fds:
            fds = vm_fds_of(root, pid)
            if fds:
                c = candidates.setdefault(pid, _Candidate())
                c.by.add("vm_fd")
                c.fds.update(fds)
        if not named and kind == "qemu" and pid not in candidates:
            candidates.setdefault(pid, _Candidate()).by.add("cmdline")  # by name alone
    found: list[DiscoveredVm] = []
    for pid in sorted(candidates):
        c = candidates[pid]
        try:
            stat_path = root.proc(pid, "stat")
            comm, start = parse_stat(root.read_text(stat_path, limit=4096), str(stat_path))
            argv = parse_cmdline(root.read_bytes(root.proc(pid, "cmdline"), limit=1024 * 1024))
        except HostReadError as exc:
            notes.append(f"pid {pid} ({', '.join(sorted(c.by))}): {'exited' if exc.kind in ('absent', 'gone') else exc}")
            continue
        except ParseError as exc:
            notes.append(f"pid {pid}: {exc}")
            continue
        try:
            identity = parse_qemu_identity(argv, comm)
        except ParseError as exc:
            # One process with an absurd command line (any local user can start one named qemu-system-x86)
            # costs only itself: dropped with a note, the other VMs are still sampled.
            notes.append(f"pid {pid}: dropped: {exc}")
            continue
        by = set(c.by)
        if identity.is_qemu:
            by.add("cmdline")
        if by == {"cmdline"} and not argv:
            continue  # a zombie or kernel thread that only looks like QEMU by name
        found.append(DiscoveredVm(pid, start, comm, identity, tuple(sorted(c.fds)), tuple(sorted(by))))
    return found, notes
