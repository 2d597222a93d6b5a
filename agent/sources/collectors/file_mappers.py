"""Which processes map a file, from every process's /proc/PID/maps: other mappers of a guest-RAM file
make 169226f7e0's predicate say "small" (the smaps collector asks, on the COMPOUND_MAP_FIXED era)."""

from __future__ import annotations

from eptwatch.agent.sources.bounds import MAX_PID, MAX_U64, small_decimal
from eptwatch.agent.sources.hostroot import HostReadError, HostRoot


class FileMappers:
    def __init__(self, root: HostRoot) -> None:
        self.root = root
        self._index: dict[tuple[str, int], set[int]] | None = None

    def reset(self) -> None:
        """Start a new sample: the index is rebuilt on first use."""
        self._index = None

    def index(self) -> dict[tuple[str, int], set[int]]:
        """(dev, inode) -> pids mapping that file; read at most once per sample however many VMs
        ask (maps does not walk page tables: cheap next to smaps)."""
        if self._index is not None:
            return self._index
        index: dict[tuple[str, int], set[int]] = {}
        try:
            pids = [pid for n in self.root.listdir(self.root.procfs) if (pid := small_decimal(n, MAX_PID)) is not None]
        except HostReadError:
            pids = []
        for other in pids:
            try:
                text = self.root.read_text(self.root.proc(other, "maps"))
            except HostReadError:
                continue  # exited or unreadable: it can map nothing we could act on
            for line in text.split("\n"):
                parts = line.split(None, 5)
                inode = small_decimal(parts[4], MAX_U64) if len(parts) >= 5 else None
                if inode:  # 0: not a file; None: not a number we can trust
                    index.setdefault((parts[3], inode), set()).add(other)
        self._index = index
        return index
