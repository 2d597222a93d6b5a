"""HostRoot owns every host path the agent reads: procfs, sysfs and debugfs.

Nothing else in the agent spells `/proc`; tests point the same object at a fixture tree shaped like
`/` (`HostRoot.from_root("tests/fixtures/linux-5.3-unfixed")`). Reads never trust `stat` (procfs
reports size 0 or 4096) and map every OS failure to a `HostReadError` whose `kind` the collectors
turn into a source status.

One read, smaps of a big QEMU process, runs to megabytes per VM and sample. procfs hands a seq file
out about one page per read() whatever size is asked for, so collecting it as new `bytes` costs an
allocation per page plus a join into fresh, not yet faulted-in memory. The sampler instead streams
it through a `ChunkSink` (`root.read_bytes(path, into=scanner)`, smaps.LargeVmaScanner): each chunk
lands in the sink's small reused buffer and is scanned while the CPU still has it in cache. A sink
that is also an `FdSink` runs that whole loop itself, compiled, on the file this module opened and
checked, with the same size and time bounds. A
`ReadBuffer` (`into=buffer`) holds a whole file in memory that earlier reads already faulted in.

`--root` is a boundary (the tree may be a container's or an attacker's): every path is opened
beneath the root with openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS) where the kernel has it
(5.6+), else by a checked walk that resolves each symbolic link by hand and refuses one that leaves
the root. On the live host (root `/`, or the default /proc, /sys, /sys/kernel/debug) paths are
opened as they are, so the kernel's own links keep working. Whatever the root, only regular files
are read (procfs, sysfs and debugfs files are regular; a FIFO would block forever), opened
non-blocking, bounded in size and in time.
"""

from __future__ import annotations

import ctypes
import errno
import io
import os
import platform
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Protocol, overload

# smaps of a QEMU process with tens of thousands of VMAs runs to tens of MB; anything past this is not
# a procfs file we understand, and reading on would only grow memory.
MAX_READ_BYTES = 256 * 1024 * 1024
_CHUNK_BYTES = 1024 * 1024
# Free space a ReadBuffer keeps ahead of each read() (the kernel fills at most this much per call).
_HEADROOM_BYTES = 64 * 1024
_ZEROS = bytes(_HEADROOM_BYTES)
# A ReadBuffer keeps its size between reads up to this much (a bigger one shrinks at a smaller read).
_KEEP_BYTES = 32 * 1024 * 1024
# A ReadBuffer read goes on in steps of at most this much, so that the deadline is checked between them.
_STEP_BYTES = 8 * 1024 * 1024
# Longest one file read may take. A procfs/sysfs file is produced in milliseconds (smaps of a huge
# QEMU in well under a second); past this something is wrong (a stalled FUSE or NFS tree under
# --root) and one source is given up rather than the whole sample.
READ_DEADLINE_SECONDS = 60.0
# The clock the deadline is measured on (a module attribute so that tests can step it).
_monotonic: Callable[[], float] = time.monotonic
# Paths under which the running kernel's own files live: opened as they are (see the module doc).
_LIVE_ANCHORS = (Path("/"), Path("/proc"), Path("/sys"), Path("/sys/kernel/debug"))
_OPEN_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
# openat2(2) resolve flags (linux/openat2.h).
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_BENEATH = 0x08
_SYS_OPENAT2 = {"x86_64": 437, "aarch64": 437}.get(platform.machine())
# Symbolic links a hand walk follows before calling it a loop (the kernel's own limit is 40).
_MAX_LINKS = 40


class HostReadError(Exception):
    """A host file could not be read. `kind` is one of: absent, denied, gone, too_large, io,
    outside_root (the path resolves outside the root, or through a kernel magic link under it),
    not_regular (a FIFO, device or directory where a file was expected), timeout."""

    def __init__(self, kind: str, path: Path, detail: str) -> None:
        super().__init__(f"{path}: {detail}")
        self.kind = kind
        self.path = path
        self.detail = detail


def _classify(path: Path, exc: OSError) -> HostReadError:
    code = exc.errno
    if code == errno.ENOENT or code == errno.ENOTDIR:
        return HostReadError("absent", path, "does not exist")
    if code in (errno.EACCES, errno.EPERM):
        return HostReadError("denied", path, f"permission denied ({errno.errorcode.get(code, code)})")
    if code in (errno.EXDEV, errno.ELOOP):
        # openat2 RESOLVE_BENEATH: EXDEV for a path leaving the root, ELOOP for a magic link; the hand
        # walk raises ELOOP for the same and for a link swapped in while it walked.
        return HostReadError("outside_root", path, "resolves outside the root (a symbolic link leaving it, or a loop)")
    if code == errno.ESRCH:
        # /proc/PID files answer ESRCH once the process has exited while we hold them open.
        return HostReadError("gone", path, "process exited while being read")
    return HostReadError("io", path, f"{exc.strerror or exc} (errno {code})")


class ReadBuffer:
    """A reusable destination for one large host read at a time (a whole file; the sampler streams
    smaps through a ChunkSink instead).

    Contract: a read into this buffer returns the buffer itself (a `bytearray`), or, for a file of
    less than half its allocation, a `bytes` copy. Treat either as valid only until the next read
    into the same ReadBuffer, which may overwrite it in place: parse it (or copy what must be kept;
    a slice is a copy) before reading again, and keep neither it nor views of it. A memoryview still
    held on the buffer makes the next read fail loudly (BufferError) instead of overwriting it; a
    plain reference cannot be detected. Not thread-safe: one per sampling thread.

    Memory: the buffer keeps the size of the largest file read so far (about 7.5 MB for a process
    with 10,000 VMAs), up to 32 MiB, so that on a host whose VMs differ in size the big one's read
    stays in memory that is already faulted in; smaller files are copied out of it.
    """

    def __init__(self) -> None:
        self._buf = bytearray()

    def _fill(self, fd: int, path: Path, limit: int, deadline: float) -> bytes | bytearray:
        buf = self._buf
        # Fails with BufferError if a caller still holds a memoryview of the previous result.
        buf.append(0)
        buf.pop()
        n = 0
        try:
            # BufferedReader.readinto loops in C, reading straight into `buf`, until the slice it is
            # given is full or the file ends: ~1,800 one-page reads for 7.5 MB of smaps, no Python loop.
            reader = io.BufferedReader(io.FileIO(fd, closefd=False), _HEADROOM_BYTES)
            while True:
                if len(buf) - n < _HEADROOM_BYTES:
                    # After the first big read this stays within the allocation: no realloc, no new pages.
                    buf += _ZEROS
                with memoryview(buf)[n : min(limit + 1, n + _STEP_BYTES)] as room:
                    got = reader.readinto(room)
                    full = got == len(room)
                n += got
                if n > limit:
                    raise HostReadError("too_large", path, f"larger than the {limit}-byte read limit")
                if not full:  # readinto stops short only at end of file
                    break
                _check_deadline(path, deadline)
        except OSError as exc:
            raise _classify(path, exc) from None
        allocated = buf.__alloc__()
        if n < allocated // 2 and allocated <= _KEEP_BYTES:
            # Truncating to under half would give the allocation back (CPython's bytearray policy)
            # and the next big read would fault in fresh memory again: keep it and copy out.
            with memoryview(buf)[:n] as head:
                return bytes(head)
        del buf[n:]
        return buf




class ChunkSink(Protocol):
    """A consumer of a file read in chunks into memory it owns (smaps.LargeVmaScanner): the reader
    calls room() for where the next bytes go, reads into it until it is full or the file ends,
    releases it, then calls filled(n). The sink sees each chunk while the kernel's writes are still
    in the CPU cache and need not keep the file."""

    def room(self) -> memoryview: ...

    def filled(self, n: int) -> None: ...


class FdSink(ChunkSink, Protocol):
    """A ChunkSink that can also run the whole read itself, compiled (smaps.LargeVmaScanner over
    _smapscan.FdScan): given the open, already checked regular file, it reads to the end within
    `limit` bytes, checking clock() against `deadline` after each chunk as the loop here does, and
    answers "" (done), "too_large" or "timeout"; a failed read() raises OSError. None: it cannot
    (not built here), nothing was read, and the loop here feeds it through room()/filled()."""

    def read_fd(self, fd: int, limit: int, deadline: float, clock: Callable[[], float]) -> str | None: ...


def _stream(fd: int, path: Path, limit: int, sink: ChunkSink, deadline: float) -> None:
    read_fd = getattr(sink, "read_fd", None)
    if read_fd is not None:
        try:
            # _monotonic looked up now: tests step the module's clock.
            outcome = read_fd(fd, limit, deadline, _monotonic)
        except OSError as exc:
            raise _classify(path, exc) from None
        if outcome == "too_large":
            raise HostReadError("too_large", path, f"larger than the {limit}-byte read limit")
        if outcome == "timeout":
            raise _timed_out(path)
        if outcome is not None:
            return
    total = 0
    try:
        # A readinto larger than this reader's buffer goes straight into the sink's memory, looping
        # over the kernel's one-page reads in C until the room is full or the file ends.
        reader = io.BufferedReader(io.FileIO(fd, closefd=False), _HEADROOM_BYTES)
        while True:
            with sink.room() as room:
                want = len(room)
                got = reader.readinto(room)
            total += got
            if total > limit:
                raise HostReadError("too_large", path, f"larger than the {limit}-byte read limit")
            sink.filled(got)
            _check_deadline(path, deadline)
            if got < want:  # readinto stops short only at end of file
                break
    except OSError as exc:
        raise _classify(path, exc) from None


def _timed_out(path: Path) -> HostReadError:
    return HostReadError("timeout", path, f"read took longer than {READ_DEADLINE_SECONDS:.0f} s: given up")


def _check_deadline(path: Path, deadline: float) -> None:
    if _monotonic() > deadline:
        raise _timed_out(path)


def _require_regular(fd: int, path: Path) -> None:
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        raise _classify(path, exc) from None
    if not stat.S_ISREG(mode):
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a directory" if stat.S_ISDIR(mode) else "a socket" if stat.S_ISSOCK(mode) \
            else "a device" if (stat.S_ISCHR(mode) or stat.S_ISBLK(mode)) else "not a regular file"
        raise HostReadError("not_regular", path, f"is {kind}, not a regular file: not read")


def _read_fd(fd: int, path: Path, limit: int, into: ReadBuffer | ChunkSink | None) -> bytes | bytearray | None:
    """The whole of an open regular file, within `limit` bytes and READ_DEADLINE_SECONDS (into a
    sink: fed to it, and None returned)."""
    _require_regular(fd, path)
    deadline = _monotonic() + READ_DEADLINE_SECONDS
    if isinstance(into, ReadBuffer):
        return into._fill(fd, path, limit, deadline)
    if into is not None:
        _stream(fd, path, limit, into, deadline)
        return None
    chunks: list[bytes] = []
    total = 0
    while True:
        try:
            chunk = os.read(fd, _CHUNK_BYTES)
        except OSError as exc:
            raise _classify(path, exc) from None
        if not chunk:
            break
        total += len(chunk)
        if total > limit:
            raise HostReadError("too_large", path, f"larger than the {limit}-byte read limit")
        chunks.append(chunk)
        _check_deadline(path, deadline)
    return b"".join(chunks)


@overload
def read_file(path: Path, limit: int = MAX_READ_BYTES, into: None = None) -> bytes: ...


@overload
def read_file(path: Path, limit: int = MAX_READ_BYTES, *, into: ReadBuffer) -> bytes | bytearray: ...


@overload
def read_file(path: Path, limit: int = MAX_READ_BYTES, *, into: ChunkSink) -> None: ...


def read_file(path: Path, limit: int = MAX_READ_BYTES, into: ReadBuffer | ChunkSink | None = None) -> bytes | bytearray | None:
    """A file the caller names itself (a benchmark's /proc/PID/smaps, a test's file), with the same
    checks as HostRoot reads (regular file, size and time bounds) but no root to stay beneath."""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        raise _classify(path, exc) from None
    try:
        return _read_fd(fd, path, limit, into)
    finally:
        os.close(fd)


# --- opening beneath a root ---------------------------------------------------------------------

class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_openat2_usable: bool | None = None  # None: not probed yet
_libc: ctypes.CDLL | None = None


def _raw_openat2(dirfd: int, rel: str, flags: int) -> int:
    global _libc
    if _SYS_OPENAT2 is None:
        raise OSError(errno.ENOSYS, "openat2: syscall number unknown on this architecture")
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.syscall.restype = ctypes.c_long
    how = _OpenHow(flags, 0, _RESOLVE_BENEATH | _RESOLVE_NO_MAGICLINKS)
    fd = int(_libc.syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(dirfd), ctypes.c_char_p(os.fsencode(rel)),
                           ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how))))
    if fd < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return fd


def _have_openat2() -> bool:
    """Whether openat2 works here: kernel 5.6+, a known syscall number, and no seccomp filter in the way."""
    global _openat2_usable
    if _openat2_usable is None:
        if _SYS_OPENAT2 is None:
            _openat2_usable = False
        else:
            try:
                os.close(_raw_openat2(-100, ".", os.O_PATH | os.O_CLOEXEC))  # AT_FDCWD
                _openat2_usable = True
            except (OSError, AttributeError):  # ENOSYS (old kernel), EPERM (seccomp), no syscall() in libc
                _openat2_usable = False
    return _openat2_usable


def _walk_beneath(base: int, parts: list[str], flags: int) -> int:
    """openat2(RESOLVE_BENEATH) by hand: each symbolic link is read and resolved within the root; one
    that is absolute, climbs above the root or loops raises ELOOP. Every step opens with O_NOFOLLOW,
    so a link swapped in between the check and the open fails instead of being followed."""
    stack = [os.dup(base)]
    pending = [p for p in parts if p not in ("", ".")]
    links = 0
    try:
        while True:
            if not pending:  # the root itself
                return os.open(".", flags, dir_fd=stack[-1])
            name = pending.pop(0)
            if name == "..":
                if len(stack) == 1:
                    raise OSError(errno.EXDEV, "climbs above the root")
                os.close(stack.pop())
                if not pending:
                    return os.open(".", flags, dir_fd=stack[-1])
                continue
            try:
                target: str | None = os.readlink(name, dir_fd=stack[-1])
            except OSError as exc:
                if exc.errno != errno.EINVAL:  # EINVAL: exists and is not a link
                    raise
                target = None
            if target is not None:
                links += 1
                if links > _MAX_LINKS or target.startswith("/"):
                    raise OSError(errno.ELOOP, "symbolic link leaves the root")
                pending[0:0] = [p for p in target.split("/") if p not in ("", ".")]
                continue
            if not pending:
                return os.open(name, flags | os.O_NOFOLLOW, dir_fd=stack[-1])
            stack.append(os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=stack[-1]))
    finally:
        for fd in stack:
            os.close(fd)


@dataclass(frozen=True)
class HostRoot:
    procfs: Path = Path("/proc")
    sysfs: Path = Path("/sys")
    debugfs: Path = Path("/sys/kernel/debug")
    # The tree given as --root: no path read may resolve outside it. None: each of procfs, sysfs and
    # debugfs bounds the reads under it.
    root: Path | None = None

    @classmethod
    def from_root(cls, root: str | os.PathLike[str]) -> HostRoot:
        base = Path(root)
        return cls(procfs=base / "proc", sysfs=base / "sys", debugfs=base / "sys" / "kernel" / "debug", root=base)

    @classmethod
    def from_paths(cls, root: str | None = None, procfs: str | None = None, sysfs: str | None = None,
                   debugfs: str | None = None) -> HostRoot:
        """`--root` (a tree shaped like /, default /) with any of `--path.procfs/sysfs/debugfs` over it."""
        base = cls.from_root(root) if root else cls()
        return cls(procfs=Path(procfs) if procfs else base.procfs, sysfs=Path(sysfs) if sysfs else base.sysfs,
                   debugfs=Path(debugfs) if debugfs else base.debugfs, root=base.root)

    @property
    def is_live(self) -> bool:
        """True when this is the running host's own /proc (so os.uname() describes it too)."""
        try:
            return self.procfs.resolve() == Path("/proc")
        except OSError:
            return False

    def proc(self, *parts: str | int) -> Path:
        return self.procfs.joinpath(*map(str, parts))

    def sys(self, *parts: str) -> Path:
        return self.sysfs.joinpath(*parts)

    def debug(self, *parts: str) -> Path:
        return self.debugfs.joinpath(*parts)

    # --- I/O primitives: the only places that touch the host ---

    @cached_property
    def _anchors(self) -> tuple[tuple[Path, str, str], ...]:
        """(anchor, its path as a string, the prefix of the paths beneath it), in the order _anchor
        tries them: --root first, then the deepest of debugfs, sysfs, procfs. Beneath "." is every
        relative path (as PurePath.relative_to has it)."""
        anchors = ([self.root] if self.root is not None else []) + sorted(
            (self.debugfs, self.sysfs, self.procfs), key=lambda p: len(p.parts), reverse=True)
        return tuple((a, str(a), "" if str(a) == "." else str(a).rstrip("/") + "/") for a in anchors)

    def _anchor(self, path: Path) -> tuple[Path, str]:
        """(the directory `path` must stay beneath, the rest of `path` below it, "" for the anchor
        itself). String prefixes of normalised paths, the same answer as PurePath.relative_to at a
        fraction of its cost: every host read passes here (discovery reads a few files per process)."""
        text = str(path)
        if "/../" in f"/{text}/":
            raise HostReadError("outside_root", path, "'..' in a host path: not followed")
        for anchor, exact, prefix in self._anchors:
            if text == exact:
                return anchor, ""
            if text.startswith(prefix) and (prefix or not text.startswith("/")):
                return anchor, text[len(prefix) :]
        raise HostReadError("outside_root", path, "not under this host root's procfs, sysfs or debugfs")

    def _open(self, path: Path, flags: int) -> int:
        anchor, rel = self._anchor(path)
        try:
            if anchor in _LIVE_ANCHORS:
                return os.open(path, flags)
            base = os.open(anchor, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                if _have_openat2():
                    return _raw_openat2(base, rel or ".", flags)
                return _walk_beneath(base, rel.split("/"), flags)
            finally:
                os.close(base)
        except OSError as exc:
            raise _classify(path, exc) from None

    @overload
    def read_bytes(self, path: Path, limit: int = MAX_READ_BYTES, into: None = None) -> bytes: ...

    @overload
    def read_bytes(self, path: Path, limit: int = MAX_READ_BYTES, *, into: ReadBuffer) -> bytes | bytearray: ...

    @overload
    def read_bytes(self, path: Path, limit: int = MAX_READ_BYTES, *, into: ChunkSink) -> None: ...

    def read_bytes(self, path: Path, limit: int = MAX_READ_BYTES, into: ReadBuffer | ChunkSink | None = None) -> bytes | bytearray | None:
        """The whole file, opened beneath the root. With a ReadBuffer `into`, read into that buffer
        instead of new memory and return what ReadBuffer's contract describes (valid only until the
        next read into the same buffer). With a ChunkSink, feed the file to it chunk by chunk (the
        same checks and bounds) and return None."""
        fd = self._open(path, _OPEN_FLAGS)
        try:
            return _read_fd(fd, path, limit, into)
        finally:
            os.close(fd)

    def read_text(self, path: Path, limit: int = MAX_READ_BYTES) -> str:
        # Paths in smaps/mountinfo are arbitrary bytes; replacement keeps the wire (UTF-8) valid.
        return self.read_bytes(path, limit).decode("utf-8", errors="replace")

    def listdir(self, path: Path) -> list[str]:
        fd = self._open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            return sorted(os.listdir(fd))
        except OSError as exc:
            raise _classify(path, exc) from None
        finally:
            os.close(fd)

    def readlink(self, path: Path) -> str:
        """The target of the link at `path` (not followed), its directory opened beneath the root."""
        if self._anchor(path)[0] in _LIVE_ANCHORS:
            # The live host: one syscall (discovery reads every fd link of every process).
            try:
                return os.readlink(path)
            except OSError as exc:
                raise _classify(path, exc) from None
        fd = self._open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            return os.readlink(path.name, dir_fd=fd)
        except OSError as exc:
            raise _classify(path, exc) from None
        finally:
            os.close(fd)

    def readlinks(self, path: Path) -> list[tuple[str, str]]:
        """(name, link target) of each symbolic link in the directory at `path` (/proc/PID/fd), none
        followed. The directory is opened beneath the root once; each entry is then one readlinkat(2)
        on a bare name relative to it, which reads the link itself and cannot leave the directory.
        Entries that vanish meanwhile (a closed fd) or are not links are skipped."""
        fd = self._open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            try:
                names = os.listdir(fd)
            except OSError as exc:
                raise _classify(path, exc) from None
            out = []
            for name in names:
                try:
                    out.append((name, os.readlink(name, dir_fd=fd)))
                except OSError:
                    continue  # closed since the listing, or not a link
            return out
        finally:
            os.close(fd)

    def exists(self, path: Path) -> bool:
        try:
            os.close(self._open(path, os.O_PATH | os.O_CLOEXEC))
            return True
        except HostReadError:
            return False
