"""HostRoot owns every host path the agent reads: procfs, sysfs and debugfs.

Nothing else in the agent spells `/proc`; tests point the same object at a fixture tree shaped like
`/` (`HostRoot.from_root("tests/fixtures/linux-5.3-unfixed")`). Reads never trust `stat` (procfs
reports size 0 or 4096) and map every OS failure to a `HostReadError` whose `kind` the collectors
turn into a source status.

One read, smaps of a big QEMU process, runs to megabytes per VM and sample. procfs hands a seq file
out about one page per read() whatever size is asked for, so collecting it as new `bytes` costs an
allocation per page plus a join into fresh, not yet faulted-in memory. The sampler instead reads it
into its `ReadBuffer` (`root.read_bytes(path, into=buffer)`): the pages land in memory that earlier
samples already faulted in, and the file is not copied again.
"""

from __future__ import annotations

import errno
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import overload

# smaps of a QEMU process with tens of thousands of VMAs runs to tens of MB; anything past this is not
# a procfs file we understand, and reading on would only grow memory.
MAX_READ_BYTES = 256 * 1024 * 1024
_CHUNK_BYTES = 1024 * 1024
# Free space a ReadBuffer keeps ahead of each read() (the kernel fills at most this much per call).
_HEADROOM_BYTES = 64 * 1024
_ZEROS = bytes(_HEADROOM_BYTES)
# A ReadBuffer keeps its size between reads up to this much (a bigger one shrinks at a smaller read).
_KEEP_BYTES = 32 * 1024 * 1024


class HostReadError(Exception):
    """A host file could not be read. `kind` is one of: absent, denied, gone, too_large, io."""

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
    if code == errno.ESRCH:
        # /proc/PID files answer ESRCH once the process has exited while we hold them open.
        return HostReadError("gone", path, "process exited while being read")
    return HostReadError("io", path, f"{exc.strerror or exc} (errno {code})")


class ReadBuffer:
    """A reusable destination for one large host read at a time (the sampler's smaps reads).

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

    def _fill(self, fd: int, path: Path, limit: int) -> bytes | bytearray:
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
                with memoryview(buf)[n : limit + 1] as room:
                    got = reader.readinto(room)
                    full = got == len(room)
                n += got
                if n > limit:
                    raise HostReadError("too_large", path, f"larger than the {limit}-byte read limit")
                if not full:  # readinto stops short only at end of file
                    break
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



@dataclass(frozen=True)
class HostRoot:
    procfs: Path = Path("/proc")
    sysfs: Path = Path("/sys")
    debugfs: Path = Path("/sys/kernel/debug")

    @classmethod
    def from_root(cls, root: str | os.PathLike[str]) -> HostRoot:
        base = Path(root)
        return cls(procfs=base / "proc", sysfs=base / "sys", debugfs=base / "sys" / "kernel" / "debug")

    @classmethod
    def from_paths(cls, root: str | None = None, procfs: str | None = None, sysfs: str | None = None,
                   debugfs: str | None = None) -> HostRoot:
        """`--root` (a tree shaped like /, default /) with any of `--path.procfs/sysfs/debugfs` over it."""
        base = cls.from_root(root) if root else cls()
        return cls(procfs=Path(procfs) if procfs else base.procfs, sysfs=Path(sysfs) if sysfs else base.sysfs,
                   debugfs=Path(debugfs) if debugfs else base.debugfs)

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

    @overload
    @staticmethod
    def read_bytes(path: Path, limit: int = MAX_READ_BYTES, into: None = None) -> bytes: ...

    @overload
    @staticmethod
    def read_bytes(path: Path, limit: int = MAX_READ_BYTES, *, into: ReadBuffer) -> bytes | bytearray: ...

    @staticmethod
    def read_bytes(path: Path, limit: int = MAX_READ_BYTES, into: ReadBuffer | None = None) -> bytes | bytearray:
        """The whole file. With `into`, read into that buffer instead of new memory and return what
        ReadBuffer's contract describes (valid only until the next read into the same buffer)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise _classify(path, exc) from None
        if into is not None:
            try:
                return into._fill(fd, path, limit)
            finally:
                os.close(fd)
        chunks: list[bytes] = []
        total = 0
        try:
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
        finally:
            os.close(fd)
        return b"".join(chunks)

    @classmethod
    def read_text(cls, path: Path, limit: int = MAX_READ_BYTES) -> str:
        # Paths in smaps/mountinfo are arbitrary bytes; replacement keeps the wire (UTF-8) valid.
        return cls.read_bytes(path, limit).decode("utf-8", errors="replace")

    @staticmethod
    def listdir(path: Path) -> list[str]:
        try:
            return sorted(os.listdir(path))
        except OSError as exc:
            raise _classify(path, exc) from None

    @staticmethod
    def readlink(path: Path) -> str:
        try:
            return os.readlink(path)
        except OSError as exc:
            raise _classify(path, exc) from None

    @staticmethod
    def exists(path: Path) -> bool:
        try:
            return path.exists()
        except OSError:
            return False
