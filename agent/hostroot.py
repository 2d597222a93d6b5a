"""HostRoot owns every host path the agent reads: procfs, sysfs and debugfs.

Nothing else in the agent spells `/proc`; tests point the same object at a fixture tree shaped like
`/` (`HostRoot.from_root("tests/fixtures/linux-5.3-unfixed")`). Reads never trust `stat` (procfs
reports size 0 or 4096) and map every OS failure to a `HostReadError` whose `kind` the collectors
turn into a source status.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

# smaps of a QEMU process with tens of thousands of VMAs runs to tens of MB; anything past this is not
# a procfs file we understand, and reading on would only grow memory.
MAX_READ_BYTES = 256 * 1024 * 1024
_CHUNK_BYTES = 1024 * 1024


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


@dataclass(frozen=True)
class HostRoot:
    procfs: Path = Path("/proc")
    sysfs: Path = Path("/sys")
    debugfs: Path = Path("/sys/kernel/debug")

    @classmethod
    def from_root(cls, root: str | os.PathLike[str]) -> HostRoot:
        base = Path(root)
        return cls(procfs=base / "proc", sysfs=base / "sys", debugfs=base / "sys" / "kernel" / "debug")

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

    @staticmethod
    def read_bytes(path: Path, limit: int = MAX_READ_BYTES) -> bytes:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise _classify(path, exc) from None
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
