from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eptwatch.agent.smaps import parse_smaps, parse_smaps_rollup, rollup_from_vmas
from eptwatch.agent.status import ParseError

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

from eptwatch.agent.smaps import scan_large_vmas  # noqa: E402

SMALL_BLOCK = ANON_BLOCK.replace("7f4000000000-7f4100000000", "7f5000000000-7f5000001000").replace(
    "Size:            4194304 kB", "Size:                  4 kB").replace("Rss:             4196352 kB", "Rss:                   4 kB").replace(
    "AnonHugePages:   4194304 kB", "AnonHugePages:         0 kB")
MIN = 64 * 1024 * 1024


@pytest.mark.parametrize("root", fixture_roots(), ids=lambda p: p.name)
def test_fast_scan_equals_strict_parse_on_fixtures(root) -> None:  # type: ignore[no-untyped-def]
    for smaps in (root / "proc").glob("*/smaps"):
        data = smaps.read_bytes()
        strict = [v for v in parse_smaps(data.decode(), "s") if (v.size_bytes or 0) >= MIN]
        assert scan_large_vmas(data, "s", MIN) == strict


def test_fast_scan_rejects_truncation_and_foreign_text() -> None:
    data = (SMALL_BLOCK + SEED_BLOCK + SMALL_BLOCK).encode()
    assert len(scan_large_vmas(data, "s", MIN)) == 1
    with pytest.raises(ParseError, match="newline"):
        scan_large_vmas(data[:-3], "s", MIN)
    with pytest.raises(ParseError):
        scan_large_vmas(data[: data.rfind(b"Swap") if b"Swap" in data else len(data) - 40], "s", MIN)
    with pytest.raises(ParseError, match="header"):
        scan_large_vmas(b"MemTotal: 1 kB\n", "s", MIN)
    cut = (SMALL_BLOCK + SEED_BLOCK + "\n".join(SMALL_BLOCK.split("\n")[:6]) + "\n").encode()
    with pytest.raises(ParseError):
        scan_large_vmas(cut, "s", MIN)


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
        fast = scan_large_vmas(mutated.encode(), "fuzz", MIN)
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
