"""Read a VM's KVM statistics through the binary statistics interface.

Why this exists
---------------
eptwatch normally reads per-VM MMU counters (``pages_4k``, ``pages_2m``,
``pages_1g``, ``nx_lpage_splits``) from ``/sys/kernel/debug/kvm``.  Many hosts
have no debugfs mounted, or refuse it under kernel lockdown.  Since Linux 5.14
every VM (and vCPU) fd answers ``ioctl(KVM_GET_STATS_FD)`` with a new read-only
fd whose content is a self-describing binary blob (Documentation/virt/kvm/
api.rst, "KVM_GET_STATS_FD").  This module obtains such a stats fd, either
from the process that holds the VM (a VMM such as QEMU or Firecracker) or
through ``KVM_GET_STATS_FD`` when the caller owns the VM, and decodes it.

How the stats are obtained
--------------------------
1. ``find_vm_fds(proc_root, pid)`` lists the fds of ``pid`` whose
   ``/proc/<pid>/fd/<n>`` link reads ``anon_inode:kvm-vm``.
   ``find_vm_stats_fds`` does the same for ``anon_inode:kvm-vm-stats``, the
   stats fds a VMM may already hold.  Whether a VMM keeps one open, and for
   how long, depends on the VMM.
2. ``read_vm_binary_stats(pid, fd)`` calls ``pidfd_open(pid)`` (Linux 5.3)
   and ``pidfd_getfd(pidfd, fd, 0)`` (Linux 5.6) to duplicate the target's fd
   into this process.  ``pidfd_getfd`` requires ptrace-attach rights over the
   target (in practice CAP_SYS_PTRACE, subject to Yama and LSMs).  For a VM
   stats fd it reads the duplicate directly.  For a VM fd it first issues
   ``KVM_GET_STATS_FD``.  Either way it reads with ``pread`` from offset 0
   until EOF, which leaves the shared file position alone, and closes every fd
   it opened.  Failures become ``KvmStatsUnavailable`` with a short, stable
   ``reason``.

IMPORTANT: KVM serves VM ioctls only to the VM's own process.
``kvm_vm_ioctl()`` begins with ``if (kvm->mm != current->mm || kvm->vm_dead)
return -EIO;`` (virt/kvm/kvm_main.c).  So ``KVM_GET_STATS_FD`` on a VM fd
duplicated from another process (a VMM) *always* fails with EIO, whatever our
privileges; that case is reported as REASON_FOREIGN_VM.  Reading an existing
``kvm-vm-stats`` fd has no such check and works across processes.  The VM-fd
path is therefore useful only when the caller owns the VM (the agent itself,
or tests).  For real VMMs, the VMM has to hold a stats fd, or debugfs is
needed.

Blob layout (include/uapi/linux/kvm.h, native byte order)
--------------------------------------------------------
::

    struct kvm_stats_header {          /* at offset 0, 24 bytes */
        __u32 flags;                   /* currently always 0 */
        __u32 name_size;               /* KVM_STATS_NAME_SIZE, 48 today */
        __u32 num_desc;
        __u32 id_offset;               /* name_size bytes, e.g. "kvm-1234" */
        __u32 desc_offset;             /* num_desc descriptors */
        __u32 data_offset;             /* base for kvm_stats_desc.offset */
    };
    struct kvm_stats_desc {            /* 16 + name_size bytes each */
        __u32 flags;                   /* type | unit | base, see below */
        __s16 exponent;                /* value * base**exponent = unit */
        __u16 size;                    /* number of __u64 values */
        __u32 offset;                  /* bytes from data_offset */
        __u32 bucket_size;             /* linear histograms only */
        char  name[name_size];         /* NUL-terminated */
    };

Descriptor flags: bits 0-3 are the type (cumulative, instant, peak,
linear_hist, log_hist), bits 4-7 the unit (none, bytes, seconds, cycles,
boolean), and bits 8-11 the base (pow10, pow2).

``parse_kvm_stats`` is pure and defensive.  The blob is kernel data, but it can
come from a kernel newer than this code, or from a test or fuzzer.  Any
inconsistency therefore raises ``KvmStatsFormatError`` (a ``ValueError``) and
never ``IndexError``/``struct.error``, and the parser never returns a value
taken from the wrong bytes.

Kernel versions: the binary stats interface needs 5.14+.  On x86 the
``pages_4k``/``pages_2m``/``pages_1g`` stats replaced ``lpages`` in 5.15, so a
5.14 kernel only offers ``lpages`` (2M and 1G mappings combined).
``to_counters`` reports the per-size counters as ``None`` in that case,
rather than guessing how to split ``lpages``.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import os
import platform
import struct
import types
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

__all__ = [
    "COUNTER_NAMES",
    "KVM_GET_STATS_FD",
    "KvmBinaryStats",
    "KvmStatsFormatError",
    "KvmStatsUnavailable",
    "StatDescriptor",
    "find_vm_fds",
    "find_vm_stats_fds",
    "parse_kvm_stats",
    "read_stats_blob",
    "read_vm_binary_stats",
    "to_counters",
]

# --- uapi constants -----------------------------------------------------------

KVM_GET_STATS_FD = 0xAECE  # _IO(KVMIO=0xAE, 0xce)

STATS_TYPE_MASK = 0xF
STATS_UNIT_SHIFT = 4
STATS_UNIT_MASK = 0xF << STATS_UNIT_SHIFT
STATS_BASE_SHIFT = 8
STATS_BASE_MASK = 0xF << STATS_BASE_SHIFT

TYPE_NAMES: tuple[str, ...] = ("cumulative", "instant", "peak", "linear_hist", "log_hist")
UNIT_NAMES: tuple[str, ...] = ("none", "bytes", "seconds", "cycles", "boolean")
BASE_NAMES: tuple[str, ...] = ("pow10", "pow2")

# "=" means native byte order with standard sizes and no padding.  The kernel
# writes host-endian structs, and both structs are packed (no implicit padding).
_HEADER = struct.Struct("=6I")
_DESC_FIXED = struct.Struct("=IhHII")
_U64 = 8

# --- sanity limits ------------------------------------------------------------
# These reject corrupt input before it can make us allocate or loop without
# bound.  They sit far above anything a real kernel emits: name_size is 48,
# there are about 50 descriptors per vCPU, and the largest histograms have
# 32 buckets.
MAX_NUM_DESC = 4096
MAX_NAME_SIZE = 1024
MAX_STAT_SIZE = 4096  # u64 values in a single descriptor
MAX_BLOB_BYTES = 16 << 20  # reader stops here; a real blob is a few KiB

_READ_CHUNK = 64 << 10  # one pread normally returns the whole blob

# The counters eptwatch exports, in order.
COUNTER_NAMES: tuple[str, ...] = ("pages_4k", "pages_2m", "pages_1g", "nx_lpage_splits")

# /proc/<pid>/fd/<n> link texts (anon_inode_getfile names in kvm_main.c).  vCPU
# fds ("anon_inode:kvm-vcpu:N") and vCPU stats fds
# ("anon_inode:kvm-vcpu-stats:N") must match neither of these.
_VM_FD_LINK = "anon_inode:kvm-vm"
_VM_STATS_FD_LINK = "anon_inode:kvm-vm-stats"


# --- errors -------------------------------------------------------------------


class KvmStatsFormatError(ValueError):
    """The stats blob is malformed; the message names the source and the defect."""


# Stable reason strings.  Callers may compare against these constants; the
# human-oriented specifics go in ``detail``.
REASON_PROCESS_GONE = "process gone"
REASON_PERMISSION = "permission denied: needs CAP_SYS_PTRACE / ptrace access to the process"
REASON_NOT_KVM_VM_FD = "not a KVM VM fd"
# KVM answers every VM ioctl from outside the VM's mm with EIO (see module doc).
REASON_FOREIGN_VM = "VM ioctl refused outside the VM's owner process"
REASON_FD_GONE = "fd not open in target process"
REASON_KERNEL_TOO_OLD = "kernel too old"
REASON_INVALID_PID = "invalid pid"
REASON_FD_LIMIT = "out of file descriptors"
REASON_UNSUPPORTED_ARCH = "unsupported architecture"
REASON_READ_FAILED = "read failed"
REASON_UNEXPECTED = "unexpected error"


class KvmStatsUnavailable(Exception):
    """Stats could not be obtained for an operational reason, not a format one.

    Attributes: ``reason`` (one of the REASON_* strings), ``detail`` (free-form
    text naming the failing step), ``pid``, ``fd`` (the fd number in the target
    process), and ``errno`` (None when no syscall error was involved).

    This is not a dataclass: a frozen dataclass cannot be raised, because
    raising assigns ``__traceback__``.
    """

    def __init__(
        self,
        reason: str,
        detail: str,
        *,
        pid: int | None = None,
        fd: int | None = None,
        errno_: int | None = None,
    ) -> None:
        super().__init__(f"{detail}: {reason}")
        self.reason: str = reason
        self.detail: str = detail
        self.pid: int | None = pid
        self.fd: int | None = fd
        self.errno: int | None = errno_


# --- data model ---------------------------------------------------------------


@dataclass(frozen=True)
class StatDescriptor:
    """One decoded ``kvm_stats_desc``.

    Type, unit and base are kept as raw ints instead of enums.  A future kernel
    may add a unit, as 6.0 added "boolean", and that must not make the whole
    VM unreadable.
    """

    name: str
    flags: int
    exponent: int
    size: int
    offset: int
    bucket_size: int

    @property
    def type(self) -> int:
        return self.flags & STATS_TYPE_MASK

    @property
    def unit(self) -> int:
        return (self.flags & STATS_UNIT_MASK) >> STATS_UNIT_SHIFT

    @property
    def base(self) -> int:
        return (self.flags & STATS_BASE_MASK) >> STATS_BASE_SHIFT

    @property
    def type_name(self) -> str:
        return _enum_name(TYPE_NAMES, self.type)

    @property
    def unit_name(self) -> str:
        return _enum_name(UNIT_NAMES, self.unit)

    @property
    def base_name(self) -> str:
        return _enum_name(BASE_NAMES, self.base)

    @property
    def is_histogram(self) -> bool:
        return self.type in (3, 4)


def _enum_name(names: tuple[str, ...], value: int) -> str:
    return names[value] if value < len(names) else f"unknown({value})"


@dataclass(frozen=True)
class KvmBinaryStats:
    """A decoded stats blob.

    ``id`` is the kernel's stats id: "kvm-<pid>" for a VM, where pid is the
    process that *created* the VM, or "kvm-<pid>/vcpu-<n>" for a vCPU.
    ``values`` maps each stat name to its ``size`` u64 values (one for
    scalars, one per bucket for histograms).  ``descriptors`` maps the same
    names to their metadata.  Both mappings are read-only views, in kernel
    descriptor order.
    """

    id: str
    values: Mapping[str, tuple[int, ...]]
    descriptors: Mapping[str, StatDescriptor]

    def scalar(self, name: str) -> int | None:
        """The single value of stat ``name``, or None if this kernel lacks it.

        Raises ValueError for a histogram, because returning its first bucket
        would be a silently wrong number.
        """
        vals = self.values.get(name)
        if vals is None:
            return None
        if len(vals) != 1:
            raise ValueError(f"{self.id}: stat {name!r} has {len(vals)} values, not a scalar")
        return vals[0]


# --- pure parser --------------------------------------------------------------


def _decode_name(raw: bytes, source: str, what: str) -> str:
    """Decode a NUL-terminated, NUL-padded fixed-size name field."""
    nul = raw.find(b"\0")
    if nul < 0:
        raise KvmStatsFormatError(
            f"{source}: {what} is not NUL-terminated within {len(raw)} bytes"
        )
    text = raw[:nul]
    if not text:
        raise KvmStatsFormatError(f"{source}: {what} is empty")
    # Names are C identifiers (ids add '-' and '/').  Accept only printable
    # ASCII, so that corrupt bytes cannot become metric labels.
    if any(b < 0x20 or b > 0x7E for b in text):
        raise KvmStatsFormatError(
            f"{source}: {what} is not printable ASCII: {bytes(text)!r}"
        )
    return text.decode("ascii")


def _require_within(source: str, what: str, start: int, length: int, total: int) -> None:
    if start + length > total:
        raise KvmStatsFormatError(
            f"{source}: {what} offset {start}+{length} past end of {total}-byte blob"
        )


def parse_kvm_stats(blob: bytes | bytearray | memoryview, name: str) -> KvmBinaryStats:
    """Decode the full content of a KVM stats fd (header through data).

    ``name`` identifies the source in error messages, e.g.
    "kvm-stats pid 1234 fd 12".  Raises KvmStatsFormatError on any defect:
    truncation, offsets past the end, bad names, implausible sizes or counts,
    duplicate names, or regions that overlap each other.  Trailing bytes after
    the last referenced region are ignored.
    """
    blob = bytes(blob)  # accept bytearray/memoryview; freeze against mutation
    total = len(blob)
    if total < _HEADER.size:
        raise KvmStatsFormatError(
            f"{name}: truncated header: need {_HEADER.size} bytes, got {total}"
        )
    _hflags, name_size, num_desc, id_offset, desc_offset, data_offset = _HEADER.unpack_from(blob, 0)

    if not 1 <= name_size <= MAX_NAME_SIZE:
        raise KvmStatsFormatError(
            f"{name}: header name_size {name_size} outside 1..{MAX_NAME_SIZE}"
        )
    if num_desc > MAX_NUM_DESC:
        raise KvmStatsFormatError(
            f"{name}: header num_desc {num_desc} exceeds limit {MAX_NUM_DESC}"
        )

    _require_within(name, "id", id_offset, name_size, total)
    stats_id = _decode_name(blob[id_offset : id_offset + name_size], name, "id string")

    desc_len = _DESC_FIXED.size + name_size
    table_len = num_desc * desc_len
    _require_within(name, f"descriptor table ({num_desc} x {desc_len} bytes)", desc_offset, table_len, total)

    # Each region is (start, end, label).  Every region must be disjoint from
    # every other: overlap means some bytes would be read as two different
    # things, and whatever value came out would be garbage.
    regions: list[tuple[int, int, str]] = [
        (0, _HEADER.size, "header"),
        (id_offset, id_offset + name_size, "id string"),
    ]
    if table_len:
        regions.append((desc_offset, desc_offset + table_len, "descriptor table"))

    descriptors: dict[str, StatDescriptor] = {}
    values: dict[str, tuple[int, ...]] = {}
    for i in range(num_desc):
        base = desc_offset + i * desc_len
        flags, exponent, size, offset, bucket_size = _DESC_FIXED.unpack_from(blob, base)
        raw_name = blob[base + _DESC_FIXED.size : base + desc_len]
        stat = _decode_name(raw_name, name, f"descriptor {i} name")
        if stat in descriptors:
            raise KvmStatsFormatError(f"{name}: descriptor {i} duplicates stat name {stat!r}")
        if not 1 <= size <= MAX_STAT_SIZE:
            raise KvmStatsFormatError(
                f"{name}: descriptor {i} ({stat}) size {size} outside 1..{MAX_STAT_SIZE}"
            )
        start = data_offset + offset
        length = size * _U64
        _require_within(name, f"descriptor {i} ({stat}) data", start, length, total)
        regions.append((start, start + length, f"descriptor {i} ({stat}) data"))
        descriptors[stat] = StatDescriptor(
            name=stat,
            flags=flags,
            exponent=exponent,
            size=size,
            offset=offset,
            bucket_size=bucket_size,
        )
        values[stat] = struct.unpack_from(f"={size}Q", blob, start)

    # Sweep the regions in start order.  Comparing each one with the region
    # that reaches furthest so far catches nesting as well as partial overlap.
    regions.sort()
    reach_start, reach_end, reach_label = regions[0]
    for start, end, label in regions[1:]:
        if start < reach_end:
            raise KvmStatsFormatError(
                f"{name}: {label} [{start},{end}) overlaps {reach_label} [{reach_start},{reach_end})"
            )
        reach_start, reach_end, reach_label = start, end, label

    return KvmBinaryStats(
        id=stats_id,
        values=types.MappingProxyType(values),
        descriptors=types.MappingProxyType(descriptors),
    )


def to_counters(stats: KvmBinaryStats) -> dict[str, int | None]:
    """Project the stats onto eptwatch's counters (keys: COUNTER_NAMES).

    A value is None when this kernel does not provide the stat, for example
    on 5.14, on non-x86 hosts, or when it is unexpectedly not a scalar.  None
    is distinct from 0, which is a real reading.
    """
    out: dict[str, int | None] = {}
    for key in COUNTER_NAMES:
        vals = stats.values.get(key)
        out[key] = vals[0] if vals is not None and len(vals) == 1 else None
    return out


# --- syscalls -----------------------------------------------------------------

# pidfd_getfd is 438 in the unified syscall numbering (asm-generic, x86_64,
# i386, arm, powerpc, s390, ...).  Alpha, MIPS and ia64 offset it; they are
# not KVM-on-x86 targets, so they are refused instead of guessed.
_PIDFD_GETFD_NR: Mapping[str, int] = types.MappingProxyType(
    {
        m: 438
        for m in (
            "x86_64", "amd64", "i386", "i686", "aarch64", "arm64", "armv7l", "armv8l",
            "riscv64", "ppc64", "ppc64le", "s390x", "loongarch64",
        )
    }
)


@functools.lru_cache(maxsize=1)
def _libc_syscall() -> Callable[..., int]:
    # A private CDLL instance, so that setting restype cannot affect other
    # ctypes users in this process.
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.syscall
    fn.restype = ctypes.c_long
    return fn


def _label(pid: int, fd: int) -> str:
    return f"kvm-stats pid {pid} fd {fd}"


def _unavailable(reason: str, step: str, pid: int, fd: int, err: int | None) -> KvmStatsUnavailable:
    text = f"{_label(pid, fd)}: {step}"
    if err is not None:
        text += f" failed: {errno.errorcode.get(err, str(err))} ({os.strerror(err)})"
    return KvmStatsUnavailable(reason, text, pid=pid, fd=fd, errno_=err)


def _pidfd_open(pid: int, vm_fd: int) -> int:
    try:
        return os.pidfd_open(pid, 0)
    except OSError as exc:
        err = exc.errno
        reason = {
            errno.ESRCH: REASON_PROCESS_GONE,
            # EINVAL: pid <= 0, or (before 6.9) pid is not a thread-group leader.
            errno.EINVAL: REASON_INVALID_PID,
            errno.ENOSYS: REASON_KERNEL_TOO_OLD,  # pidfd_open is 5.3+
            errno.EMFILE: REASON_FD_LIMIT,
            errno.ENFILE: REASON_FD_LIMIT,
        }.get(err or 0, REASON_UNEXPECTED)
        raise _unavailable(reason, "pidfd_open", pid, vm_fd, err) from exc


def _pidfd_getfd(pidfd: int, pid: int, vm_fd: int) -> int:
    nr = _PIDFD_GETFD_NR.get(platform.machine())
    if nr is None:
        raise KvmStatsUnavailable(
            REASON_UNSUPPORTED_ARCH,
            f"{_label(pid, vm_fd)}: no pidfd_getfd syscall number for {platform.machine()!r}",
            pid=pid,
            fd=vm_fd,
        )
    ret = _libc_syscall()(ctypes.c_long(nr), ctypes.c_int(pidfd), ctypes.c_int(vm_fd), ctypes.c_uint(0))
    if ret >= 0:
        return int(ret)
    err = ctypes.get_errno()
    reason = {
        errno.ESRCH: REASON_PROCESS_GONE,  # target is exiting
        errno.EPERM: REASON_PERMISSION,  # ptrace_may_access(PTRACE_MODE_ATTACH_REALCREDS) refused
        errno.EACCES: REASON_PERMISSION,
        errno.EBADF: REASON_FD_GONE,  # VMM closed the fd since it was listed
        errno.ENOSYS: REASON_KERNEL_TOO_OLD,  # pidfd_getfd is 5.6+
        errno.EMFILE: REASON_FD_LIMIT,
        errno.ENFILE: REASON_FD_LIMIT,
    }.get(err, REASON_UNEXPECTED)
    raise _unavailable(reason, "pidfd_getfd", pid, vm_fd, err)


def _fd_link(fd: int) -> str | None:
    """What /proc says our own fd is, or None if /proc is unusable here."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


def _ioctl_failure_reason(err: int | None, link: str | None) -> tuple[str, str]:
    """Classify a failed KVM_GET_STATS_FD.  Returns (reason, extra detail).

    ENOTTY/EINVAL can mean either "this is not a KVM fd" or "this KVM is older
    than 5.14".  The fd's /proc link text tells the two apart when /proc is
    available.
    """
    if err in (errno.ENOTTY, errno.EINVAL):
        if link == _VM_FD_LINK:
            return REASON_KERNEL_TOO_OLD, "KVM_GET_STATS_FD unsupported (needs Linux 5.14+)"
        if link is None:
            return REASON_NOT_KVM_VM_FD, "or KVM older than Linux 5.14"
        return REASON_NOT_KVM_VM_FD, f"fd is {link!r}"
    if err == errno.EIO:
        # kvm->mm != current->mm, or the VM is dead (being torn down).
        return REASON_FOREIGN_VM, (
            "KVM only serves VM ioctls to the process that created the VM; "
            "read a kvm-vm-stats fd held by the VMM (find_vm_stats_fds) or use debugfs"
        )
    if err in (errno.EMFILE, errno.ENFILE):
        return REASON_FD_LIMIT, ""
    return REASON_UNEXPECTED, ""


def _get_stats_fd(local_fd: int, link: str | None, pid: int, vm_fd: int) -> int:
    # The caller has already refused fds known to be something else; see
    # read_vm_binary_stats.
    try:
        return fcntl.ioctl(local_fd, KVM_GET_STATS_FD, 0)
    except OSError as exc:
        reason, extra = _ioctl_failure_reason(exc.errno, link)
        err = _unavailable(reason, "ioctl(KVM_GET_STATS_FD)", pid, vm_fd, exc.errno)
        if extra:
            err = KvmStatsUnavailable(
                reason, f"{err.detail}; {extra}", pid=pid, fd=vm_fd, errno_=exc.errno
            )
        raise err from exc


def read_stats_blob(stats_fd: int, name: str) -> bytes:
    """Read a KVM stats fd from offset 0 to EOF using pread.

    st_size is 0 on these anon-inode fds, so the size cannot be trusted; read
    until pread returns b"".  pread keeps the fd's file position untouched,
    which matters if the fd is shared.  Raises KvmStatsFormatError past
    MAX_BLOB_BYTES; OSError propagates to the caller.
    """
    parts: list[bytes] = []
    pos = 0
    while True:
        chunk = os.pread(stats_fd, _READ_CHUNK, pos)
        if not chunk:
            return b"".join(parts)
        parts.append(chunk)
        pos += len(chunk)
        if pos > MAX_BLOB_BYTES:
            raise KvmStatsFormatError(f"{name}: stats fd larger than {MAX_BLOB_BYTES} bytes")


def read_vm_binary_stats(pid: int, vm_fd: int) -> KvmBinaryStats:
    """Fetch and decode the VM-level binary stats behind fd ``vm_fd`` of ``pid``.

    ``vm_fd`` may be a KVM VM fd ("anon_inode:kvm-vm") or a VM stats fd
    ("anon_inode:kvm-vm-stats").  Only a stats fd works when ``pid`` is
    another process; see the module docstring for why (REASON_FOREIGN_VM).

    Raises KvmStatsUnavailable for operational failures (see REASON_*), and
    KvmStatsFormatError if the kernel's blob cannot be decoded.  The two are
    kept apart because the second indicates a kernel/agent mismatch worth
    alerting on, while the first is routine (the VM exited, or permissions).
    """
    label = _label(pid, vm_fd)
    with ExitStack() as stack:
        pidfd = _pidfd_open(pid, vm_fd)
        stack.callback(os.close, pidfd)
        local_fd = _pidfd_getfd(pidfd, pid, vm_fd)
        stack.callback(os.close, local_fd)
        # Check what the fd is before using it.  Sending 0xAECE to an unknown
        # file is not safe, since another driver could give that number a
        # meaning.  Reading a vCPU stats fd would also "succeed", but with vCPU
        # stats where VM stats are expected.  If /proc is unusable (link is
        # None), fall back to the ioctl and classify its errno.
        link = _fd_link(local_fd)
        if link == _VM_STATS_FD_LINK:
            stats_fd = local_fd
        elif link is None or link == _VM_FD_LINK:
            stats_fd = _get_stats_fd(local_fd, link, pid, vm_fd)
            stack.callback(os.close, stats_fd)
        else:
            raise KvmStatsUnavailable(
                REASON_NOT_KVM_VM_FD,
                f"{label}: fd is {link!r}, expected {_VM_FD_LINK!r} or {_VM_STATS_FD_LINK!r}",
                pid=pid,
                fd=vm_fd,
            )
        try:
            blob = read_stats_blob(stats_fd, label)
        except OSError as exc:
            raise _unavailable(REASON_READ_FAILED, "pread(stats fd)", pid, vm_fd, exc.errno) from exc
    return parse_kvm_stats(blob, label)


def find_vm_fds(proc_root: Path, pid: int) -> list[int]:
    """Sorted fd numbers of ``pid`` that are KVM VM fds ("anon_inode:kvm-vm").

    Returns [] if the process is gone (or exits mid-scan), and skips fds that
    are closed while the scan runs.  Raises KvmStatsUnavailable when the fd
    table cannot be read for lack of permission: returning [] there would
    look like "no VMs" and hide a misconfigured agent.
    """
    return _find_fds_by_link(Path(proc_root), pid, _VM_FD_LINK)


def find_vm_stats_fds(proc_root: Path, pid: int) -> list[int]:
    """Sorted fd numbers of ``pid`` that are VM stats fds ("anon_inode:kvm-vm-stats").

    These are the fds that ``read_vm_binary_stats`` can read across processes.
    Error handling is the same as for ``find_vm_fds``.
    """
    return _find_fds_by_link(Path(proc_root), pid, _VM_STATS_FD_LINK)


def _find_fds_by_link(proc_root: Path, pid: int, wanted: str) -> list[int]:
    fd_dir = proc_root / str(pid) / "fd"
    try:
        entries = os.listdir(fd_dir)
    except (FileNotFoundError, ProcessLookupError, NotADirectoryError):
        return []
    except PermissionError as exc:
        raise KvmStatsUnavailable(
            REASON_PERMISSION, f"kvm-stats pid {pid}: listing {fd_dir}", pid=pid, errno_=exc.errno
        ) from exc

    found: list[int] = []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            link = os.readlink(fd_dir / entry)
        except (FileNotFoundError, ProcessLookupError):
            continue  # fd closed or process exited since listdir
        except PermissionError as exc:
            raise KvmStatsUnavailable(
                REASON_PERMISSION, f"kvm-stats pid {pid}: readlink {fd_dir / entry}",
                pid=pid, fd=int(entry), errno_=exc.errno,
            ) from exc
        if link == wanted:
            found.append(int(entry))
    return sorted(found)
