"""Parse /proc/PID/smaps and /proc/PID/smaps_rollup into frozen dataclasses (sizes in bytes).

Pure: text in, data out. The kernel prints the same set of fields for every VMA of one file, so a
block that lacks a field the others have is a truncated or mangled file, not a zero.

Speed matters: a QEMU process can have 10,000 VMAs and the agent must add little over the kernel's
own cost of producing the text, so each block is split with one C-level regex call rather than a
Python loop over lines.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from eptwatch.agent.sources.bounds import MAX_KB, MAX_U64, parse_bounded
from eptwatch.agent.sources.status import ParseError

KIB = 1024

# "7f2778200000-7f2878200000 rw-s 00000000 00:14 262232      /dev/shm/x (deleted)"
_HEADER = re.compile(
    r"^([0-9a-f]+)-([0-9a-f]+) ([-r][-w][-x][-sp]) ([0-9a-f]+) ([0-9a-f]+:[0-9a-f]+) (\d+)(?: +([^\n]*))?$",
    re.MULTILINE,
)
# Every non-header line is "Key: value"; kB fields are "Key:   1234 kB".
_FIELD = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*):[ \t]*([^\n]*)$", re.MULTILINE)
_KB_VALUE = re.compile(r"(\d+) kB")

# smaps field -> dataclass attribute. Fields added in later kernels (FilePmdMapped, 5.4) may be
# absent from a whole file; that is None ("this kernel does not say"), never 0.
_KB_FIELDS: dict[str, str] = {
    "Size": "size_bytes",
    "KernelPageSize": "kernel_page_size_bytes",
    "Rss": "rss_bytes",
    "AnonHugePages": "anon_huge_bytes",
    "ShmemPmdMapped": "shmem_pmd_mapped_bytes",
    "FilePmdMapped": "file_pmd_mapped_bytes",
    "Shared_Hugetlb": "shared_hugetlb_bytes",
    "Private_Hugetlb": "private_hugetlb_bytes",
}
_REQUIRED = ("Size", "Rss")


@dataclass(frozen=True)
class HugeFields:
    """The huge-page fields shared by a VMA and a rollup, in bytes; None = not printed by this kernel."""

    size_bytes: int | None = None  # Size: virtual size (rollup: not printed)
    kernel_page_size_bytes: int | None = None  # KernelPageSize: 2 MiB / 1 GiB for hugetlbfs VMAs
    rss_bytes: int | None = None  # Rss: resident
    anon_huge_bytes: int | None = None  # AnonHugePages: anonymous THP
    shmem_pmd_mapped_bytes: int | None = None  # ShmemPmdMapped: shmem THP mapped by a PMD (4.8+)
    file_pmd_mapped_bytes: int | None = None  # FilePmdMapped: other file THP mapped by a PMD (5.4+)
    shared_hugetlb_bytes: int | None = None  # Shared_Hugetlb: hugetlbfs, shared
    private_hugetlb_bytes: int | None = None  # Private_Hugetlb: hugetlbfs, private

    @property
    def hugetlb_bytes(self) -> int:
        return (self.shared_hugetlb_bytes or 0) + (self.private_hugetlb_bytes or 0)

    @property
    def pmd_mapped_bytes(self) -> int:
        """THP bytes mapped by PMDs in this mm: the host side of what KVM may map huge."""
        return (self.anon_huge_bytes or 0) + (self.shmem_pmd_mapped_bytes or 0) + (self.file_pmd_mapped_bytes or 0)


@dataclass(frozen=True)
class Vma(HugeFields):
    start: int = 0
    end: int = 0
    perms: str = ""
    offset: int = 0
    dev: str = ""
    inode: int = 0
    path: str = ""  # as printed, without a trailing " (deleted)"
    deleted: bool = False
    thp_eligible: bool | None = None  # THPeligible (4.15+)

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class SmapsRollup(HugeFields):
    """smaps_rollup: one block summed over every VMA of the process (4.14+)."""

    vma_count: int | None = None  # known only when computed from full smaps


_MAX_KB_DIGITS = len(str(MAX_KB))


def _kb(text: str, name: str, body_start: int, key: str, value: str) -> int:
    m = _KB_VALUE.fullmatch(value.strip())
    if m is None:
        # Line numbers cost a scan of the text: computed only on the error path.
        line = _line_of(text, text.index(f"{key}:", body_start))
        raise ParseError(name, f"field {key!r}: expected '<digits> kB', got {value.strip()[:40]!r}", line)
    digits = m.group(1)
    if len(digits) < _MAX_KB_DIGITS:  # fewer digits than the bound: within it (the common case, no further check)
        return int(digits) * KIB
    if len(digits.lstrip("0")) > _MAX_KB_DIGITS or int(digits) > MAX_KB:
        line = _line_of(text, text.index(f"{key}:", body_start))
        raise ParseError(name, f"field {key!r}: {len(digits)}-digit value {digits[:20]} kB out of range (at most {MAX_KB} kB)", line)
    return int(digits) * KIB


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _parse_block(text: str, name: str, body_start: int, body_end: int) -> tuple[dict[str, int], bool | None]:
    body = text[body_start:body_end]
    pairs = _FIELD.findall(body)
    newlines = body.count("\n")
    if len(pairs) != newlines:
        # Some line is neither a header nor "Key: value": find it to name it.
        offset = 0
        for raw in body.split("\n")[:-1]:
            if _FIELD.fullmatch(raw) is None:
                raise ParseError(
                    name, f"expected a VMA header or 'Key: value' line, got {raw[:60]!r}", _line_of(text, body_start + offset)
                )
            offset += len(raw) + 1
        raise ParseError(name, "unparseable line", _line_of(text, body_start))  # pragma: no cover
    values: dict[str, int] = {}
    eligible: bool | None = None
    for key, value in pairs:
        attr = _KB_FIELDS.get(key)
        if attr is not None:
            if attr in values:
                raise ParseError(name, f"field {key!r} repeated in one VMA", _line_of(text, body_start))
            values[attr] = _kb(text, name, body_start, key, value)
        elif key == "THPeligible":
            v = value.strip()
            if v not in ("0", "1"):
                raise ParseError(name, f"THPeligible: expected 0 or 1, got {v[:20]!r}", _line_of(text, body_start))
            eligible = v == "1"
    return values, eligible


def _blocks(text: str, name: str) -> list[tuple[re.Match[str], int, int]]:
    if text and not text.endswith("\n"):
        raise ParseError(name, "truncated: the file does not end with a newline", _line_of(text, len(text)))
    headers = list(_HEADER.finditer(text))
    if not headers:
        if text.strip():
            raise ParseError(name, f"expected a VMA header line, got {text.splitlines()[0][:60]!r}", 1)
        return []
    if headers[0].start() != 0:
        raise ParseError(name, f"expected a VMA header line first, got {text.splitlines()[0][:60]!r}", 1)
    out = []
    for i, h in enumerate(headers):
        body_start = h.end() + 1
        body_end = headers[i + 1].start() if i + 1 < len(headers) else len(text)
        out.append((h, body_start, body_end))
    return out


def _check_consistent(text: str, name: str, found: list[tuple[int, frozenset[str]]]) -> None:
    """The kernel prints one field set per file: a block missing a field was cut short."""
    union: set[str] = set()
    for _, keys in found:
        union |= keys
    for pos, keys in found:
        missing = union - keys
        if missing:
            raise ParseError(
                name, f"truncated or mangled VMA block: missing {', '.join(sorted(missing))}", _line_of(text, pos)
            )


_HEADER_BASE = {1: 16, 2: 16, 4: 16, 6: 10}


def _header_int(text: str, name: str, h: re.Match[str], group: int, what: str) -> int:
    """A header number: addresses, offsets and inodes are u64, bounded before int() and the wire.
    The line number (a scan of the text) is computed only for the error."""
    raw, base = h.group(group), _HEADER_BASE[group]
    if len(raw) <= (16 if base == 16 else 19):  # cannot exceed u64: the common case, no further check
        return int(raw, base)
    try:
        return parse_bounded(raw, name, what, MAX_U64, base)
    except ParseError as exc:
        raise ParseError(name, str(exc).removeprefix(f"{name}: "), _line_of(text, h.start())) from None


def parse_smaps(text: str, name: str = "smaps") -> list[Vma]:
    """Parse a whole /proc/PID/smaps. Raises ParseError naming `name` and the line on bad input."""
    vmas: list[Vma] = []
    seen: list[tuple[int, frozenset[str]]] = []
    for h, body_start, body_end in _blocks(text, name):
        values, eligible = _parse_block(text, name, body_start, body_end)
        for key in _REQUIRED:
            if _KB_FIELDS[key] not in values:
                raise ParseError(name, f"VMA block has no {key} field", _line_of(text, h.start()))
        start, end = _header_int(text, name, h, 1, "VMA start"), _header_int(text, name, h, 2, "VMA end")
        if end < start:
            raise ParseError(name, f"VMA end {end:#x} below start {start:#x}", _line_of(text, h.start()))
        path = (h.group(7) or "").rstrip()
        deleted = path.endswith(" (deleted)")
        if deleted:
            path = path[: -len(" (deleted)")]
        seen.append((h.start(), frozenset(values) | ({"thp"} if eligible is not None else set())))
        vmas.append(
            Vma(
                start=start,
                end=end,
                perms=h.group(3),
                offset=_header_int(text, name, h, 4, "file offset"),
                dev=h.group(5),
                inode=_header_int(text, name, h, 6, "inode"),
                path=path,
                deleted=deleted,
                thp_eligible=eligible,
                **values,
            )
        )
    _check_consistent(text, name, seen)
    return vmas


def parse_smaps_rollup(text: str, name: str = "smaps_rollup") -> SmapsRollup:
    """Parse /proc/PID/smaps_rollup. An empty file (kernel thread, exited process) is an error here:
    the caller asked about a process that has no mm to report."""
    blocks = _blocks(text, name)
    if len(blocks) != 1:
        raise ParseError(name, f"expected exactly one [rollup] block, found {len(blocks)}", 1)
    h, body_start, body_end = blocks[0]
    values, _ = _parse_block(text, name, body_start, body_end)
    if "rss_bytes" not in values:
        raise ParseError(name, "rollup has no Rss field", 1)
    return SmapsRollup(**values)


_SUMMED = [f.name for f in fields(HugeFields)]


def rollup_from_vmas(vmas: list[Vma]) -> SmapsRollup:
    """What smaps_rollup would say, computed from full smaps (the fallback for kernels before 4.14)."""
    sums: dict[str, int | None] = {}
    for attr in _SUMMED:
        if attr in ("size_bytes", "kernel_page_size_bytes"):
            continue  # smaps_rollup prints neither
        present = [getattr(v, attr) for v in vmas if getattr(v, attr) is not None]
        sums[attr] = sum(present) if present else (0 if not vmas else None)
    return SmapsRollup(vma_count=len(vmas), **sums)


# --- fast path for the sampler -------------------------------------------------------------------
#
# A QEMU process with 10,000 VMAs yields ~7.5 MB of smaps; the kernel needs ~40-55 ms of CPU to
# produce it and a line-by-line Python parse ten times that. Guest RAM lives only in large VMAs, so
# the sampler scans for `Size:` lines of at least `min_bytes` with one C-level regex pass and parses
# just those blocks (strictly), plus the first and last block so that a truncated or foreign file is
# still an error. The sampler streams the file through LargeVmaScanner (below), a chunk at a time
# while it is in cache; nothing returned refers to its buffer.
#
# Cost of that pass (bench/smaps_cost.py, docs/benchmarks.md): the regex engine steps through every
# byte, so what matters is how little it does per byte and per candidate line. `[ \t]*+` is possessive,
# so the spaces before a small size are not given back one at a time to retry `\d{5,}`, and the
# search stops on "ze:" rather than on every newline (see _big_size_pattern). Together they take the
# pass to 0.51-0.56 of the time of the original rb"\nSize:[ \t]*(\d{5,}) kB\n" on 7.5 MB of smaps
# (8.7 -> 4.3 ms, or 14 -> 8 ms when the CPU is slower); a pattern that never matches still costs
# 0.34-0.40 of it, so little more is to be had from the regex engine.
# Reading /proc/PID/maps first to find the large VMAs and seeking their headers does not pay: the
# kernel alone spends about as long producing maps (no page walk, but a formatted line per VMA) as
# this whole pass takes.
# Past that floor, the same search is compiled (agent/sources/_smapscan.c: memchr at memory speed, about a
# tenth of the regex's time); the regex stays as the fallback where the extension was not built.

_HEADER_B = re.compile(rb"\n[0-9a-f]+-[0-9a-f]+ ")
_BIG_SIZE: dict[int, re.Pattern[bytes]] = {}


def _big_size_pattern(digits: int) -> re.Pattern[bytes]:
    """`Size:` lines whose kB value has at least `digits` digits (the others are dropped in C)."""
    pattern = _BIG_SIZE.get(digits)
    if pattern is None:
        # Same lines as rb"\nSize:[ \t]*(\d{N,}) kB\n" (tests/test_smaps.py checks), found faster: the engine
        # stops on "ze:" (3 times per block) rather than on every newline (about 26 per block), and
        # rejects KernelPageSize/MMUPageSize at once by the look-behind.
        pattern = _BIG_SIZE[digits] = re.compile(rb"ze:(?<=\nSize:)[ \t]*+(\d{%d,}+) kB(?=\n)" % digits)
    return pattern


# The same search plus the `Size:` lines that are not `[ \t]*<digits> kB\n` (`Size: lots kB`), in one
# pass: those are reported so that their block is parsed strictly and fails, instead of being skipped
# as "small" and the file read as healthy. A small well-formed size matches neither branch.
_CANDIDATES: dict[int, re.Pattern[bytes]] = {}


def _candidate_pattern(digits: int) -> re.Pattern[bytes]:
    pattern = _CANDIDATES.get(digits)
    if pattern is None:
        pattern = _CANDIDATES[digits] = re.compile(
            rb"ze:(?<=\nSize:)(?:[ \t]*+(\d{%d,}+) kB(?=\n)|(?![ \t]*+\d++ kB\n))" % digits)
    return pattern


def _big_size_lines_regex(data: bytes | bytearray | memoryview, digits: int, min_value: int = 0) -> list[tuple[int, int, int]]:
    """(offset of the newline before `Size:`, start, end of its digits) for each `Size:` line of at
    least `digits` digits (and, if it has at most 18, a value of at least `min_value`), and (offset of
    that newline, end of `Size:`, the same) for each malformed `Size:` line: the fallback for
    _smapscan.big_size_lines, which returns the same."""
    if digits < 1:
        raise ValueError("min_digits must be at least 1")
    out = []
    for m in _candidate_pattern(digits).finditer(data):
        if m.group(1) is None:
            out.append((m.start() - 3, m.end(), m.end()))
        elif min_value <= 0 or m.end(1) - m.start(1) > 18 or int(m.group(1)) >= min_value:
            out.append((m.start() - 3, m.start(1), m.end(1)))
    return out


try:
    from eptwatch.agent.sources._smapscan import big_size_lines as _big_size_lines_c
except ImportError:  # built without a compiler: the regex does the same, slower
    _big_size_lines_c = None

# Which candidate search this agent runs ("c" or "regex"): the agent logs it at start and exports it
# as a label of eptwatch_agent_build_info, so a fleet can see hosts that run the slow path.
SCANNER = "c" if _big_size_lines_c is not None else "regex"
_big_size_lines = _big_size_lines_c if _big_size_lines_c is not None else _big_size_lines_regex


try:
    from eptwatch.agent.sources._smapscan import count_newlines as _count_newlines_c
except ImportError:
    _count_newlines_c = None


def _count_newlines_py(data: bytes | bytearray | memoryview) -> int:
    return bytes(data).count(b"\n") if isinstance(data, memoryview) else data.count(b"\n")


# Both the compiled search and the compiled line count, or neither: SCANNER names one pair.
_count_newlines = _count_newlines_c if _big_size_lines_c is not None and _count_newlines_c is not None else _count_newlines_py

try:
    from eptwatch.agent.sources._smapscan import FdScan as _FdScan
except ImportError:  # not built, or built before the compiled read loop: the Python loop reads
    _FdScan = None

# The streaming scan reads smaps in chunks of this size into one small reused buffer and scans each
# chunk right after the kernel wrote it, while it is still in the CPU's cache (bench/smaps_cost.py:
# holding the whole 7.5 MB file and scanning it afterwards cost 4 to 8% of `cat` more than this).
CHUNK_BYTES = 128 * 1024
# A scanner keeps a buffer grown by a huge block (only a mangled file has one) up to this much.
_KEEP_BYTES = 4 * 1024 * 1024
# The start of the last VMA header line in a region: a greedy `.*` backtracks from the region's end,
# so the cost is the length of the last block, not of the region.
_LAST_HEADER = re.compile(rb".*\n()[0-9a-f]+-[0-9a-f]+ ", re.DOTALL)
_VMFLAGS = b"\nVmFlags:"


try:
    from eptwatch.agent.sources._smapscan import block_fields as _block_fields
except ImportError:  # not built (or built before it): every block is parsed in Python
    _block_fields = None
try:
    from eptwatch.agent.sources._smapscan import plain_block as _plain_block
except ImportError:
    _plain_block = None

# The attributes of _smapscan.block_fields's eight values, in its order (tests/test_smaps.py checks).
_KB_ATTRS = tuple(_KB_FIELDS.values())


def _parse_plain_block(block: bytes | bytearray | memoryview) -> Vma | None:
    """One VMA block of the kernel's plain shape, read with the compiled body reader
    (_smapscan.block_fields); None where it declines or the header needs a closer look (a number past
    the fast bound, end below start): the caller then parses the block in Python, which gives the
    same Vma or the error. Only what parse_smaps would accept is returned (tests/test_smaps.py
    compares the two on mutated blocks)."""
    if _plain_block is not None:
        # Header and body in C: the header's regex, the dict and the keyword call cost about 25 us per
        # block in Python when the caches are cold (right after another process ran), and the two
        # guest-RAM blocks of a QEMU are parsed on every sample. Declined blocks go on to the Python
        # header reading below, then to the strict parse.
        whole = _plain_block(block, _MAX_KB_DIGITS - 1)
        if whole is not None:
            return Vma(*whole)  # the fields in Vma's order (tests/test_smaps.py checks)
    if _block_fields is None:
        return None
    got = _block_fields(block, _MAX_KB_DIGITS - 1)  # fewer digits than MAX_KB has: within the bound
    if got is None:
        return None
    *kb, eligible, first_nl = got
    h = _HEADER.match(bytes(block[:first_nl]).decode("utf-8", errors="replace"))
    if h is None:
        return None
    values = {attr: value for attr, value in zip(_KB_ATTRS, kb) if value is not None}
    if "size_bytes" not in values or "rss_bytes" not in values:
        return None
    start_hex, end_hex, offset_hex, inode_dec = h.group(1), h.group(2), h.group(4), h.group(6)
    if len(start_hex) > 16 or len(end_hex) > 16 or len(offset_hex) > 16 or len(inode_dec) > 19:
        return None  # as _header_int: may exceed u64, checked (and named) by the Python parse
    start, end = int(start_hex, 16), int(end_hex, 16)
    if end < start:
        return None
    path = (h.group(7) or "").rstrip()
    deleted = path.endswith(" (deleted)")
    if deleted:
        path = path[: -len(" (deleted)")]
    return Vma(start=start, end=end, perms=h.group(3), offset=int(offset_hex, 16), dev=h.group(5), inode=int(inode_dec, 10),
               path=path, deleted=deleted, thp_eligible=eligible, **values)


def _parse_block_bytes(block: bytes | bytearray | memoryview, name: str, line_base: int) -> Vma:
    """One VMA block, parsed strictly; `line_base` newlines precede it in the file (for the error)."""
    vma = _parse_plain_block(block)
    if vma is not None:
        return vma
    text = bytes(block).decode("utf-8", errors="replace")
    try:
        vmas = parse_smaps(text, name)
    except ParseError as exc:
        # Re-anchor the line number from the block to the whole file (the message keeps the field it names).
        where = f"{exc.name}:{exc.line}: " if exc.line is not None else f"{exc.name}: "
        raise ParseError(name, str(exc).removeprefix(where), (exc.line or 1) + line_base) from None
    if len(vmas) != 1:
        raise ParseError(name, f"expected one VMA block, found {len(vmas)}", line_base + 1)
    return vmas[0]


class LargeVmaScanner:
    """The sampler's smaps pass, fed chunk by chunk as the file is read: the VMAs of at least
    `min_bytes`, parsed strictly, plus the checks that make a truncated or foreign file an error.
    Smaller VMAs are located but not parsed.

    Use: `start(name, min_bytes)`, then `HostRoot.read_bytes(path, into=scanner)` (which hands the
    open file to `read_fd`, the compiled loop, or where that is not built calls `room()` and
    `filled(n)` until the end of the file), then `finish()`. `scan_large_vmas` does the
    same over bytes already in memory; whatever the chunk size, the result and any error (message
    and line) are the same (tests/test_smaps.py checks).

    Only the last, still open VMA block is carried from one chunk to the next (about a kilobyte), so
    the buffer stays at about `chunk_bytes`. Line numbers for errors come from counting the newlines
    of each chunk while it is in cache. Not thread-safe: one per sampling thread.

    What is checked, and in which order the first failure is reported (as scan_large_vmas always did):
    the file ends with a newline; its first line is a VMA header; every large VMA block (and every
    malformed `Size:` line's block) parses strictly; the first and the last block parse strictly
    and carry the same fields; if any block has VmFlags, the last one does.
    """

    def __init__(self, chunk_bytes: int = CHUNK_BYTES) -> None:
        if chunk_bytes < 1:
            raise ValueError("chunk_bytes must be at least 1")
        self._chunk = chunk_bytes
        self._buf = bytearray(chunk_bytes + 4096)
        self._fd_scan: Any = None  # the compiled loop (_smapscan.FdScan), made at its first use
        self._parsed: dict[bytes, tuple[Vma, frozenset[str]]] = {}  # first and last blocks parsed before (see _parse_sample)
        self._headers: set[bytes] = set()  # first lines judged to be VMA headers before (see _judge_first_line)
        self.start("smaps", 0)

    def start(self, name: str, min_bytes: int) -> None:
        """Forget any previous file and scan a new one, `name` being how errors name it."""
        if len(self._buf) > _KEEP_BYTES:
            self._buf = bytearray(self._chunk + 4096)
        self._name = name
        self._min_kb = min_bytes // KIB
        self._digits = max(1, len(str(self._min_kb)))
        self._n = 0  # bytes held in _buf
        self._base = 0  # file offset of _buf[0]
        self._scanned = 0  # _buf index where the unscanned text starts (a line start)
        self._lines = 0  # newlines in the file before _scanned
        self._total = 0
        self._last_byte = -1
        self._block = 0  # _buf index of the start of the last VMA header line seen (the file's start at first)
        self._first_nl: int | None = None  # file offset of the first newline
        self._first_block: bytes | None = None
        self._pending: list[int] = []  # file offsets of candidate blocks whose end is not read yet
        self._pending_from = 0  # file offset from which to look for their end
        self._out: list[Vma] = []
        self._seen: set[int] = set()
        self._vmflags = False
        self._header_error: ParseError | None = None
        self._candidate_error: ParseError | None = None
        self._draining = False  # an error is known: only the newline count and the last byte still matter

    # --- the whole read, compiled (hostroot.FdSink) ---

    def read_fd(self, fd: int, limit: int, deadline: float, clock: Callable[[], float]) -> str | None:
        """Read the open file `fd` (HostRoot opened it beneath the root and checked it is a regular
        file) to its end and scan it, in the compiled loop (_smapscan.FdScan): read() into one small
        reused buffer and scan each chunk at once, as filled() does, with the same bounds as
        HostRoot's own loop: more than `limit` bytes -> "too_large", clock() past `deadline` after a
        chunk -> "timeout", else "" (then call finish()). A failed read() raises OSError. None: no
        compiled loop here (or the regex search is switched on): feed this scanner through room() and
        filled() instead; nothing was read."""
        if _FdScan is None or _big_size_lines is not _big_size_lines_c:
            return None
        if self._fd_scan is None:
            self._fd_scan = _FdScan(self._chunk)
        outcome = self._fd_scan.run(fd, limit, self._digits, self._min_kb, deadline, clock, self._judge_first_line, self._take_block)
        if outcome == 1:
            return "too_large"
        if outcome == 2:
            return "timeout"
        (self._total, self._lines, self._last_byte, self._first_block, tail, self._base, self._block, self._scanned,
         self._pending, self._vmflags) = self._fd_scan.state()
        # finish() takes the carried tail (the last block and anything after it) from _buf.
        if len(tail) <= len(self._buf):
            self._buf[: len(tail)] = tail
        else:
            self._buf = bytearray(tail)
        self._n = len(tail)
        return ""

    def _judge_first_line(self, line: bytes) -> bool:
        """FdScan's callback for the file's first line (as filled() judges it); False: not a header."""
        if line in self._headers:  # the same process's first line as before: a pure function of the bytes
            return True
        if _HEADER.match(line.decode("utf-8", errors="replace")) is None:
            self._header_error = ParseError(self._name, f"expected a VMA header line first, got {line[:60]!r}", 1)
            return False
        if len(line) <= 8192:  # a real header is under 4.2 KB (PATH_MAX and the fields before it)
            if len(self._headers) >= 8:
                self._headers.clear()
            self._headers.add(line)
        return True

    def _take_block(self, offset: int, block: bytes, line_base: int) -> bool:
        """FdScan's callback for a candidate block at file `offset` after `line_base` newlines (as
        _take parses it); False: it failed, and that error is kept for finish()."""
        self._seen.add(offset)
        try:
            self._out.append(_parse_block_bytes(block, self._name, line_base))
        except ParseError as exc:
            self._candidate_error = exc
            return False
        return True

    # --- the sink HostRoot.read_bytes fills ---

    def room(self) -> memoryview:
        """Where the next read lands: `chunk_bytes` free bytes after what is carried."""
        need = self._n + self._chunk
        if len(self._buf) < need:
            self._buf.extend(bytes(need - len(self._buf)))  # a block longer than a chunk: only a mangled file
        return memoryview(self._buf)[self._n : need]

    def filled(self, got: int) -> None:
        """`got` bytes were read into the last room()."""
        if got <= 0:
            return
        buf = self._buf
        n = self._n = self._n + got
        self._total += got
        self._last_byte = buf[n - 1]
        cut = buf.rfind(b"\n", self._scanned, n) + 1  # the complete lines end here
        if cut <= self._scanned:
            return  # no complete new line yet
        counted = _count_newlines(memoryview(buf)[self._scanned : cut])
        if self._first_nl is None:
            self._first_nl = first_nl = buf.find(b"\n", 0, cut)
            if _HEADER.match(buf[:first_nl].decode("utf-8", errors="replace")) is None:
                self._header_error = ParseError(self._name, f"expected a VMA header line first, got {bytes(buf[: min(60, first_nl)])!r}", 1)
                self._draining = True
        if self._draining:
            self._lines += counted
            self._base += n
            self._n = self._scanned = self._block = 0
            return
        lo = self._scanned - 1 if self._scanned > 0 else 0  # from the newline before the first new line
        if self._pending:
            self._resolve_pending(cut)
        if self._first_block is None:
            assert self._first_nl is not None
            m = _HEADER_B.search(buf, max(self._first_nl - self._base, lo), cut)
            if m is not None:
                self._first_block = bytes(buf[: m.start() + 1])  # the first block starts the file: _base is 0
        # Sizes below min_kb are dropped by the search itself. An empty digit range is a malformed Size
        # line: its block is parsed (and fails). A value longer than any real size (over 18 digits) is
        # parsed too, and fails its bound.
        for newline, _, _ in _big_size_lines(memoryview(buf)[lo:cut], self._digits, self._min_kb):
            if self._candidate_error is not None:
                break
            newline += lo
            start = buf.rfind(b"\n", 0, newline) + 1  # the header: the line before `Size:`
            if self._pending:
                self._pending.append(self._base + start)
                continue
            m = _HEADER_B.search(buf, newline + 1, cut)
            if m is None:  # the block goes on past this chunk
                self._pending.append(self._base + start)
                self._pending_from = self._base + cut - 1  # searched up to here; a header's newline may be the last one
                continue
            self._take(start, m.start() + 1)
        if not self._vmflags:  # as before: a VmFlags line anywhere but at the file's very start
            self._vmflags = buf.find(_VMFLAGS, lo + 1 if lo == 0 and self._base == 0 else lo, cut) >= 0
        m = _LAST_HEADER.match(buf, lo, cut)
        if m is not None:
            self._block = m.start(1)
        if self._candidate_error is not None:
            self._draining = True
        # Keep the last block (with the newline before it) and the partial line; drop the rest.
        keep = self._block - 1 if self._block > 0 else 0
        if self._draining:
            keep = n
        if keep > 0:
            buf[: n - keep] = buf[keep:n]
            self._base += keep
            self._n = n - keep
            self._block -= min(keep, self._block)
        self._scanned = cut - keep if cut > keep else 0
        self._lines += counted

    # --- the result ---

    def finish(self) -> list[Vma]:
        """The large VMAs of the file fed since start(), or the ParseError that describes it."""
        name = self._name
        if self._total == 0:
            return []
        if self._last_byte != ord("\n"):
            # No newline after the last cut: every newline of the file is counted.
            raise ParseError(name, "truncated: the file does not end with a newline", self._lines + 1)
        if self._header_error is not None:
            raise self._header_error
        if self._candidate_error is not None:
            raise self._candidate_error
        buf, n = self._buf, self._n
        for start in self._pending:  # the last block was a candidate: it ends with the file
            self._take(start - self._base, n)
        pending, self._pending = self._pending, []
        del pending
        if self._candidate_error is not None:
            raise self._candidate_error
        first = self._first_block if self._first_block is not None else bytes(buf[:n])
        last_start = self._base + self._block
        # (file offset, block, its index in _buf or -1 for the first block, which starts the file)
        samples: list[tuple[int, bytes, int]] = [(0, first, -1)]
        if last_start == 0 or self._first_block is None:
            samples = [(0, bytes(buf[:n]), -1)]  # one block: from the start to the end of the file
        else:
            samples.append((last_start, bytes(buf[self._block : n]), self._block))
        reference: frozenset[str] | None = None
        for start, block, index in samples:
            if start in self._seen:
                continue
            vma, present = self._parse_sample(block, name, index)
            if reference is None:
                reference = present
            elif present != reference:
                line_base = self._line_at(index) - 1 if index >= 0 else 0
                raise ParseError(name, f"truncated or mangled VMA block: fields {sorted(reference ^ present)} differ from the first block",
                                 line_base + 1)
        if self._vmflags and buf.find(_VMFLAGS, max(0, self._block - 1), n) < 0:
            raise ParseError(name, "truncated: the last VMA block has no VmFlags line", self._line_at(self._block))
        return self._out

    # --- helpers ---

    def _parse_sample(self, block: bytes, name: str, index: int) -> tuple[Vma, frozenset[str]]:
        """The first or last block (at _buf[index], or -1: the file's first block), parsed strictly, with
        the names of the HugeFields it has; a block that parsed before, byte for byte, is not parsed
        again. Those two (the VMM binary's first mapping, [vsyscall] or the stack at the end) rarely
        change between samples of one process, and parsing each costs 20 to 40 us of Python
        (bench/smaps_cost.py: measurable against `cat` of a page-cache copy, lost in the kernel's
        cost of a real smaps). Parsing is a pure function of the bytes, and only blocks that parsed
        are kept (an error is raised again each time); the line number (counted only when a block is
        parsed: it names the line of an error) plays no part in a Vma."""
        known = self._parsed.get(block) if len(block) <= 65536 else None  # a real block is under a kilobyte
        if known is None:
            vma = _parse_block_bytes(block, name, self._line_at(index) - 1 if index >= 0 else 0)
            known = (vma, frozenset(f for f in _SUMMED if getattr(vma, f) is not None))
            if len(block) <= 65536:
                if len(self._parsed) >= 8:  # a handful of processes per scanner: forget rather than grow
                    self._parsed.clear()
                self._parsed[block] = known
        return known

    def _take(self, start: int, end: int) -> None:
        """Parse the candidate block at _buf[start:end]; the first failure is kept for finish()."""
        self._seen.add(self._base + start)
        try:
            self._out.append(_parse_block_bytes(memoryview(self._buf)[start:end], self._name, self._line_at(start) - 1))
        except ParseError as exc:
            self._candidate_error = exc

    def _resolve_pending(self, cut: int) -> None:
        m = _HEADER_B.search(self._buf, max(self._pending_from - self._base, 0), cut)
        if m is None:
            self._pending_from = self._base + max(cut - 1, 0)  # a header's newline may be the last one
            return
        end = m.start() + 1
        pending, self._pending = self._pending, []
        for start in pending:
            if self._candidate_error is None:
                self._take(start - self._base, end)

    def _line_at(self, index: int) -> int:
        """The line number of the line that starts at _buf[index] (on error paths and per block parsed)."""
        if index <= self._scanned:
            return self._lines - self._buf.count(b"\n", index, self._scanned) + 1
        return self._lines + self._buf.count(b"\n", self._scanned, index) + 1


def scan_large_vmas(data: bytes | bytearray, name: str, min_bytes: int, chunk_bytes: int = CHUNK_BYTES) -> list[Vma]:
    """The VMAs of at least `min_bytes`, parsed strictly, from a whole smaps file already in memory;
    smaller VMAs are located but not parsed. Raises ParseError for a truncated file or one that is
    not smaps. The same pass as the sampler's streaming read (LargeVmaScanner), fed from `data`."""
    scanner = LargeVmaScanner(chunk_bytes)
    scanner.start(name, min_bytes)
    view = memoryview(data)
    for pos in range(0, len(view), chunk_bytes):
        piece = view[pos : pos + chunk_bytes]
        with scanner.room() as room:
            room[: len(piece)] = piece
        scanner.filled(len(piece))
    return scanner.finish()
