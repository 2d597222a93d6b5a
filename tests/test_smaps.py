from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eptwatch.agent.sources.smaps import _HEADER as HEADER_PATTERN
from eptwatch.agent.sources.smaps import parse_smaps, parse_smaps_rollup, rollup_from_vmas
from eptwatch.agent.sources.status import ParseError

from .conftest import fixture_roots

SEED_BLOCK = """\
7f2778200000-7f2878200000 rw-s 00000000 00:14 262232                     /dev/shm/qemu_back_mem.mem.Hz2hSf (deleted)
Size:            4194304 kB
KernelPageSize:        4 kB
MMUPageSize:           4 kB
Rss:              583680 kB
AnonHugePages:         0 kB
ShmemPmdMapped:   579584 kB
Shared_Hugetlb:        0 kB
Private_Hugetlb:       0 kB
Locked:                0 kB
THPeligible:    1
VmFlags: rd wr sh mr mw me ms sd
"""
ANON_BLOCK = """\
7f4000000000-7f4100000000 rw-p 00000000 00:00 0 
Size:            4194304 kB
KernelPageSize:        4 kB
MMUPageSize:           4 kB
Rss:             4196352 kB
AnonHugePages:   4194304 kB
ShmemPmdMapped:        0 kB
Shared_Hugetlb:        0 kB
Private_Hugetlb:       0 kB
Locked:                0 kB
THPeligible:    1
VmFlags: rd wr mr mw me ac sd
"""


def test_seed_block_in_bytes() -> None:
    (vma,) = parse_smaps(SEED_BLOCK, "seed")
    assert vma.start == 0x7F2778200000 and vma.end == 0x7F2878200000
    assert vma.path == "/dev/shm/qemu_back_mem.mem.Hz2hSf" and vma.deleted
    assert vma.size_bytes == 4194304 * 1024
    assert vma.shmem_pmd_mapped_bytes == 579584 * 1024
    assert vma.anon_huge_bytes == 0
    assert vma.file_pmd_mapped_bytes is None  # 5.3 does not print it: unknown, not 0
    assert vma.thp_eligible is True
    assert vma.dev == "00:14" and vma.inode == 262232 and vma.perms == "rw-s"


def test_anonymous_vma_has_empty_path() -> None:
    (vma,) = parse_smaps(ANON_BLOCK, "anon")
    assert vma.path == "" and not vma.deleted
    assert vma.anon_huge_bytes == 4 * 1024**3


def test_empty_smaps_is_no_vmas() -> None:
    assert parse_smaps("", "kthread") == []


@pytest.mark.parametrize(
    "text, needle, line",
    [
        (SEED_BLOCK[:-1], "does not end with a newline", 12),
        (SEED_BLOCK.replace("Rss:              583680 kB", "Rss:              583680 MB"), "expected '<digits> kB'", 5),
        (SEED_BLOCK.replace("ShmemPmdMapped:   579584 kB\n", "ShmemPmdMapped:   579584 kB\ngarbage line here\n"), "expected a VMA header", 8),
        ("hello world\n", "expected a VMA header", 1),
        (SEED_BLOCK + ANON_BLOCK.split("ShmemPmdMapped")[0], "missing", 13),
        (SEED_BLOCK.replace("Size:            4194304 kB\n", ""), "no Size field", 1),
        (SEED_BLOCK.replace("Rss:              583680 kB", "Rss:              583680 kB\nRss: 1 kB"), "repeated", None),
        (SEED_BLOCK.replace("THPeligible:    1", "THPeligible:    7"), "THPeligible", None),
        (SEED_BLOCK.replace("7f2778200000-7f2878200000", "7f2878200000-7f2778200000"), "below start", 1),
    ],
)
def test_malformed_smaps_names_file_and_line(text: str, needle: str, line: int | None) -> None:
    with pytest.raises(ParseError) as info:
        parse_smaps(text, "/proc/42/smaps")
    msg = str(info.value)
    assert needle in msg
    assert msg.startswith("/proc/42/smaps")
    if line is not None:
        assert info.value.line == line


def test_truncated_after_whole_block_is_detected() -> None:
    # Cut after VmFlags of the first block but before the second block ends: the short block lacks fields.
    text = SEED_BLOCK + "\n".join(ANON_BLOCK.split("\n")[:5]) + "\n"
    with pytest.raises(ParseError, match="missing"):
        parse_smaps(text, "t")


@pytest.mark.parametrize("root", fixture_roots(), ids=lambda p: p.name)
def test_rollup_matches_sum_of_smaps(root) -> None:  # type: ignore[no-untyped-def]
    """smaps_rollup and the sum over smaps agree on every fixture (one table, two paths)."""
    for pid_dir in (root / "proc").iterdir():
        rollup_file = pid_dir / "smaps_rollup"
        if not rollup_file.exists():
            continue
        vmas = parse_smaps((pid_dir / "smaps").read_text(), "smaps")
        summed = rollup_from_vmas(vmas)
        direct = parse_smaps_rollup(rollup_file.read_text(), "smaps_rollup")
        for attr in ("rss_bytes", "anon_huge_bytes", "shmem_pmd_mapped_bytes", "file_pmd_mapped_bytes", "hugetlb_bytes"):
            assert getattr(summed, attr) == getattr(direct, attr), attr


def test_rollup_parse() -> None:
    text = "00400000-7fff00000000 ---p 00000000 00:00 0                          [rollup]\nRss: 100 kB\nAnonHugePages: 2048 kB\n"
    r = parse_smaps_rollup(text, "r")
    assert r.rss_bytes == 100 * 1024 and r.anon_huge_bytes == 2048 * 1024 and r.shmem_pmd_mapped_bytes is None


def test_rollup_rejects_empty_and_multiple() -> None:
    with pytest.raises(ParseError, match="exactly one"):
        parse_smaps_rollup("", "r")
    with pytest.raises(ParseError, match="exactly one"):
        parse_smaps_rollup(SEED_BLOCK + ANON_BLOCK, "r")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=2000))
def test_random_text_parses_or_raises_parse_error(text: str) -> None:
    try:
        parse_smaps(text, "fuzz")
    except ParseError:
        pass
    try:
        parse_smaps_rollup(text, "fuzz")
    except ParseError:
        pass


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_mutated_smaps_parses_or_raises_parse_error(data: st.DataObject) -> None:
    text = SEED_BLOCK + ANON_BLOCK
    pos = data.draw(st.integers(0, len(text)))
    kind = data.draw(st.sampled_from(["truncate", "insert", "delete", "replace"]))
    if kind == "truncate":
        mutated = text[:pos]
    elif kind == "insert":
        mutated = text[:pos] + data.draw(st.text(max_size=20)) + text[pos:]
    elif kind == "delete":
        mutated = text[:pos] + text[pos + data.draw(st.integers(1, 40)) :]
    else:
        mutated = text[:pos] + data.draw(st.characters()) + text[pos + 1 :]
    try:
        vmas = parse_smaps(mutated, "fuzz")
    except ParseError:
        return
    # Whatever parses is internally consistent: sizes are whole kB and non-negative.
    for v in vmas:
        assert v.end >= v.start
        for attr in ("size_bytes", "rss_bytes", "anon_huge_bytes", "shmem_pmd_mapped_bytes"):
            value = getattr(v, attr)
            assert value is None or (value >= 0 and value % 1024 == 0)


# --- the sampler's fast path agrees with the strict parser ---

from collections.abc import Callable  # noqa: E402
from unittest import mock  # noqa: E402

import errno  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

from eptwatch.agent.sources import hostroot as hostroot_module  # noqa: E402

from eptwatch.agent.sources import smaps as smaps_module  # noqa: E402
from eptwatch.agent.sources.smaps import LargeVmaScanner, Vma, scan_large_vmas  # noqa: E402

# Every scan test runs with each candidate search this build has: the compiled one (agent/sources/_smapscan.c)
# and the regex fallback that hosts without it run.
SEARCHES: dict[str, Callable[..., list[tuple[int, int, int]]]] = {"regex": smaps_module._big_size_lines_regex}
if smaps_module._big_size_lines_c is not None:
    SEARCHES["c"] = smaps_module._big_size_lines_c


# And with the compiled read loop (_smapscan.FdScan, what the sampler runs where it is built), which
# reads the bytes from a file descriptor: a memfd holding them.
HAVE_FD_SCAN = smaps_module._FdScan is not None and smaps_module._big_size_lines_c is not None


# The compiled pass has a plain C, an AVX2 and an AVX-512 version; each is checked where the CPU has it.
FD_LEVELS: list[int] = []
if HAVE_FD_SCAN:
    from eptwatch.agent.sources import _smapscan

    _before = _smapscan._force_level(2)
    FD_LEVELS = list(range(_smapscan._force_level(_before) + 1))  # 2 lowered to the best this CPU has


def _scan_fd(data: bytes | bytearray, name: str, min_bytes: int, chunk_bytes: int = smaps_module.CHUNK_BYTES,
             scanner: LargeVmaScanner | None = None, level: int | None = None) -> list[Vma]:
    """The compiled loop over `data` read from a memfd, `chunk_bytes` per read loop (with the pass
    of `level`, else the best this CPU has)."""
    scanner = scanner or LargeVmaScanner(chunk_bytes)
    fd = os.memfd_create("smaps")
    before = _smapscan._force_level(level) if level is not None else None
    try:
        os.write(fd, data)
        os.lseek(fd, 0, os.SEEK_SET)
        scanner.start(name, min_bytes)
        with mock.patch.object(smaps_module, "_big_size_lines", smaps_module._big_size_lines_c):
            assert scanner.read_fd(fd, 1 << 40, float("inf"), time.monotonic) == ""
        return scanner.finish()
    finally:
        os.close(fd)
        if before is not None:
            _smapscan._force_level(before)


def _scan_each(data: bytes | bytearray, name: str, min_bytes: int) -> list[Vma]:
    """scan_large_vmas with every search, and the compiled read loop; they must agree, errors included."""
    results: dict[str, object] = {}
    for search in SEARCHES:
        with mock.patch.object(smaps_module, "_big_size_lines", SEARCHES[search]):
            try:
                results[search] = scan_large_vmas(data, name, min_bytes)
            except ParseError as exc:
                results[search] = exc
    for level in FD_LEVELS:
        try:
            results[f"fd{level}"] = _scan_fd(data, name, min_bytes, level=level)
        except ParseError as exc:
            results[f"fd{level}"] = exc
    first = results["regex"]
    for search, result in results.items():
        assert type(result) is type(first) and str(result) == str(first) and (isinstance(result, ParseError) or result == first), search
    if isinstance(first, ParseError):
        raise first
    return first  # type: ignore[return-value]

SMALL_BLOCK = ANON_BLOCK.replace("7f4000000000-7f4100000000", "7f5000000000-7f5000001000").replace(
    "Size:            4194304 kB", "Size:                  4 kB").replace("Rss:             4196352 kB", "Rss:                   4 kB").replace(
    "AnonHugePages:   4194304 kB", "AnonHugePages:         0 kB")
MIN = 64 * 1024 * 1024


@pytest.mark.parametrize("root", fixture_roots(), ids=lambda p: p.name)
def test_fast_scan_equals_strict_parse_on_fixtures(root) -> None:  # type: ignore[no-untyped-def]
    for smaps in (root / "proc").glob("*/smaps"):
        data = smaps.read_bytes()
        strict = [v for v in parse_smaps(data.decode(), "s") if (v.size_bytes or 0) >= MIN]
        assert _scan_each(data, "s", MIN) == strict


def test_fast_scan_rejects_truncation_and_foreign_text() -> None:
    data = (SMALL_BLOCK + SEED_BLOCK + SMALL_BLOCK).encode()
    assert len(_scan_each(data, "s", MIN)) == 1
    with pytest.raises(ParseError, match="newline"):
        _scan_each(data[:-3], "s", MIN)
    with pytest.raises(ParseError):
        _scan_each(data[: data.rfind(b"Swap") if b"Swap" in data else len(data) - 40], "s", MIN)
    with pytest.raises(ParseError, match="header"):
        _scan_each(b"MemTotal: 1 kB\n", "s", MIN)
    cut = (SMALL_BLOCK + SEED_BLOCK + "\n".join(SMALL_BLOCK.split("\n")[:6]) + "\n").encode()
    with pytest.raises(ParseError):
        _scan_each(cut, "s", MIN)


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_fast_scan_mutations_agree_or_raise(data: st.DataObject) -> None:
    """On any mutated file the fast path either raises ParseError or returns exactly the large VMAs
    that the strict parser finds in it."""
    text = SMALL_BLOCK + SEED_BLOCK + SMALL_BLOCK + ANON_BLOCK + SMALL_BLOCK
    pos = data.draw(st.integers(0, len(text)))
    kind = data.draw(st.sampled_from(["truncate", "insert", "delete", "replace"]))
    if kind == "truncate":
        mutated = text[:pos]
    elif kind == "insert":
        mutated = text[:pos] + data.draw(st.text(alphabet="0123456789abcdef -:kB\nSizeRs", max_size=20)) + text[pos:]
    elif kind == "delete":
        mutated = text[:pos] + text[pos + data.draw(st.integers(1, 40)) :]
    else:
        mutated = text[:pos] + data.draw(st.sampled_from(list("0123456789 \nx:-"))) + text[pos + 1 :]
    try:
        fast = _scan_each(mutated.encode(), "fuzz", MIN)
    except ParseError:
        return
    try:
        strict = [v for v in parse_smaps(mutated, "fuzz") if (v.size_bytes or 0) >= MIN]
    except ParseError:
        # The strict parser sees a fault in a small block the fast path does not read: the large
        # blocks it did return must still each parse strictly on their own.
        for v in fast:
            assert v.size_bytes is not None and v.size_bytes >= MIN
        return
    assert fast == strict


# --- the scan pattern and the reused read buffer (bench/smaps_cost.py, docs/benchmarks.md) ---

import os  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

from eptwatch.agent.model.sampler import Sampler, SamplerConfig  # noqa: E402
from eptwatch.agent.sources.hostroot import MAX_READ_BYTES, HostReadError, HostRoot, ReadBuffer, read_file  # noqa: E402
from eptwatch.agent.sources.smaps import _big_size_pattern  # noqa: E402

# The pattern scan_large_vmas used before (commit 15edf7a): the new one must find the same Size lines.
_OLD_BIG_SIZE = rb"\nSize:[ \t]*(\d{%d,}) kB\n"


def _size_lines_old(data: bytes, digits: int, overlapping: bool = False) -> list[tuple[int, bytes]]:
    pattern = _OLD_BIG_SIZE % digits
    if overlapping:  # the same, except that one match's closing newline may open the next
        pattern = pattern[:-2] + rb"(?=\n)"
    return [(m.start(), m.group(1)) for m in re.finditer(pattern, data)]


def _size_lines_new(data: bytes, digits: int) -> list[tuple[int, bytes]]:
    return [(m.start() - 3, m.group(1)) for m in _big_size_pattern(digits).finditer(data)]  # at its "\n"


_FIELDS = ("Size", "KernelPageSize", "MMUPageSize", "Rss", "AnonHugePages", "ShmemPmdMapped", "Shared_Hugetlb", "Private_Hugetlb")


@st.composite
def smaps_texts(draw: st.DrawFn) -> str:
    """A well-formed smaps of random VMAs: sizes from one page to 512 GiB (so some are guest-RAM
    sized), kB values printed with the kernel's fixed width or with any run of spaces and tabs."""
    n = draw(st.integers(1, 12))
    addr = 0x7F0000000000
    blocks = []
    for _ in range(n):
        addr += draw(st.integers(0, 1 << 32)) // 4096 * 4096
        size_kb = draw(st.one_of(st.integers(1, 9999), st.integers(10_000, 1 << 29))) // 4 * 4 or 4
        start, addr = addr, addr + size_kb * 1024
        path = draw(st.sampled_from(["", "/dev/shm/ram", "[heap]", "/usr/lib/libc.so.6", "memfd:ram (deleted)"]))
        lines = [f"{start:x}-{addr:x} rw-p 00000000 00:00 0" + (f"{' ' * draw(st.integers(1, 30))}{path}" if path else " ")]
        for key in _FIELDS:
            value = {"Size": size_kb, "KernelPageSize": 4, "MMUPageSize": 4}.get(key, draw(st.integers(0, size_kb)))
            pad = draw(st.one_of(st.just(" " * max(1, 24 - len(key) - len(str(value)))), st.text(" \t", min_size=0, max_size=20)))
            lines.append(f"{key}:{pad}{value} kB")
        lines.append(f"THPeligible:    {draw(st.sampled_from('01'))}")
        lines.append("VmFlags: rd wr mr mw me ac ")
        blocks.append("\n".join(lines) + "\n")
        addr += 4096
    return "".join(blocks)


@settings(max_examples=300, deadline=None)
@given(smaps_texts(), st.sampled_from([2 * 1024 * 1024, MIN, 1 << 30]))
def test_fast_scan_equals_strict_parse_on_generated_smaps(text: str, min_bytes: int) -> None:
    strict = [v for v in parse_smaps(text, "g") if (v.size_bytes or 0) >= min_bytes]
    data = text.encode()
    assert _scan_each(data, "g", min_bytes) == strict
    assert _scan_each(bytearray(data), "g", min_bytes) == strict  # the sampler passes its buffer
    digits = len(str(min_bytes // 1024))
    assert _size_lines_new(data, digits) == _size_lines_old(data, digits)


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=" \t0123456789kBSize:\nxK", max_size=200))
def test_size_pattern_finds_the_lines_the_old_one_found(noise: str) -> None:
    """Exactly the old pattern's lines, plus (only) a Size line right after a matched one, which the
    old pattern skipped because it consumed the newline between them (a block with two Size lines,
    which the strict parse of that block rejects either way)."""
    data = ("\nSize:" + noise + "\n").encode()
    for digits in (1, 5, 7):
        new = _size_lines_new(data, digits)
        assert new == _size_lines_old(data, digits, overlapping=True)
        assert set(_size_lines_old(data, digits)) <= set(new)


_needs_c = pytest.mark.skipif("c" not in SEARCHES, reason="the compiled scanner eptwatch.agent.sources._smapscan is not built here")


@_needs_c
@settings(max_examples=1000, deadline=None)
@given(st.text(alphabet=" \t0123456789kBSize:\nxKz", max_size=300), st.integers(1, 8))
def test_compiled_search_equals_the_regex_on_noise(noise: str, digits: int) -> None:
    compiled = SEARCHES["c"]
    for data in (noise.encode(), ("\nSize:" + noise).encode(), ("\nSize:" + noise + " kB\n").encode()):
        expected = smaps_module._big_size_lines_regex(data, digits)
        assert compiled(data, digits) == expected
        assert compiled(bytearray(data), digits) == expected and compiled(memoryview(data), digits) == expected


@_needs_c
@settings(max_examples=200, deadline=None)
@given(smaps_texts(), st.integers(1, 9))
def test_compiled_search_equals_the_regex_on_generated_smaps(text: str, digits: int) -> None:
    data = text.encode()
    assert SEARCHES["c"](data, digits) == smaps_module._big_size_lines_regex(data, digits)


@_needs_c
def test_compiled_search_edges() -> None:
    compiled = SEARCHES["c"]
    line = b"\nSize:      65536 kB\n"
    assert compiled(line, 5) == [(0, 12, 17)] and compiled(line, 6) == []
    assert compiled(line[:-1], 5) == [(0, 6, 6)] and compiled(line[1:], 1) == []  # no closing newline: malformed; no opening one: not a Size line
    assert compiled(b"", 1) == [] and compiled(b"z", 1) == [] and compiled(b"\nSiz", 1) == []
    assert compiled(line * 3, 5) == [(0, 12, 17), (21, 33, 38), (42, 54, 59)]  # back to back
    with pytest.raises(ValueError):
        compiled(line, 0)
    with pytest.raises(TypeError):
        compiled("text", 1)  # type: ignore[arg-type]


def test_fast_scan_errors_read_the_same_for_a_buffer() -> None:
    for data in (b"MemTotal: 1 kB\n", (SMALL_BLOCK + SEED_BLOCK).encode()[:-3]):
        with pytest.raises(ParseError) as from_bytes:
            _scan_each(data, "s", MIN)
        with pytest.raises(ParseError) as from_buffer:
            _scan_each(bytearray(data), "s", MIN)
        assert str(from_buffer.value) == str(from_bytes.value) and "bytearray" not in str(from_buffer.value)


def _read_lent(buffer: ReadBuffer, path: Path, limit: int = MAX_READ_BYTES) -> bytes | bytearray:
    return read_file(path, limit, into=buffer)


def test_read_buffer_returns_the_file_and_reuses_itself(tmp_path: Path) -> None:
    big, small = tmp_path / "big", tmp_path / "small"
    big.write_bytes(bytes(range(256)) * 40_000)  # 10 MB: many growth steps on the first read
    small.write_bytes(b"hello\n")
    buffer = ReadBuffer()
    first = _read_lent(buffer, big)
    assert isinstance(first, bytearray) and first == big.read_bytes()
    allocated = first.__alloc__()
    second = _read_lent(buffer, small)
    assert type(second) is bytes and second == b"hello\n"  # copied out: the big allocation stays
    third = _read_lent(buffer, big)
    assert third is first and third == big.read_bytes() and third.__alloc__() == allocated
    assert _read_lent(buffer, small) == b"hello\n"


def test_read_buffer_gives_back_a_very_big_allocation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from eptwatch.agent.sources import hostroot

    monkeypatch.setattr(hostroot, "_KEEP_BYTES", 1 << 20)
    big, small = tmp_path / "big", tmp_path / "small"
    big.write_bytes(b"b" * (3 << 20))
    small.write_bytes(b"s" * 1000)
    buffer = ReadBuffer()
    assert _read_lent(buffer, big) == big.read_bytes()
    out = _read_lent(buffer, small)
    assert isinstance(out, bytearray) and out == small.read_bytes() and out.__alloc__() < (1 << 20)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([0, 1, 4095, 65535, 65536, 65537, 131072, 200_000, 1_000_003]), min_size=1, max_size=6))
def test_read_buffer_any_sequence_of_sizes(sizes: list[int]) -> None:
    """Growing, shrinking and exact multiples of the headroom: every read returns exactly its file."""
    buffer = ReadBuffer()
    with tempfile.TemporaryDirectory() as tmp:
        for i, size in enumerate(sizes):
            path = Path(tmp) / f"f{i}"
            path.write_bytes(bytes((i + j) % 251 for j in range(size)) if size < 70_000 else (bytes([i]) * size))
            assert _read_lent(buffer, path) == path.read_bytes() == read_file(path)


def test_only_reads_given_the_buffer_use_it(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"A" * 60_000)  # most of the buffer's first allocation: returned in place
    b.write_bytes(b"B" * 60_000)
    buffer = ReadBuffer()
    x = read_file(a, into=buffer)
    y = read_file(b)  # a plain read must not touch the buffer (and so not overwrite x)
    assert isinstance(x, bytearray) and type(y) is bytes and (x, y) == (a.read_bytes(), b.read_bytes())
    assert type(HostRoot.from_root("/").read_text(a)) is str and x == a.read_bytes()


def test_read_buffer_errors_are_classified_and_leave_it_usable(tmp_path: Path) -> None:
    buffer = ReadBuffer()
    with pytest.raises(HostReadError) as info:
        _read_lent(buffer, tmp_path / "nope")
    assert info.value.kind == "absent"
    big = tmp_path / "big"
    big.write_bytes(b"x" * 100)
    with pytest.raises(HostReadError) as info:
        _read_lent(buffer, big, limit=10)
    assert info.value.kind == "too_large"
    assert _read_lent(buffer, big, limit=100) == b"x" * 100  # exactly at the limit is fine
    with pytest.raises(HostReadError) as info:
        _read_lent(buffer, big, limit=99)
    assert info.value.kind == "too_large"
    assert _read_lent(buffer, big) == b"x" * 100
    with pytest.raises(HostReadError) as info:  # a directory fails as a plain read of it does
        _read_lent(buffer, tmp_path)
    with pytest.raises(HostReadError) as plain:
        read_file(tmp_path)
    assert info.value.kind == plain.value.kind == "not_regular" and str(info.value) == str(plain.value)
    assert _read_lent(buffer, big) == b"x" * 100


def test_read_buffer_refuses_to_overwrite_a_held_view(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"data\n" * 12_000)
    buffer = ReadBuffer()
    held = _read_lent(buffer, f)
    assert isinstance(held, bytearray)
    view = memoryview(held)
    with pytest.raises(BufferError):
        _read_lent(buffer, f)
    assert bytes(view) == f.read_bytes()
    view.release()
    assert _read_lent(buffer, f) == f.read_bytes()


# A process whose address space stays still while we read it: ~600 VMAs (~450 KB of smaps, read
# by the kernel one page per read()), then it waits on stdin.
_STILL_CHILD = r"""
import ctypes, mmap, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
n = 600
base = libc.mmap(None, n * 4096, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
for i in range(1, n, 2):
    libc.mprotect(base + i * 4096, 4096, mmap.PROT_READ)
print("ready", flush=True)
sys.stdin.read()
"""


def test_read_buffer_on_procfs_smaps_equals_a_plain_read() -> None:
    child = subprocess.Popen([sys.executable, "-c", _STILL_CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        path = Path(f"/proc/{child.pid}/smaps")
        buffer = ReadBuffer()

        def layout(data: bytes) -> tuple[int, list[tuple[int, int, str, str, int | None]]]:
            # Rss, Referenced and the like may move between two reads (reclaim, DAMON): compare the
            # VMAs and the line count, each read parsed strictly (so whole, not cut short).
            vmas = parse_smaps(bytes(data).decode(), str(path))
            return data.count(b"\n"), [(v.start, v.end, v.perms, v.path, v.size_bytes) for v in vmas]

        plain = read_file(path)
        assert len(plain) > 4 * 65536
        for _ in range(3):
            assert layout(_read_lent(buffer, path)) == layout(plain)
        scanned = [(v.start, v.end) for v in scan_large_vmas(_read_lent(buffer, path), str(path), 4096)]
        assert scanned == [(v.start, v.end) for v in scan_large_vmas(plain, str(path), 4096)]
    finally:
        child.kill()
        child.wait()
    with pytest.raises(HostReadError) as info:
        _read_lent(ReadBuffer(), path)
    assert info.value.kind == "absent"


def test_sampler_scan_smaps_equals_the_reference_on_all_fixtures() -> None:
    """One sampler (one reused buffer) over every fixture process in turn: each result equals a
    plain read + scan, also after later reads have overwritten the buffer."""
    files = sorted(p for root in fixture_roots() for p in (root / "proc").glob("*/smaps"))
    assert len(files) >= 10
    sampler = Sampler(HostRoot.from_root("/"), SamplerConfig())
    got = [sampler._scan_smaps(p) for p in files]
    min_bytes = SamplerConfig().guest_ram_min_bytes
    assert got == [scan_large_vmas(p.read_bytes(), str(p), min_bytes) for p in files]
    assert any(got)


def test_fast_scan_of_a_single_vma_file() -> None:
    # The last block is then also the first (at offset 0): it has its VmFlags line, nothing is cut.
    assert scan_large_vmas(SEED_BLOCK.encode(), "s", MIN) == parse_smaps(SEED_BLOCK, "s")
    assert scan_large_vmas(SMALL_BLOCK.encode(), "s", MIN) == []


def test_fast_scan_rejects_a_block_with_two_size_lines() -> None:
    # Both Size lines are candidates now (the old pattern saw only the first): same verdict.
    doubled = SEED_BLOCK.replace("Size:            4194304 kB\n", "Size:            4194304 kB\nSize:            4194304 kB\n")
    with pytest.raises(ParseError, match="repeated"):
        scan_large_vmas((SMALL_BLOCK + doubled + SMALL_BLOCK).encode(), "s", MIN)


# --- the streaming scan: chunk boundaries change nothing (LargeVmaScanner) ---


def _scan_chunked(data: bytes, name: str, min_bytes: int, chunk_bytes: int) -> list[Vma] | str:
    """scan_large_vmas fed `chunk_bytes` at a time, with every search, and the compiled read loop reading
    `chunk_bytes` at a time; the error text stands for an error (message and line)."""
    results: dict[str, list[Vma] | str] = {}
    for search in SEARCHES:
        with mock.patch.object(smaps_module, "_big_size_lines", SEARCHES[search]):
            try:
                results[search] = scan_large_vmas(data, name, min_bytes, chunk_bytes=chunk_bytes)
            except ParseError as exc:
                results[search] = f"ParseError: {exc}"
    for level in FD_LEVELS:
        try:
            results[f"fd{level}"] = _scan_fd(data, name, min_bytes, chunk_bytes, level=level)
        except ParseError as exc:
            results[f"fd{level}"] = f"ParseError: {exc}"
    assert len({repr(r) for r in results.values()}) == 1, results
    return results["regex"]


def _mutated_smaps(data: st.DataObject) -> bytes:
    text = SMALL_BLOCK + SEED_BLOCK + SMALL_BLOCK + ANON_BLOCK + SMALL_BLOCK
    pos = data.draw(st.integers(0, len(text)))
    kind = data.draw(st.sampled_from(["none", "truncate", "insert", "delete", "replace"]))
    if kind == "truncate":
        text = text[:pos]
    elif kind == "insert":
        text = text[:pos] + data.draw(st.text(alphabet="0123456789abcdef -:kB\nSizeRsVmFlag", max_size=30)) + text[pos:]
    elif kind == "delete":
        text = text[:pos] + text[pos + data.draw(st.integers(1, 400)) :]
    elif kind == "replace":
        text = text[:pos] + data.draw(st.sampled_from(list("0123456789 \nx:-"))) + text[pos + 1 :]
    return text.encode()


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_streaming_scan_is_the_same_whatever_the_chunk_size(data: st.DataObject) -> None:
    """The sampler reads smaps in chunks and scans each as it arrives: cut anywhere (one byte per
    chunk, mid-line, mid-block), the result and any error, line number included, are those of one
    chunk holding the whole file."""
    raw = _mutated_smaps(data)
    whole = _scan_chunked(raw, "s", MIN, max(1, len(raw)))
    for chunk in (1, data.draw(st.integers(2, 90)), data.draw(st.integers(91, 2000))):
        assert _scan_chunked(raw, "s", MIN, chunk) == whole, chunk


@pytest.mark.parametrize("root", fixture_roots(), ids=lambda p: p.name)
def test_streaming_scan_of_fixtures_in_small_chunks(root) -> None:  # type: ignore[no-untyped-def]
    for smaps in (root / "proc").glob("*/smaps"):
        data = smaps.read_bytes()
        strict = [v for v in parse_smaps(data.decode(), "s") if (v.size_bytes or 0) >= MIN]
        for chunk in (7, 100, 4096):
            assert _scan_chunked(data, "s", MIN, chunk) == strict


def test_streaming_scan_names_the_line_of_an_error_far_into_the_file() -> None:
    # The error is found long after the chunks before it were dropped: its line still counts them.
    blocks = SMALL_BLOCK * 500
    bad = SEED_BLOCK.replace("Rss:              583680 kB", "Rss:             lots kB")
    raw = (blocks + bad + SMALL_BLOCK).encode()
    line = blocks.count("\n") + 1 + bad.split("\n").index("Rss:             lots kB")
    for chunk in (64, 4096, len(raw)):
        with pytest.raises(ParseError) as info:
            scan_large_vmas(raw, "s", MIN, chunk_bytes=chunk)
        assert info.value.line == line and "Rss" in str(info.value)
    with pytest.raises(ParseError) as info:  # a cut-off file names its last line, all of them counted
        scan_large_vmas((blocks + SEED_BLOCK).encode()[:-5], "s", MIN, chunk_bytes=64)
    assert info.value.line == (blocks + SEED_BLOCK).count("\n") and "newline" in str(info.value)


def test_streaming_scanner_is_reused_across_files_and_keeps_a_small_buffer() -> None:
    scanner = LargeVmaScanner(chunk_bytes=256)
    files = [(SMALL_BLOCK * 40 + SEED_BLOCK + SMALL_BLOCK).encode(), b"MemTotal: 1 kB\n", (ANON_BLOCK + SMALL_BLOCK * 3).encode()]
    for raw in files * 2:
        scanner.start("s", MIN)
        for pos in range(0, len(raw), 256):
            piece = raw[pos : pos + 256]
            with scanner.room() as room:
                assert len(room) == 256
                room[: len(piece)] = piece
            scanner.filled(len(piece))
        try:
            got: object = scanner.finish()
        except ParseError as exc:
            got = str(exc)
        try:
            expected: object = scan_large_vmas(raw, "s", MIN)
        except ParseError as exc:
            expected = str(exc)
        assert got == expected
        # Only the open block and the partial line are carried: the buffer never holds the file.
        assert len(scanner._buf) < 256 + 4096 + 2 * len(SEED_BLOCK)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=3000), st.integers(0, 40))
def test_compiled_newline_count_equals_bytes_count(raw: bytes, skip: int) -> None:
    if smaps_module._count_newlines_c is None:
        pytest.skip("the compiled scanner is not built here")
    view = memoryview(bytearray(raw * 3 + b"\n" * skip))[skip:]
    assert smaps_module._count_newlines_c(view) == bytes(view).count(b"\n") == smaps_module._count_newlines_py(view)


class _Collect:
    """A ChunkSink that keeps what it is fed, with a small room so that a file takes many chunks."""

    def __init__(self) -> None:
        self.buf = bytearray(1000)
        self.data = bytearray()
        self.calls = 0

    def room(self) -> memoryview:
        return memoryview(self.buf)

    def filled(self, n: int) -> None:
        self.calls += 1
        self.data += self.buf[:n]


def test_chunk_sink_reads_keep_the_bounds_and_the_root(tmp_path: Path) -> None:
    path = tmp_path / "proc" / "1" / "smaps"
    path.parent.mkdir(parents=True)
    path.write_bytes(bytes(range(256)) * 40)
    sink = _Collect()
    assert HostRoot.from_root(tmp_path).read_bytes(path, into=sink) is None
    assert bytes(sink.data) == path.read_bytes() and sink.calls == 11  # 10 full rooms and the short last one
    with pytest.raises(HostReadError) as info:
        read_file(path, 5000, into=_Collect())
    assert info.value.kind == "too_large"
    (tmp_path / "proc" / "2").mkdir()
    (tmp_path / "proc" / "2" / "smaps").symlink_to("/etc/hostname")  # leaves the root: never read
    with pytest.raises(HostReadError) as info:
        HostRoot.from_root(tmp_path).read_bytes(tmp_path / "proc" / "2" / "smaps", into=_Collect())
    assert info.value.kind == "outside_root"
    os.mkfifo(tmp_path / "proc" / "1" / "fifo")
    with pytest.raises(HostReadError) as info:
        HostRoot.from_root(tmp_path).read_bytes(tmp_path / "proc" / "1" / "fifo", into=_Collect())
    assert info.value.kind == "not_regular"


@settings(max_examples=300, deadline=None)
@given(smaps_texts(), st.integers(1, 7), st.one_of(st.just(0), st.integers(1, 1 << 30)), st.binary(max_size=8))
def test_searches_agree_on_the_value_threshold(text: str, digits: int, min_value: int, noise: bytes) -> None:
    """The compiled search drops sizes below min_value itself; the regex fallback filters the same."""
    data = text.encode() + noise + b"\nSize: 99999999999999999999 kB\nSize:  lots kB\n"
    expected = [(nl, d0, d1) for nl, d0, d1 in smaps_module._big_size_lines_regex(data, digits)
                if d0 == d1 or d1 - d0 > 18 or int(data[d0:d1]) >= min_value]
    for search in SEARCHES.values():
        assert search(data, digits, min_value) == expected


# --- the compiled read loop (LargeVmaScanner.read_fd over _smapscan.FdScan) ---

needs_fd_scan = pytest.mark.skipif(not HAVE_FD_SCAN, reason="the compiled scanner is not built here")

# Inputs meant to break a compiled scanner: malformed and huge Size lines, values at the threshold, a
# value padded past the 32-byte window the compiled check looks through at once, a file cut anywhere.
_ADVERSARIAL_SIZES = ["Size:  lots kB", "Size: 99999999999999999999999 kB", "Size:" + " " * 40 + "4194304 kB", "Size:\t\t4194304 kB",
                      "Size: 65535 kB", "Size: 65536 kB", "Size:65536 kB", "Size: 0065536 kB", "Size: 4194304 kB ", "Size: 4194304 KB",
                      "Size: 4194304kB", "Size: -4194304 kB", "Size: 4194304 kB\r", "Size: \xff4194304 kB", "Size:", "Size: 18446744073709551616 kB",
                      "Size: " + "9" * 40 + " kB", "Size: 4194304 kB\nSize: 4194304 kB",
                      # digits that run past the 32-byte window: the compiled check must not cut them short
                      "Size:" + " " * 28 + "0000004 kB", "Size:" + " " * 27 + "00000000004194304 kB", "Size:" + " " * 31 + "4194304 kB"]


@needs_fd_scan
@pytest.mark.parametrize("min_bytes", [MIN, 1 << 30, 5 * 1024 * 1024, 65_537 * 1024, 99_999 * 1024])
def test_compiled_loop_compares_values_of_the_threshold_s_length_as_python_does(min_bytes: int) -> None:
    # Values in the kernel's own layout with as many digits as the threshold are decided in the
    # vector check by comparing digit strings; every one must land where the Python loop puts it.
    min_kb = min_bytes // 1024
    digits = len(str(min_kb))
    values = sorted({min_kb - 1, min_kb, min_kb + 1, 10 ** (digits - 1), 10 ** digits - 1, 10 ** digits, 10 ** (digits - 1) - 1,
                     int("9" * (digits - 1) + "0") if digits > 1 else 9, min_kb + 10 ** (digits - 2) if digits > 1 else min_kb,
                     max(1, min_kb - 10 ** (digits - 1)), 4, 65_404, 65_535, 65_536, 65_537, 4_194_304})
    blocks = []
    for n, value in enumerate(values):
        block = SEED_BLOCK.replace("Size:            4194304 kB", f"Size:{value:>19} kB").replace("7f2778200000-", f"7f{n:02x}00000000-")
        assert f"Size:{value:>19} kB\n" in block
        blocks.append(block)
    raw = (SMALL_BLOCK + "".join(blocks) + SMALL_BLOCK).encode()
    expected = scan_large_vmas(raw, "s", min_bytes)
    assert sorted(v.size_bytes or 0 for v in expected) == sorted(v * 1024 for v in values if v >= min_kb)
    assert _scan_chunked(raw, "s", min_bytes, len(raw)) == expected
    assert _scan_chunked(raw, "s", min_bytes, 4096 + 7) == expected


@needs_fd_scan
@pytest.mark.parametrize("size_line", _ADVERSARIAL_SIZES)
@pytest.mark.parametrize("chunk", [1, 3, 29, 64, 127, 4096])
def test_compiled_loop_equals_the_python_loop_on_adversarial_size_lines(size_line: str, chunk: int) -> None:
    bad = SEED_BLOCK.replace("Size:            4194304 kB", size_line)
    raw = (SMALL_BLOCK * 3 + bad + SMALL_BLOCK + ANON_BLOCK).encode("utf-8", errors="surrogateescape")
    expected = _scan_chunked(raw, "s", MIN, max(1, len(raw)))  # asserts the compiled loop agrees at one chunk
    assert _scan_chunked(raw, "s", MIN, chunk) == expected


@needs_fd_scan
def test_compiled_loop_equals_the_python_loop_on_every_truncation() -> None:
    raw = (SMALL_BLOCK + SEED_BLOCK + SMALL_BLOCK * 2 + ANON_BLOCK).encode()
    for cut in range(len(raw) + 1):
        piece = raw[:cut]
        assert _scan_chunked(piece, "s", MIN, 61) == _scan_chunked(piece, "s", MIN, max(1, len(piece)))


@needs_fd_scan
@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600), st.integers(1, 300))
def test_compiled_loop_equals_the_python_loop_on_junk(junk: bytes, chunk: int) -> None:
    for raw in (junk, SEED_BLOCK.encode() + junk, (SMALL_BLOCK + SEED_BLOCK).encode()[: len(junk)] + junk):
        _scan_chunked(raw, "s", MIN, chunk)  # asserts that every path agrees


@needs_fd_scan
def test_compiled_loop_on_a_large_file_and_a_reused_scanner() -> None:
    # Many chunks of 128 KiB, guest RAM in the middle and at the end, the scanner reused across files
    # (and after a file that failed): each result is the Python loop's.
    big = (SMALL_BLOCK * 3000 + SEED_BLOCK + SMALL_BLOCK * 3000 + ANON_BLOCK).encode()
    bad = big.replace(b"Rss:              583680 kB", b"Rss:              lots kB")
    scanner = LargeVmaScanner()
    for raw in (big, bad, big[:-1], big):
        try:
            got: object = _scan_fd(raw, "s", MIN, scanner=scanner)
        except ParseError as exc:
            got = str(exc)
        try:
            expected: object = scan_large_vmas(raw, "s", MIN)
        except ParseError as exc:
            expected = str(exc)
        assert got == expected
    assert [v.size_bytes for v in _scan_fd(big, "s", MIN, scanner=scanner)] == [4194304 * 1024] * 2


class _Clock:
    def __init__(self, step: float) -> None:
        self.calls = 0
        self.step = step

    def __call__(self) -> float:
        self.calls += 1
        return self.calls * self.step


@needs_fd_scan
def test_compiled_loop_keeps_the_read_bounds(tmp_path: Path) -> None:
    path = tmp_path / "proc" / "1" / "smaps"
    path.parent.mkdir(parents=True)
    raw = (SMALL_BLOCK * 200 + SEED_BLOCK).encode()
    path.write_bytes(raw)
    root = HostRoot.from_root(tmp_path)
    scanner = LargeVmaScanner(chunk_bytes=1000)
    rooms: list[int] = []
    original_room = scanner.room

    def counted_room() -> memoryview:
        rooms.append(1)
        return original_room()

    scanner.room = counted_room  # type: ignore[method-assign]
    clock = _Clock(0.0)
    with mock.patch.object(hostroot_module, "_monotonic", clock):
        scanner.start(str(path), MIN)
        assert root.read_bytes(path, into=scanner) is None
        assert [v.size_bytes for v in scanner.finish()] == [4194304 * 1024]
    # The compiled loop read it (the Python loop's room() was never asked), and looked at the clock
    # once for the start and once after each of its chunks, as the Python loop does.
    assert rooms == [] and clock.calls == 1 + len(raw) // 1000 + 1
    # The size bound, checked after each chunk.
    scanner.start(str(path), MIN)
    with pytest.raises(HostReadError) as info:
        root.read_bytes(path, 2500, into=scanner)
    assert info.value.kind == "too_large" and "2500-byte" in str(info.value)
    # The time bound: the clock passes the deadline after the first chunk.
    scanner.start(str(path), MIN)
    with mock.patch.object(hostroot_module, "_monotonic", _Clock(1000.0)), pytest.raises(HostReadError) as info:
        root.read_bytes(path, into=scanner)
    assert info.value.kind == "timeout" and "longer than" in str(info.value)
    # The checks before any read stay HostRoot's: a FIFO or a link out of the root is never handed over.
    os.mkfifo(tmp_path / "proc" / "1" / "fifo")
    (tmp_path / "proc" / "2").mkdir()
    (tmp_path / "proc" / "2" / "smaps").symlink_to("/etc/hostname")
    calls: list[int] = []
    scanner.read_fd = lambda *a: calls.append(1)  # type: ignore[method-assign,assignment,return-value]
    for bad, kind in ((tmp_path / "proc" / "1" / "fifo", "not_regular"), (tmp_path / "proc" / "2" / "smaps", "outside_root")):
        with pytest.raises(HostReadError) as info:
            root.read_bytes(bad, into=scanner)
        assert info.value.kind == kind
    assert calls == []


@needs_fd_scan
def test_compiled_loop_read_error_is_an_os_error(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(SEED_BLOCK.encode())
    fd = os.open(path, os.O_WRONLY)  # read() fails with EBADF
    try:
        scanner = LargeVmaScanner()
        scanner.start("s", MIN)
        with pytest.raises(OSError) as info:
            scanner.read_fd(fd, 1 << 20, float("inf"), time.monotonic)
        assert info.value.errno == errno.EBADF
        assert hostroot_module._classify(path, info.value).kind == "io"
    finally:
        os.close(fd)


def test_without_the_compiled_loop_the_python_loop_reads(tmp_path: Path) -> None:
    # The regex search switched on (as on a host without the extension): read_fd declines, reads
    # nothing, and HostRoot feeds the scanner through room()/filled(); the result is the same.
    path = tmp_path / "smaps"
    raw = (SMALL_BLOCK * 50 + SEED_BLOCK).encode()
    path.write_bytes(raw)
    scanner = LargeVmaScanner(chunk_bytes=512)
    with mock.patch.object(smaps_module, "_big_size_lines", smaps_module._big_size_lines_regex):
        scanner.start("s", MIN)
        assert scanner.read_fd(0, 1, 0.0, time.monotonic) is None
        read_file(path, into=scanner)
        assert scanner.finish() == scan_large_vmas(raw, "s", MIN)
        assert scanner._total == len(raw)


@needs_fd_scan
def test_compiled_drain_reads_the_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 300_001)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert smaps_module._FdScan(4096).drain(fd) == 300_001
    finally:
        os.close(fd)


@needs_fd_scan
@pytest.mark.parametrize("level", FD_LEVELS)
@pytest.mark.parametrize("chunk", [64, 4096, 65_536])
def test_compiled_drain_counts_every_newline_at_every_level(tmp_path: Path, level: int, chunk: int) -> None:
    # bench/smaps_cost.py's lower bound for any scan that can name an error's line: read + count.
    raw = (SMALL_BLOCK * 97 + "x\n\n" + "y" * 200 + "\n" * 65 + "tail without a newline").encode()
    path = tmp_path / "f"
    path.write_bytes(raw)
    before = _smapscan._force_level(level)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert smaps_module._FdScan(chunk).drain(fd, True) == raw.count(b"\n")
    finally:
        os.close(fd)
        _smapscan._force_level(before)


def test_first_and_last_blocks_that_parsed_before_are_not_parsed_again() -> None:
    # A sampler re-reads the same process: its first and last blocks rarely change, and are parsed
    # only when their bytes differ from a block that parsed before. Candidates are always parsed.
    raw = (SMALL_BLOCK + SMALL_BLOCK.replace("7f5000000000-7f5000001000", "7f5000002000-7f5000003000") + SEED_BLOCK
           + SMALL_BLOCK.replace("7f5000000000-7f5000001000", "7f6000000000-7f6000001000")).encode()
    scanner = LargeVmaScanner(chunk_bytes=100)
    parsed: list[bytes] = []
    original = smaps_module._parse_block_bytes

    def counting(block: bytes | bytearray | memoryview, name: str, line_base: int) -> Vma:
        parsed.append(bytes(block)[:12])
        return original(block, name, line_base)

    def scan(data: bytes) -> list[Vma] | str:
        scanner.start("s", MIN)
        for pos in range(0, len(data), 100):
            piece = data[pos : pos + 100]
            with scanner.room() as room:
                room[: len(piece)] = piece
            scanner.filled(len(piece))
        try:
            return scanner.finish()
        except ParseError as exc:
            return str(exc)

    with mock.patch.object(smaps_module, "_parse_block_bytes", counting):
        first = scan(raw)
        assert parsed == [b"7f2778200000", b"7f5000000000", b"7f6000000000"]  # the candidate, the first, the last
        assert scan(raw) == first and parsed[3:] == [b"7f2778200000"]  # the candidate only
        changed = raw.replace(b"Rss:                   4 kB", b"Rss:                   8 kB", 1)  # the first block
        assert scan(changed) == first and parsed[4:] == [b"7f2778200000", b"7f5000000000"]
        broken = raw.replace(b"Rss:                   4 kB", b"Rss:                lots kB", 1)
        assert "Rss" in str(scan(broken)) and "Rss" in str(scan(broken))  # an error is found again each time
    assert scan(raw) == first == scan_large_vmas(raw, "s", MIN)


@needs_fd_scan
def test_a_first_line_judged_before_is_not_matched_again_and_a_bad_one_fails_each_time(tmp_path: Path) -> None:
    # The compiled loop asks whether the file's first line is a VMA header; one process's first line
    # rarely changes between samples, so an accepted line is remembered (by its bytes), a refused one never.
    good = (SMALL_BLOCK + SEED_BLOCK + SMALL_BLOCK).encode()
    bad = b"garbage\n" + good
    scanner = LargeVmaScanner()
    matched: list[str] = []

    class Counting:
        def match(self, text: str) -> re.Match[str] | None:
            matched.append(text[:12])
            return HEADER_PATTERN.match(text)

    def scan(data: bytes) -> list[Vma] | str:
        try:
            return _scan_fd(data, "s", MIN, scanner=scanner)
        except ParseError as exc:
            return str(exc)

    with mock.patch.object(smaps_module, "_HEADER", Counting()):
        first = scan(good)
        assert isinstance(first, list) and len(first) == 1
        assert matched[0] == "7f5000000000"  # the first line (headers of parsed blocks may follow)
        seen = len(matched)
        assert scan(good) == first and "7f5000000000" not in matched[seen:]  # neither judged nor parsed again
        seen = len(matched)
        assert "expected a VMA header line first" in str(scan(bad))
        assert "expected a VMA header line first" in str(scan(bad)) and matched[seen:] == ["garbage", "garbage"]
    assert scan(good) == first == scan_large_vmas(good, "s", MIN)


@needs_fd_scan
@pytest.mark.parametrize("shift", range(64))
def test_compiled_loop_finds_size_lines_at_every_offset_of_a_step(shift: int) -> None:
    """The AVX-512 pass notes one z mask per 64-byte step and finds the non-empty ones through a bitmap
    (eight masks per test, 64 per word): `Size:` lines at every offset within a step, in files long
    enough for several bitmap words, with candidate, small and malformed lines, give what the Python
    loop gives, at a chunk that holds the whole file and at one that cuts it unevenly."""
    first = SMALL_BLOCK.replace("00:00 0 \n", "00:00 0 /pad" + "a" * shift + "\n", 1)
    assert first != SMALL_BLOCK
    body = SMALL_BLOCK * 9 + ANON_BLOCK + SMALL_BLOCK * 30 + ANON_BLOCK + SMALL_BLOCK * 5
    good = (first + body + SMALL_BLOCK).encode()
    bad = (first + body + SEED_BLOCK.replace("Size:            4194304 kB", "Size:  lots kB") + SMALL_BLOCK).encode()
    assert len(good) > 64 * 64 * 4
    for chunk in (1 << 17, 4096 + 7):
        found = _scan_chunked(good, "s", MIN, chunk)
        assert isinstance(found, list) and len(found) == 2
        error = _scan_chunked(bad, "s", MIN, chunk)
        assert isinstance(error, str) and "lots" in error


# The compiled reader of a candidate block's body (_smapscan.block_fields): what it returns must be what
# parse_smaps gives; where the block is not of the kernel's plain shape it declines and the Python parse
# (result or error) decides.
needs_block_fields = pytest.mark.skipif(smaps_module._block_fields is None, reason="the compiled block reader is not built here")


def _strict_one(raw: bytes) -> Vma | str:
    """parse_smaps of one block, or the error text (or 'not one block')."""
    try:
        vmas = parse_smaps(raw.decode("utf-8", errors="replace"), "s")
    except ParseError as exc:
        return f"ParseError: {exc}"
    return vmas[0] if len(vmas) == 1 else "not one block"


@needs_block_fields
def test_plain_block_reader_maps_each_field_to_its_attribute() -> None:
    names = ["Size", "KernelPageSize", "Rss", "AnonHugePages", "ShmemPmdMapped", "FilePmdMapped", "Shared_Hugetlb", "Private_Hugetlb"]
    assert list(smaps_module._KB_FIELDS) == names  # the C table's order
    raw = ("7f0000000000-7f0000100000 rw-s 00001000 00:14 77  /memfd:pc.ram (deleted)\n"
           + "".join(f"{n}:{' ' * (20 - len(n))}{i + 1} kB\nPss: 9 kB\n" for i, n in enumerate(names)) + "THPeligible:    0\nVmFlags: rd wr\n").encode()
    fast = smaps_module._parse_plain_block(raw)
    assert fast is not None and fast == _strict_one(raw)
    assert [getattr(fast, a) for a in smaps_module._KB_ATTRS] == [(i + 1) * 1024 for i in range(8)]
    assert fast.path == "/memfd:pc.ram" and fast.deleted and fast.thp_eligible is False and fast.offset == 0x1000 and fast.inode == 77


@needs_block_fields
@pytest.mark.parametrize("root", fixture_roots(), ids=lambda p: p.name)
def test_plain_block_reader_equals_the_python_parse_on_fixture_blocks(root) -> None:  # type: ignore[no-untyped-def]
    for smaps in (root / "proc").glob("*/smaps"):
        text = smaps.read_bytes()
        starts = [m.start() + 1 for m in re.finditer(rb"\n[0-9a-f]+-[0-9a-f]+ ", text)]
        read = 0
        for a, b in zip([0, *starts], [*starts, len(text)]):
            raw = text[a:b]
            fast = smaps_module._parse_plain_block(raw)
            if fast is not None:
                read += 1
                assert fast == _strict_one(raw), (smaps, a)
            whole = smaps_module._plain_block(raw, smaps_module._MAX_KB_DIGITS - 1) if smaps_module._plain_block else None
            if whole is not None:  # the header read in C too
                assert Vma(*whole) == _strict_one(raw), (smaps, a)
        assert read > 0 or not text.strip(), smaps  # the fast reader is used on real kernel output


_BLOCK_ALPHABET = list("0123456789abcdef :-_\t\r\nkBSizeRsTHPVmFlg") + ["\xa0", "\u0663", "\xff", "\ufffd", "\u00e9"]


@needs_block_fields
@settings(max_examples=600, deadline=None)
@given(st.data())
def test_plain_block_reader_returns_only_what_the_python_parse_returns(data: st.DataObject) -> None:
    """Mutated blocks (an inserted, deleted or replaced run of characters, non-ASCII and Unicode digits
    among them): the compiled reader either declines or gives exactly parse_smaps's Vma; it never
    accepts a block the strict parse refuses."""
    text = data.draw(st.sampled_from([SEED_BLOCK, ANON_BLOCK, SMALL_BLOCK]))
    for _ in range(data.draw(st.integers(0, 3))):
        pos = data.draw(st.integers(0, len(text)))
        kind = data.draw(st.sampled_from(["insert", "delete", "replace"]))
        piece = "".join(data.draw(st.lists(st.sampled_from(_BLOCK_ALPHABET), min_size=1, max_size=6)))
        if kind == "insert":
            text = text[:pos] + piece + text[pos:]
        elif kind == "delete":
            text = text[:pos] + text[pos + data.draw(st.integers(1, 30)) :]
        else:
            text = text[:pos] + piece + text[pos + len(piece) :]
    raw = text.encode("utf-8", errors="surrogateescape")
    fast = smaps_module._parse_plain_block(raw)
    strict = _strict_one(raw)
    if text in (SEED_BLOCK, ANON_BLOCK, SMALL_BLOCK):
        assert fast is not None
    if fast is not None:
        assert fast == strict
    # And the reader the scanner uses gives the strict parse's result or error, either way.
    try:
        via = smaps_module._parse_block_bytes(raw, "s", 0)
    except ParseError as exc:
        via = f"ParseError: {exc}"
    assert via == strict or (isinstance(strict, str) and strict == "not one block" and isinstance(via, str))


_PLAIN_EDGES = [
    ("Size:            4194304 kB\n", "Size:            4194304 kB\nSize:            4194304 kB\n"),  # repeated
    ("Rss:", "Rss:             4196352 kB\nRss:"),  # a repeated field other than Size
    ("THPeligible:    1\n", "THPeligible:    1\nTHPeligible:    0\n"),
    ("THPeligible:    1\n", "THPeligible:    2\n"), ("THPeligible:    1\n", "THPeligible:    1 \n"),
    ("Size:            4194304 kB\n", "Size:            4194304 kB \n"), ("Size:            4194304 kB\n", "Size:            4194304 kB\r\n"),
    ("Size:            4194304 kB\n", "Size:\t4194304 kB\n"), ("Size:            4194304 kB\n", "Size:4194304 kB\n"),
    ("Size:            4194304 kB\n", "Size:            419430\u0663 kB\n"), ("Size:            4194304 kB\n", "Size:            0004194304 kB\n"),
    ("Size:            4194304 kB\n", "Size:            999999999999 kB\n"), ("Size:            4194304 kB\n", "Size:            9999999999999 kB\n"),
    ("Size:            4194304 kB\n", "Size:            4398046511104 kB\n"), ("Size:            4194304 kB\n", "Size:            4398046511105 kB\n"),
    ("Size:            4194304 kB\n", "Size:             kB\n"), ("Size:            4194304 kB\n", ""), ("Rss:              583680 kB\n", ""),
    ("Size:            4194304 kB\n", "Size:            4194304 KB\n"), ("KernelPageSize:        4 kB\n", "KernelPageSize: lots\n"),
    ("VmFlags:", "VmFlags: \u00e9"), ("VmFlags:", "\nVmFlags:"), ("VmFlags:", "7f00-7f01 rw-p 0 00:00 0\nVmFlags:"), ("VmFlags:", "Vm Flags:"),
    ("7f2778200000-7f2878200000", "7f2878200000-7f2778200000"), ("7f2778200000-", "00000000007f2778200000-"),
    ("rw-s 00000000", "rw-s 00000000000000000"), ("262232", "99999999999999999999"), ("(deleted)", "(deleted)  \r"),
    # the header, read in C (_smapscan.plain_block): each of these it reads as _HEADER does, or declines
    ("7f2778200000-", "7F2778200000-"), ("7f2778200000-", "7f2778200000 -"), ("-7f2878200000", "-ffffffffffffffff"),
    ("7f2778200000-", "0000000000000001-"), ("rw-s", "rwxs"), ("rw-s", "rw-S"), ("rw-s", "rw-"), ("rw-s", "r--p"),
    ("00:14", "fd:01"), ("00:14", "0:1"), ("00:14", "00:"), ("00:14", "0014"), ("00:14", "00:14:15"), ("00:14", "a" * 70 + ":1"),
    ("262232", "0"), ("262232", "9999999999999999999"), ("262232", "26x232"), ("262232      ", "262232"),
    ("      /dev/shm", " /dev/shm"), ("      /dev/shm", "\t/dev/shm"), ("/dev/shm/qemu_back_mem.mem.Hz2hSf (deleted)", ""),
    ("/dev/shm/qemu_back_mem.mem.Hz2hSf (deleted)", "/dev/shm/guest ram  "), ("/dev/shm/qemu_back_mem.mem.Hz2hSf (deleted)", " (deleted)"),
    ("/dev/shm/qemu_back_mem.mem.Hz2hSf (deleted)", "/dev/shm/gäst-ram (deleted)"), ("/dev/shm/qemu_back_mem.mem.Hz2hSf (deleted)", "/dev/shm/x\x1f (deleted)"),
    ("/dev/shm/qemu_back_mem.mem.Hz2hSf (deleted)", "/dev/shm/x (deleted) (deleted)"), ("/dev/shm/qemu_back_mem.mem.Hz2hSf (deleted)", "/dev/shm/x(deleted)"),
    ("/dev/shm/qemu_back_mem.mem.Hz2hSf (deleted)", "[anon:guest ram]"), ("/dev/shm/qemu_back_mem.mem.Hz2hSf (deleted)", "/memfd:pc.ram (deleted)   "),
]


@needs_block_fields
@pytest.mark.parametrize("old,new", _PLAIN_EDGES)
def test_plain_block_reader_edges(old: str, new: str) -> None:
    assert old in SEED_BLOCK
    raw = SEED_BLOCK.replace(old, new, 1).encode()
    fast = smaps_module._parse_plain_block(raw)
    strict = _strict_one(raw)
    if fast is not None:
        assert fast == strict
    whole = smaps_module._plain_block(raw, smaps_module._MAX_KB_DIGITS - 1) if smaps_module._plain_block else None
    if whole is not None:
        assert Vma(*whole) == strict
    try:
        via: Vma | str = smaps_module._parse_block_bytes(raw, "s", 0)
    except ParseError as exc:
        via = f"ParseError: {exc}"
    assert via == strict or (strict == "not one block" and isinstance(via, str))


@needs_block_fields
def test_plain_block_reader_declines_repeats() -> None:
    """A repeated kB field is an error of the strict parse: the compiled reader must not take the last."""
    raw = SEED_BLOCK.replace("Rss:", "Rss:             4196352 kB\nRss:", 1).encode()
    assert smaps_module._parse_plain_block(raw) is None
    raw = SEED_BLOCK.replace("THPeligible:    1\n", "THPeligible:    1\nTHPeligible:    0\n", 1).encode()
    assert smaps_module._parse_plain_block(raw) is None
