"""Tests for eptwatch.agent.kvm_binary_stats.

The parser tests use blobs built with struct.pack in the kernel's layout.
The rest run against the real kernel through /dev/kvm; nothing in the kernel
is mocked.  Those tests skip with a reason when /dev/kvm is unusable.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import platform
import struct
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eptwatch.agent.kvm_binary_stats import (
    COUNTER_NAMES,
    KVM_GET_STATS_FD,
    MAX_NUM_DESC,
    REASON_FD_GONE,
    REASON_FOREIGN_VM,
    REASON_INVALID_PID,
    REASON_KERNEL_TOO_OLD,
    REASON_NOT_KVM_VM_FD,
    REASON_PERMISSION,
    REASON_PROCESS_GONE,
    KvmBinaryStats,
    KvmStatsFormatError,
    KvmStatsUnavailable,
    _ioctl_failure_reason,
    find_vm_fds,
    find_vm_stats_fds,
    parse_kvm_stats,
    read_stats_blob,
    read_vm_binary_stats,
    to_counters,
)

from .fuzzing import fuzz_settings

KVM_CREATE_VM = 0xAE01
KVM_CREATE_VCPU = 0xAE41
KVM_RUN = 0xAE80
KVM_GET_VCPU_MMAP_SIZE = 0xAE04
KVM_SET_USER_MEMORY_REGION = 0x4020AE46  # _IOW(0xAE, 0x46, 32-byte struct)
KVM_GET_SREGS = 0x8138AE83  # _IOR(0xAE, 0x83, struct kvm_sregs (312 bytes))
KVM_SET_SREGS = 0x4138AE84
KVM_GET_REGS = 0x8090AE81  # _IOR(0xAE, 0x81, struct kvm_regs (144 bytes))
KVM_SET_REGS = 0x4090AE82
KVM_EXIT_HLT = 5

SRC = "kvm-stats pid 1234 fd 12"
NAME_SIZE = 48  # KVM_STATS_NAME_SIZE

# Descriptor flags as the kernel composes them: type | unit << 4 | base << 8.
T_CUMULATIVE, T_INSTANT, T_PEAK, T_LINEAR_HIST, T_LOG_HIST = range(5)
U_NONE, U_BYTES, U_SECONDS, U_CYCLES, U_BOOLEAN = (u << 4 for u in range(5))
B_POW10, B_POW2 = 0, 1 << 8


# --- synthetic blob builder ---------------------------------------------------


@dataclass(frozen=True)
class Stat:
    name: str
    values: tuple[int, ...]
    flags: int = T_INSTANT
    exponent: int = 0
    bucket_size: int = 0


def build_blob(
    stats: Sequence[Stat],
    *,
    stats_id: bytes = b"kvm-1234",
    name_size: int = NAME_SIZE,
    reverse_data: bool = True,
) -> bytes:
    """Lay out header | id | descriptors | data as the kernel does.

    With reverse_data the data items are stored in reverse descriptor order.
    That makes offsets non-monotonic, as the real kernel's are (for example
    max_mmu_rmap_size), so a parser that assumed descriptor order would
    misattribute values.
    """
    id_offset = 24
    desc_offset = id_offset + name_size
    desc_len = 16 + name_size
    data_offset = desc_offset + len(stats) * desc_len
    order = list(reversed(range(len(stats)))) if reverse_data else list(range(len(stats)))
    offsets: dict[int, int] = {}
    cursor = 0
    for i in order:
        offsets[i] = cursor
        cursor += 8 * len(stats[i].values)
    header = struct.pack("=6I", 0, name_size, len(stats), id_offset, desc_offset, data_offset)
    descs = b"".join(
        struct.pack("=IhHII", s.flags, s.exponent, len(s.values), offsets[i], s.bucket_size)
        + s.name.encode().ljust(name_size, b"\0")
        for i, s in enumerate(stats)
    )
    data = bytearray(cursor)
    for i, s in enumerate(stats):
        struct.pack_into(f"={len(s.values)}Q", data, offsets[i], *s.values)
    return header + stats_id.ljust(name_size, b"\0") + descs + bytes(data)


SAMPLE: tuple[Stat, ...] = (
    Stat("remote_tlb_flush", (11,), T_CUMULATIVE),
    Stat("pages_4k", (4096,)),
    Stat("pages_2m", (512,)),
    Stat("pages_1g", (1,)),
    Stat("nx_lpage_splits", (7,)),
    Stat("max_mmu_rmap_size", (2**64 - 1,), T_PEAK),
    Stat("halt_poll_success_hist", tuple(range(100, 132)), T_LOG_HIST | U_SECONDS, -9),
    Stat("lin_hist", (1, 2, 3, 4), T_LINEAR_HIST | U_BOOLEAN | B_POW2, 0, 16),
)
VALID = build_blob(SAMPLE)

HDR_NAME_SIZE, HDR_NUM_DESC, HDR_ID_OFF, HDR_DESC_OFF, HDR_DATA_OFF = 4, 8, 12, 16, 20


def with_u32(blob: bytes, pos: int, value: int) -> bytes:
    b = bytearray(blob)
    struct.pack_into("=I", b, pos, value)
    return bytes(b)


def desc_pos(i: int, name_size: int = NAME_SIZE) -> int:
    return 24 + name_size + i * (16 + name_size)


def with_desc_field(blob: bytes, i: int, field: str, value: int) -> bytes:
    fmt, off = {"flags": ("=I", 0), "exponent": ("=h", 4), "size": ("=H", 6),
                "offset": ("=I", 8), "bucket_size": ("=I", 12)}[field]
    b = bytearray(blob)
    struct.pack_into(fmt, b, desc_pos(i) + off, value)
    return bytes(b)


def with_desc_name(blob: bytes, i: int, raw: bytes) -> bytes:
    b = bytearray(blob)
    start = desc_pos(i) + 16
    b[start : start + NAME_SIZE] = raw.ljust(NAME_SIZE, b"\0")[:NAME_SIZE]
    return bytes(b)


def desc_offset_of(blob: bytes, i: int) -> int:
    return int(struct.unpack_from("=I", blob, desc_pos(i) + 8)[0])


# --- parser: valid input ------------------------------------------------------


def test_parse_valid_blob_roundtrips_every_value() -> None:
    stats = parse_kvm_stats(VALID, SRC)
    assert stats.id == "kvm-1234"
    assert list(stats.values) == [s.name for s in SAMPLE]  # kernel order kept
    for s in SAMPLE:
        assert stats.values[s.name] == s.values
        d = stats.descriptors[s.name]
        assert (d.flags, d.exponent, d.size, d.bucket_size) == (s.flags, s.exponent, len(s.values), s.bucket_size)


def test_descriptor_flag_decoding() -> None:
    stats = parse_kvm_stats(VALID, SRC)
    hist = stats.descriptors["halt_poll_success_hist"]
    assert (hist.type_name, hist.unit_name, hist.base_name, hist.exponent) == ("log_hist", "seconds", "pow10", -9)
    assert hist.is_histogram
    lin = stats.descriptors["lin_hist"]
    assert (lin.type_name, lin.unit_name, lin.base_name, lin.bucket_size) == ("linear_hist", "boolean", "pow2", 16)
    assert stats.descriptors["max_mmu_rmap_size"].type_name == "peak"
    assert stats.descriptors["remote_tlb_flush"].type_name == "cumulative"
    assert not stats.descriptors["pages_2m"].is_histogram


def test_unknown_unit_is_kept_not_rejected() -> None:
    # A future kernel adding a unit (6.0 added "boolean") must not blind us.
    stats = parse_kvm_stats(build_blob([Stat("x", (5,), T_INSTANT | (9 << 4))]), SRC)
    assert stats.descriptors["x"].unit_name == "unknown(9)"
    assert stats.scalar("x") == 5


def test_scalar_helper() -> None:
    stats = parse_kvm_stats(VALID, SRC)
    assert stats.scalar("pages_2m") == 512
    assert stats.scalar("max_mmu_rmap_size") == 2**64 - 1  # unsigned, not -1
    assert stats.scalar("no_such_stat") is None
    with pytest.raises(ValueError, match="not a scalar"):
        stats.scalar("halt_poll_success_hist")


def test_result_is_immutable() -> None:
    stats = parse_kvm_stats(VALID, SRC)
    with pytest.raises(TypeError):
        stats.values["pages_2m"] = (0,)  # type: ignore[index]
    with pytest.raises(AttributeError):
        stats.id = "other"  # type: ignore[misc]


def test_empty_descriptor_list_and_trailing_bytes() -> None:
    assert dict(parse_kvm_stats(build_blob([]), SRC).values) == {}
    assert parse_kvm_stats(VALID + b"\xff" * 100, SRC).values == parse_kvm_stats(VALID, SRC).values


def test_accepts_bytearray_and_memoryview() -> None:
    assert parse_kvm_stats(bytearray(VALID), SRC).values == parse_kvm_stats(memoryview(VALID), SRC).values


def test_to_counters_full_and_5_14_style() -> None:
    assert to_counters(parse_kvm_stats(VALID, SRC)) == {
        "pages_4k": 4096, "pages_2m": 512, "pages_1g": 1, "nx_lpage_splits": 7,
    }
    # Linux 5.14 had binary stats but only "lpages".  The per-size counters
    # are unknown there, not zero.
    old = parse_kvm_stats(build_blob([Stat("lpages", (9,)), Stat("nx_lpage_splits", (2,))]), SRC)
    assert to_counters(old) == {"pages_4k": None, "pages_2m": None, "pages_1g": None, "nx_lpage_splits": 2}
    assert tuple(to_counters(old)) == COUNTER_NAMES


# --- parser: malformed input --------------------------------------------------

_d2 = desc_offset_of(VALID, 2)
_MALFORMED: list[tuple[str, bytes, str]] = [
    ("empty", b"", "truncated header: need 24 bytes, got 0"),
    ("header cut", VALID[:23], "truncated header: need 24 bytes, got 23"),
    ("name_size 0", with_u32(VALID, HDR_NAME_SIZE, 0), "name_size 0 outside"),
    ("name_size absurd", with_u32(VALID, HDR_NAME_SIZE, 0xFFFFFFFF), "name_size 4294967295 outside"),
    ("num_desc absurd", with_u32(VALID, HDR_NUM_DESC, MAX_NUM_DESC + 1), "num_desc 4097 exceeds limit 4096"),
    ("num_desc huge", with_u32(VALID, HDR_NUM_DESC, 0xFFFFFFFF), "exceeds limit"),
    ("num_desc past table", with_u32(VALID, HDR_NUM_DESC, len(SAMPLE) + 30), "descriptor table"),
    ("num_desc into data", with_u32(VALID, HDR_NUM_DESC, len(SAMPLE) + 1), "descriptor 8"),
    ("id past end", with_u32(VALID, HDR_ID_OFF, len(VALID) - 10), f"id offset {len(VALID) - 10}+48 past end of {len(VALID)}-byte blob"),
    ("id offset u32 max", with_u32(VALID, HDR_ID_OFF, 0xFFFFFFFF), "id offset 4294967295+48 past end"),
    ("desc table past end", with_u32(VALID, HDR_DESC_OFF, len(VALID) - 64), "descriptor table (8 x 64 bytes) offset"),
    ("data_offset past end", with_u32(VALID, HDR_DATA_OFF, len(VALID)), "data offset"),
    ("data_offset u32 max", with_u32(VALID, HDR_DATA_OFF, 0xFFFFFFFF), "past end of"),
    ("data into desc table", with_u32(VALID, HDR_DATA_OFF, desc_pos(0)), "descriptor table [72,584) overlaps"),
    ("data into header", with_u32(VALID, HDR_DATA_OFF, 0), "overlaps"),
    ("truncated data", VALID[:-1], "past end of"),
    ("truncated descriptors", VALID[: desc_pos(3) + 5], "descriptor table"),
    ("size 0", with_desc_field(VALID, 2, "size", 0), "descriptor 2 (pages_2m) size 0 outside 1..4096"),
    ("size absurd", with_desc_field(VALID, 2, "size", 60000), "descriptor 2 (pages_2m) size 60000 outside"),
    ("size overruns", with_desc_field(VALID, 0, "size", 4000), "past end of"),
    ("desc offset past end", with_desc_field(VALID, 3, "offset", 4096), f"descriptor 3 (pages_1g) data offset {struct.unpack_from('=I', VALID, HDR_DATA_OFF)[0] + 4096}+8 past end of {len(VALID)}-byte blob"),
    ("data exact overlap", with_desc_field(VALID, 3, "offset", _d2), "overlaps"),
    ("data partial overlap", with_desc_field(VALID, 3, "offset", _d2 + 4), "overlaps"),
    ("scalar inside histogram", with_desc_field(VALID, 1, "offset", desc_offset_of(VALID, 6) + 16), "overlaps"),
    ("id overlaps descriptors", with_u32(VALID, HDR_ID_OFF, desc_pos(0) + 16), "id string"),
    ("name not terminated", with_desc_name(VALID, 1, b"a" * NAME_SIZE), "descriptor 1 name is not NUL-terminated within 48 bytes"),
    ("name not ascii", with_desc_name(VALID, 1, "pägés_4k".encode()), "descriptor 1 name is not printable ASCII"),
    ("name control char", with_desc_name(VALID, 1, b"pages\n4k"), "not printable ASCII"),
    ("name empty", with_desc_name(VALID, 1, b""), "descriptor 1 name is empty"),
    ("duplicate name", with_desc_name(VALID, 1, b"pages_2m"), "descriptor 2 duplicates stat name 'pages_2m'"),
    ("id not terminated", build_blob(SAMPLE, stats_id=b"k" * NAME_SIZE), "id string is not NUL-terminated"),
    ("id not ascii", build_blob(SAMPLE, stats_id=b"kvm-\xff"), "id string is not printable ASCII"),
    ("id empty", build_blob(SAMPLE, stats_id=b""), "id string is empty"),
]


@pytest.mark.parametrize(("blob", "expected"), [(b, e) for _, b, e in _MALFORMED], ids=[n for n, _, _ in _MALFORMED])
def test_malformed_blob_raises_format_error_naming_source(blob: bytes, expected: str) -> None:
    with pytest.raises(KvmStatsFormatError) as info:
        parse_kvm_stats(blob, SRC)
    message = str(info.value)
    assert message.startswith(f"{SRC}: "), message
    assert expected in message, message
    assert isinstance(info.value, ValueError)


# --- parser: properties -------------------------------------------------------

_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_0123456789", min_size=1, max_size=20)
_stat = st.builds(
    Stat,
    name=_names,
    values=st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=40).map(tuple),
    flags=st.integers(0, 0xFFF),
    exponent=st.integers(-(2**15), 2**15 - 1),
    bucket_size=st.integers(0, 2**32 - 1),
)
_stat_lists = st.lists(_stat, max_size=12, unique_by=lambda s: s.name)


def _assert_sane(stats: KvmBinaryStats) -> None:
    """Properties that any successful parse must have, whatever the input."""
    assert stats.id and stats.id.isascii() and stats.id.isprintable()
    assert set(stats.values) == set(stats.descriptors)
    for name, vals in stats.values.items():
        assert name and name.isascii() and name.isprintable()
        assert isinstance(vals, tuple) and len(vals) == stats.descriptors[name].size >= 1
        assert all(isinstance(v, int) and 0 <= v < 2**64 for v in vals)


@pytest.mark.fuzz
@fuzz_settings(300)
@given(stats=_stat_lists, name_size=st.integers(21, 64), reverse=st.booleans())
def test_property_valid_blobs_roundtrip(stats: list[Stat], name_size: int, reverse: bool) -> None:
    parsed = parse_kvm_stats(build_blob(stats, name_size=name_size, reverse_data=reverse), SRC)
    assert {k: v for k, v in parsed.values.items()} == {s.name: s.values for s in stats}
    assert all(parsed.descriptors[s.name].flags == s.flags for s in stats)


@pytest.mark.fuzz
@fuzz_settings(500)
@given(blob=st.binary(max_size=2048))
def test_property_random_bytes_parse_or_format_error(blob: bytes) -> None:
    try:
        stats = parse_kvm_stats(blob, SRC)
    except KvmStatsFormatError as exc:
        assert str(exc).startswith(SRC)
    else:
        _assert_sane(stats)


@pytest.mark.fuzz
@fuzz_settings(500)
@given(blob=st.binary(min_size=24, max_size=600).map(lambda b: with_u32(with_u32(b, HDR_NAME_SIZE, 8), HDR_NUM_DESC, 3)))
def test_property_random_bytes_with_plausible_header(blob: bytes) -> None:
    # Pin name_size and num_desc so that hypothesis reaches the descriptor and
    # data checks, instead of dying at the header sanity limits every time.
    try:
        _assert_sane(parse_kvm_stats(blob, SRC))
    except KvmStatsFormatError:
        pass


_header_field = st.sampled_from([0, HDR_NAME_SIZE, HDR_NUM_DESC, HDR_ID_OFF, HDR_DESC_OFF, HDR_DATA_OFF])
_u32_edge = st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 7, 8, 24, 48, 64, 4096, 2**31, 2**32 - 1]))


@pytest.mark.fuzz
@fuzz_settings(800)
@given(
    stats=_stat_lists,
    byte_edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8),
    header_edits=st.lists(st.tuples(_header_field, _u32_edge), max_size=3),
    desc_edits=st.lists(
        st.tuples(st.integers(0, 11), st.sampled_from(["size", "offset"]), st.integers(0, 2**16 - 1)), max_size=3
    ),
    cut=st.one_of(st.none(), st.integers(0, 10_000)),
)
def test_property_mutated_blobs_parse_or_format_error(
    stats: list[Stat],
    byte_edits: list[tuple[int, int]],
    header_edits: list[tuple[int, int]],
    desc_edits: list[tuple[int, str, int]],
    cut: int | None,
) -> None:
    blob = build_blob(stats)
    for pos, value in header_edits:
        blob = with_u32(blob, pos, value)
    for i, field, value in desc_edits:
        if i < len(stats):
            blob = with_desc_field(blob, i, field, value)
    mutable = bytearray(blob)
    for pos, value in byte_edits:
        if mutable:
            mutable[pos % len(mutable)] = value
    blob = bytes(mutable)
    if cut is not None:
        blob = blob[: cut % (len(blob) + 1)]
    try:
        parsed = parse_kvm_stats(blob, SRC)
    except KvmStatsFormatError as exc:
        assert str(exc).startswith(SRC)
        return
    _assert_sane(parsed)


# --- real kernel --------------------------------------------------------------


@dataclass(frozen=True)
class Kvm:
    sys_fd: int
    vm_fd: int


def _open_kvm() -> int:
    if not os.path.exists("/dev/kvm"):
        pytest.skip("real KVM test: /dev/kvm absent")
    try:
        return os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        pytest.skip(f"real KVM test: /dev/kvm cannot be opened: {exc}")


@pytest.fixture
def kvm() -> Iterator[Kvm]:
    sys_fd = _open_kvm()
    try:
        vm_fd = fcntl.ioctl(sys_fd, KVM_CREATE_VM, 0)
    except OSError as exc:
        os.close(sys_fd)
        pytest.skip(f"real KVM test: KVM_CREATE_VM failed: {exc}")
    try:
        yield Kvm(sys_fd, vm_fd)
    finally:
        os.close(vm_fd)
        os.close(sys_fd)


def _gone_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_real_vm_stats_have_known_names(kvm: Kvm) -> None:
    stats = read_vm_binary_stats(os.getpid(), kvm.vm_fd)
    # The id records the VM's creator, which is this process.
    assert stats.id == f"kvm-{os.getpid()}"
    for name in ("pages_4k", "pages_2m", "pages_1g", "nx_lpage_splits", "remote_tlb_flush"):
        assert name in stats.values, sorted(stats.values)
        assert isinstance(stats.scalar(name), int)
    assert stats.scalar("pages_2m") == 0  # nothing is mapped in an empty VM
    assert stats.descriptors["pages_2m"].type_name == "instant"
    counters = to_counters(stats)
    assert set(counters) == set(COUNTER_NAMES)
    assert all(isinstance(v, int) for v in counters.values()), counters
    assert counters["pages_2m"] == 0


def test_real_read_through_own_stats_fd(kvm: Kvm) -> None:
    stats_fd = fcntl.ioctl(kvm.vm_fd, KVM_GET_STATS_FD, 0)
    try:
        assert find_vm_stats_fds(Path("/proc"), os.getpid()) == [stats_fd]
        via_stats_fd = read_vm_binary_stats(os.getpid(), stats_fd)
        # Reading via pread must leave the file position alone, so that a VMM
        # sharing this fd is undisturbed.
        assert os.lseek(stats_fd, 0, os.SEEK_CUR) == 0
    finally:
        os.close(stats_fd)
    via_vm_fd = read_vm_binary_stats(os.getpid(), kvm.vm_fd)
    assert via_stats_fd.id == via_vm_fd.id == f"kvm-{os.getpid()}"
    assert set(via_stats_fd.values) == set(via_vm_fd.values)


def test_real_read_does_not_leak_fds(kvm: Kvm) -> None:
    r, w = os.pipe()
    stats_fd = fcntl.ioctl(kvm.vm_fd, KVM_GET_STATS_FD, 0)
    try:
        before = _open_fds()
        for _ in range(20):
            read_vm_binary_stats(os.getpid(), kvm.vm_fd)
            read_vm_binary_stats(os.getpid(), stats_fd)
            with pytest.raises(KvmStatsUnavailable):
                read_vm_binary_stats(os.getpid(), r)
            with pytest.raises(KvmStatsUnavailable):
                read_vm_binary_stats(os.getpid(), 100_000)
        assert _open_fds() == before
    finally:
        os.close(r)
        os.close(w)
        os.close(stats_fd)


def test_find_vm_fds_self(kvm: Kvm) -> None:
    stats_fd = fcntl.ioctl(kvm.vm_fd, KVM_GET_STATS_FD, 0)  # "anon_inode:kvm-vm-stats" must not match
    try:
        found = find_vm_fds(Path("/proc"), os.getpid())
    finally:
        os.close(stats_fd)
    assert kvm.vm_fd in found
    assert kvm.sys_fd not in found and stats_fd not in found


def test_find_vm_fds_filters_links(tmp_path: Path) -> None:
    fd_dir = tmp_path / "42" / "fd"
    fd_dir.mkdir(parents=True)
    for entry, target in [("3", "anon_inode:kvm-vm"), ("10", "anon_inode:kvm-vm"), ("4", "pipe:[1]"),
                          ("5", "anon_inode:kvm-vm-stats"), ("6", "anon_inode:kvm-vcpu:0"),
                          ("notanfd", "anon_inode:kvm-vm")]:
        (fd_dir / entry).symlink_to(target)
    assert find_vm_fds(tmp_path, 42) == [3, 10]
    assert find_vm_fds(tmp_path, 43) == []  # no such process
    (tmp_path / "44").mkdir()
    (tmp_path / "44" / "fd").write_text("")  # not a directory
    assert find_vm_fds(tmp_path, 44) == []


def test_find_vm_fds_gone_process() -> None:
    assert find_vm_fds(Path("/proc"), _gone_pid()) == []


def test_find_vm_fds_tolerates_exiting_processes() -> None:
    # Short-lived children that create a VM and exit at once.  Scan them while
    # they live and die: each scan must return a list, never raise.
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("real KVM test: /dev/kvm absent or not accessible")
    code = (
        "import os, fcntl\n"
        "k = os.open('/dev/kvm', os.O_RDWR)\n"
        "fds = [fcntl.ioctl(k, 0xAE01, 0) for _ in range(4)]\n"
        "[os.close(f) for f in fds]\n"
    )
    for _ in range(10):
        child = subprocess.Popen([sys.executable, "-c", code])
        try:
            while child.poll() is None:
                assert isinstance(find_vm_fds(Path("/proc"), child.pid), list)
            assert find_vm_fds(Path("/proc"), child.pid) == []
        finally:
            child.kill()
            child.wait()


def test_pipe_is_not_a_kvm_vm_fd() -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(KvmStatsUnavailable) as info:
            read_vm_binary_stats(os.getpid(), r)
    finally:
        os.close(r)
        os.close(w)
    assert info.value.reason == REASON_NOT_KVM_VM_FD
    assert "not a KVM VM fd" in info.value.reason
    assert (info.value.pid, info.value.fd) == (os.getpid(), r)
    assert "pipe:[" in info.value.detail


def test_kvm_system_fd_is_not_a_vm_fd(kvm: Kvm) -> None:
    with pytest.raises(KvmStatsUnavailable) as info:
        read_vm_binary_stats(os.getpid(), kvm.sys_fd)
    assert info.value.reason == REASON_NOT_KVM_VM_FD


def test_ioctl_error_classification_matches_real_kernel() -> None:
    # The kernel answers KVM_GET_STATS_FD on a non-KVM fd with ENOTTY ...
    r, w = os.pipe()
    try:
        with pytest.raises(OSError) as info:
            fcntl.ioctl(r, KVM_GET_STATS_FD, 0)
    finally:
        os.close(r)
        os.close(w)
    assert info.value.errno == errno.ENOTTY
    # ... and the classifier tells "wrong fd" from "old kernel" using the fd's link.
    assert _ioctl_failure_reason(errno.ENOTTY, "pipe:[1]")[0] == REASON_NOT_KVM_VM_FD
    assert _ioctl_failure_reason(errno.ENOTTY, None)[0] == REASON_NOT_KVM_VM_FD
    assert _ioctl_failure_reason(errno.ENOTTY, "anon_inode:kvm-vm")[0] == REASON_KERNEL_TOO_OLD
    assert _ioctl_failure_reason(errno.EINVAL, "anon_inode:kvm-vm")[0] == REASON_KERNEL_TOO_OLD
    assert _ioctl_failure_reason(errno.EIO, "anon_inode:kvm-vm")[0] == REASON_FOREIGN_VM


def test_nonexistent_pid_is_process_gone() -> None:
    pid = _gone_pid()
    with pytest.raises(KvmStatsUnavailable) as info:
        read_vm_binary_stats(pid, 3)
    assert info.value.reason == REASON_PROCESS_GONE
    assert info.value.errno == errno.ESRCH
    assert f"pid {pid} fd 3" in str(info.value)


def test_invalid_pid() -> None:
    with pytest.raises(KvmStatsUnavailable) as info:
        read_vm_binary_stats(0, 3)
    assert info.value.reason == REASON_INVALID_PID


def test_unopened_fd_in_target() -> None:
    with pytest.raises(KvmStatsUnavailable) as info:
        read_vm_binary_stats(os.getpid(), 100_000)
    assert info.value.reason == REASON_FD_GONE
    assert info.value.errno == errno.EBADF


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to an unprivileged uid")
def test_unprivileged_caller_gets_permission_reason(kvm: Kvm) -> None:
    """A caller without ptrace rights over the VMM gets a permission reason.

    A forked child drops to uid/gid 65534 and targets this (root) process.
    pidfd_getfd fails with EPERM and listing /proc/<pid>/fd with EACCES; both
    must come back as REASON_PERMISSION, not as an OSError or an empty list.
    """
    target = os.getpid()
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the forked child
        results: list[str] = []
        try:
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            for call in (lambda: read_vm_binary_stats(target, kvm.vm_fd),
                         lambda: find_vm_fds(Path("/proc"), target)):
                try:
                    call()
                    results.append("no error")
                except KvmStatsUnavailable as exc:
                    results.append(exc.reason)
        except BaseException as exc:  # report anything, never run pytest on in the child
            results.append(f"child crashed: {exc!r}")
        os.write(w, "\n".join(results).encode())
        os._exit(0)
    os.close(w)
    try:
        with os.fdopen(r, "rb") as pipe:
            reported = pipe.read().decode().split("\n")
    finally:
        os.waitpid(child, 0)
    assert reported == [REASON_PERMISSION, REASON_PERMISSION]


# A stand-in VMM: it holds a VM fd and a VM stats fd, prints both, and waits.
_CHILD_VMM = """
import fcntl, os, sys, time
k = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
vm = fcntl.ioctl(k, 0xAE01, 0)
stats = fcntl.ioctl(vm, 0xAECE, 0)
print(vm, stats, flush=True)
time.sleep(60)
"""


def test_cross_process_pidfd_getfd() -> None:
    os.close(_open_kvm())  # skip early if /dev/kvm is unusable
    child = subprocess.Popen([sys.executable, "-c", _CHILD_VMM], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert len(line.split()) == 2, f"child printed {line!r}, rc={child.poll()}"
        vm_fd, stats_fd = map(int, line.split())
        assert find_vm_fds(Path("/proc"), child.pid) == [vm_fd]
        assert find_vm_stats_fds(Path("/proc"), child.pid) == [stats_fd]

        # A stats fd the VMM holds can be read from here.
        stats = read_vm_binary_stats(child.pid, stats_fd)
        assert stats.id == f"kvm-{child.pid}"  # proves the stats came from the child's VM
        assert to_counters(stats)["pages_2m"] == 0

        # The VM fd itself cannot be used: kvm_vm_ioctl() answers EIO to any
        # process whose mm is not the VM's, so KVM_GET_STATS_FD is refused
        # even with CAP_SYS_PTRACE.
        with pytest.raises(KvmStatsUnavailable) as foreign:
            read_vm_binary_stats(child.pid, vm_fd)
        assert foreign.value.reason == REASON_FOREIGN_VM
        assert foreign.value.errno == errno.EIO
        assert "find_vm_stats_fds" in str(foreign.value)
    finally:
        child.kill()
        child.wait()
        if child.stdout is not None:
            child.stdout.close()
    with pytest.raises(KvmStatsUnavailable) as gone:
        read_vm_binary_stats(child.pid, stats_fd)
    assert gone.value.reason == REASON_PROCESS_GONE


@pytest.mark.skipif(platform.machine() != "x86_64", reason="guest code below is x86 real mode")
def test_real_vcpu_stats_nonzero_values_and_histograms(kvm: Kvm) -> None:
    """Parse a real blob that has non-zero values and real histograms.

    In an empty VM every stat is 0, so a parser that mixed up offsets would
    still pass the tests above.  A vCPU that runs exactly one HLT has
    halt_exits == 1 and io_exits == 0 at known places in the blob.  Its
    stats also include 32-bucket log histograms.
    """
    mem = mmap.mmap(-1, 1 << 20)
    vcpu = -1
    run: mmap.mmap | None = None
    try:
        view = ctypes.c_char.from_buffer(mem)
        host_addr = ctypes.addressof(view)
        del view  # release the buffer export so mem.close() works; the mapping stays
        fcntl.ioctl(kvm.vm_fd, KVM_SET_USER_MEMORY_REGION, struct.pack("=IIQQQ", 0, 0, 0, 1 << 20, host_addr))
        vcpu = fcntl.ioctl(kvm.vm_fd, KVM_CREATE_VCPU, 0)
        run = mmap.mmap(vcpu, fcntl.ioctl(kvm.sys_fd, KVM_GET_VCPU_MMAP_SIZE, 0), mmap.MAP_SHARED,
                        mmap.PROT_READ | mmap.PROT_WRITE)
        mem[0:1] = b"\xf4"  # hlt at guest physical address 0
        sregs = bytearray(312)
        fcntl.ioctl(vcpu, KVM_GET_SREGS, sregs, True)
        struct.pack_into("=Q", sregs, 0, 0)  # cs.base = 0
        struct.pack_into("=H", sregs, 12, 0)  # cs.selector = 0
        fcntl.ioctl(vcpu, KVM_SET_SREGS, bytes(sregs))
        regs = bytearray(144)
        fcntl.ioctl(vcpu, KVM_GET_REGS, regs, True)
        struct.pack_into("=QQ", regs, 128, 0, 2)  # rip = 0, rflags = reserved bit 1
        fcntl.ioctl(vcpu, KVM_SET_REGS, bytes(regs))
        try:
            fcntl.ioctl(vcpu, KVM_RUN, 0)
        except OSError as exc:
            pytest.skip(f"real KVM test: KVM_RUN failed: {exc}")
        exit_reason = struct.unpack_from("=I", run, 8)[0]
        if exit_reason != KVM_EXIT_HLT:
            pytest.skip(f"real KVM test: guest exited with reason {exit_reason}, not HLT")

        stats_fd = fcntl.ioctl(vcpu, KVM_GET_STATS_FD, 0)
        try:
            stats = parse_kvm_stats(read_stats_blob(stats_fd, "vcpu0"), "vcpu0")
            # vCPU fds and vCPU stats fds are not VM-level sources; refuse them.
            for fd in (vcpu, stats_fd):
                with pytest.raises(KvmStatsUnavailable) as info:
                    read_vm_binary_stats(os.getpid(), fd)
                assert info.value.reason == REASON_NOT_KVM_VM_FD
        finally:
            os.close(stats_fd)
        assert stats.id == f"kvm-{os.getpid()}/vcpu-0"
        assert stats.scalar("halt_exits") == 1
        assert stats.scalar("io_exits") == 0
        assert stats.scalar("exits") >= 1  # type: ignore[operator]
        hist = stats.descriptors["halt_wait_hist"]
        assert (hist.type_name, hist.unit_name, hist.exponent) == ("log_hist", "seconds", -9)
        assert len(stats.values["halt_wait_hist"]) == hist.size > 1
        with pytest.raises(ValueError):
            stats.scalar("halt_wait_hist")
    finally:
        if run is not None:
            run.close()
        if vcpu >= 0:
            os.close(vcpu)
        mem.close()
