"""Property fuzz of every agent parser of host input (issue 11): unbounded integers and byte
mutations of real fixture files. Whatever comes in, a parser returns a value within the bounds of
agent/sources/bounds.py or raises ParseError, the project's own error; nothing else. The compiled smaps
scanner and the regex fallback find the same lines, and scan_large_vmas returns the same with either.

`make fuzz` runs these with EPTWATCH_FUZZ_EXAMPLES inputs each (tests/fuzzing.py); the ordinary
suite runs the small counts given to fuzz_settings below.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eptwatch.agent.model.predicate import era_for, load_era_overrides
from eptwatch.agent.model.sampler import Sampler, SamplerConfig
from eptwatch.agent.report.host_report import host_report
from eptwatch.agent.sources import smaps as smaps_module
from eptwatch.agent.sources.bounds import MAX_BYTES, MAX_FD, MAX_PID, MAX_U64, parse_bounded, small_decimal
from eptwatch.agent.sources.discovery import (
    parse_cmdline,
    parse_qemu_identity,
    parse_stat,
    parse_status_thp_enabled,
    split_qemu_opts,
)
from eptwatch.agent.sources.guest_ram import attribute_guest_ram
from eptwatch.agent.sources.hostroot import HostRoot
from eptwatch.agent.sources.kernel import parse_release
from eptwatch.agent.sources.kvm_debugfs import parse_counter, parse_vm_dir_name
from eptwatch.agent.sources.smaps import parse_smaps, parse_smaps_rollup, scan_large_vmas
from eptwatch.agent.sources.status import ParseError
from eptwatch.agent.sources.thp import mount_for_path, parse_bracketed, parse_mountinfo

from .conftest import FIXTURES
from .fuzzing import fuzz_settings

pytestmark = pytest.mark.fuzz

SEED = FIXTURES / "linux-6.6-pages2m"
SMAPS = (SEED / "proc/8200/smaps").read_bytes()
ROLLUP = (SEED / "proc/8200/smaps_rollup").read_bytes()
STAT = (SEED / "proc/8200/stat").read_bytes()
CMDLINE = (SEED / "proc/8200/cmdline").read_bytes()
MOUNTINFO = (SEED / "proc/8200/mountinfo").read_bytes()
STATUS = (SEED / "proc/8200/status").read_bytes()

# Integers with no upper bound: small ones, ones around every bound, and thousands of digits.
unbounded_ints = st.one_of(
    st.integers(0, 2**16),
    st.sampled_from([MAX_PID, MAX_PID + 1, MAX_U64, MAX_U64 + 1, MAX_BYTES // 1024, MAX_BYTES // 1024 + 1, 2**70]),
    st.integers(min_value=0),
    st.integers(1, 4000).map(lambda n: int("9" * n)),  # (str() of an int is capped at 4,300 digits)
)
# Longer runs of digits than any int: the 5,000-digit numbers of the issue are text.
number_text = st.one_of(unbounded_ints.map(str), st.text(alphabet="0123456789", min_size=1, max_size=6000),
                        st.text(alphabet="0123456789abcdef-+. \t\n٣²", max_size=40))


@st.composite
def mutated(draw: st.DrawFn, seed: bytes) -> bytes:
    """`seed` with a few edits: a number replaced by an unbounded one, a span replaced by random
    bytes, or a span cut out (truncation)."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["number", "bytes", "cut"]))
        i = draw(st.integers(0, max(0, len(data) - 1)))
        j = min(len(data), i + draw(st.integers(0, 40)))
        if kind == "number":
            # from the start of the nearest run of digits at or after i
            while i < len(data) and not chr(data[i]).isdigit():
                i += 1
            j = i
            while j < len(data) and chr(data[j]).isdigit():
                j += 1
            data[i:j] = draw(number_text).encode()
        elif kind == "bytes":
            data[i:j] = draw(st.binary(max_size=40))
        else:
            del data[i:j]
    return bytes(data)


def _only_parse_errors(fn: Callable[[], object]) -> object:
    try:
        return fn()
    except ParseError:
        return None


def _check_vma_bounds(v: object) -> None:
    for attr in ("size_bytes", "kernel_page_size_bytes", "rss_bytes", "anon_huge_bytes", "shmem_pmd_mapped_bytes",
                 "file_pmd_mapped_bytes", "shared_hugetlb_bytes", "private_hugetlb_bytes"):
        value = getattr(v, attr)
        assert value is None or 0 <= value <= MAX_BYTES, (attr, value)
    for attr in ("start", "end", "offset", "inode"):
        value = getattr(v, attr, 0)
        assert 0 <= value <= MAX_U64, (attr, value)


# --- numbers ---------------------------------------------------------------------------------------

@fuzz_settings(300)
@given(number_text, st.sampled_from([MAX_PID, MAX_U64, MAX_BYTES]), st.sampled_from([10, 16]))
def test_parse_bounded_returns_in_range_or_raises_parse_error(text: str, maximum: int, base: int) -> None:
    value = _only_parse_errors(lambda: parse_bounded(text, "fuzz", "n", maximum, base))
    assert value is None or (isinstance(value, int) and 0 <= value <= maximum)
    small = small_decimal(text, maximum)
    assert small is None or 0 <= small <= maximum


@fuzz_settings(300)
@given(number_text)
def test_counter_and_vm_dir_names(text: str) -> None:
    value = _only_parse_errors(lambda: parse_counter(text + "\n", "fuzz"))
    assert value is None or 0 <= value <= MAX_U64  # type: ignore[operator]
    for name in (f"{text}-14", f"4242-{text}", f"{text}-{text}"):
        pv = parse_vm_dir_name(name)
        assert pv is None or (0 <= pv[0] <= MAX_PID and 0 <= pv[1] <= MAX_FD)


@fuzz_settings(300)
@given(number_text, number_text, st.text(max_size=30))
def test_release_and_era(major: str, minor: str, extra: str) -> None:
    release = f"{major}.{minor}{extra}"
    parse_release(release)
    era_for(release, "x86_64")


# --- /proc/PID files -----------------------------------------------------------------------------

@fuzz_settings(300)
@given(st.one_of(mutated(STAT), st.binary(max_size=300)))
def test_stat(raw: bytes) -> None:
    got = _only_parse_errors(lambda: parse_stat(raw.decode("utf-8", errors="replace"), "fuzz"))
    assert got is None or 0 <= got[1] <= MAX_U64  # type: ignore[index]


@fuzz_settings(300)
@given(st.one_of(mutated(CMDLINE), st.lists(st.sampled_from(["-m", "-name", "-uuid", "size=", "4096", ","]) | number_text.map(lambda n: n + "G"))
                 .map(lambda a: b"qemu-system-x86_64\0" + "\0".join(a).encode() + b"\0")), st.text(max_size=20))
def test_cmdline_identity(raw: bytes, comm: str) -> None:
    argv = parse_cmdline(raw)
    identity = _only_parse_errors(lambda: parse_qemu_identity(argv, comm))
    if identity is not None:
        mem = identity.memory_bytes  # type: ignore[attr-defined]
        assert mem is None or 0 <= mem <= MAX_BYTES
    for a in argv:
        split_qemu_opts(a)


@fuzz_settings(300)
@given(st.one_of(mutated(STATUS), mutated(MOUNTINFO), st.binary(max_size=400)), st.text(max_size=40))
def test_status_mountinfo_bracketed(raw: bytes, path: str) -> None:
    text = raw.decode("utf-8", errors="replace")
    parse_status_thp_enabled(text)
    mounts = _only_parse_errors(lambda: parse_mountinfo(text, "fuzz"))
    if mounts is not None:
        mount_for_path(mounts, "/" + path)  # type: ignore[arg-type]
    _only_parse_errors(lambda: parse_bracketed(text, "fuzz"))


@fuzz_settings(200)
@given(st.text(max_size=300))
def test_era_override_table(text: str) -> None:
    _only_parse_errors(lambda: load_era_overrides(text, "fuzz"))


# --- smaps -----------------------------------------------------------------------------------------

SEARCHES: dict[str, Callable[[bytes | bytearray, int], list[tuple[int, int, int]]]] = {"regex": smaps_module._big_size_lines_regex}
if smaps_module._big_size_lines_c is not None:
    SEARCHES["c"] = smaps_module._big_size_lines_c


def _scan_with(search: str, data: bytes, min_bytes: int) -> object:
    with mock.patch.object(smaps_module, "_big_size_lines", SEARCHES[search]):
        try:
            return scan_large_vmas(data, "fuzz", min_bytes)
        except ParseError as exc:
            return ("error", str(exc))


@fuzz_settings(300)
@given(mutated(SMAPS), st.sampled_from([2 * 1024 * 1024, 64 * 1024 * 1024]))
def test_smaps_parsers_and_scanners_agree(data: bytes, min_bytes: int) -> None:
    text = data.decode("utf-8", errors="replace")
    vmas = _only_parse_errors(lambda: parse_smaps(text, "fuzz"))
    for v in vmas or []:  # type: ignore[attr-defined]
        _check_vma_bounds(v)
    if vmas is not None:
        attribute_guest_ram(vmas, lambda _p: None, min_bytes)  # type: ignore[arg-type]
    results = {name: _scan_with(name, data, min_bytes) for name in SEARCHES}
    assert len({repr(r) for r in results.values()}) == 1, results
    got = results["regex"]
    if not isinstance(got, tuple):
        for v in got:  # type: ignore[attr-defined]
            _check_vma_bounds(v)
    digits = len(str(min_bytes // 1024))
    for search in SEARCHES.values():
        assert search(data, digits) == SEARCHES["regex"](data, digits)


@fuzz_settings(300)
@given(mutated(ROLLUP))
def test_smaps_rollup(data: bytes) -> None:
    rollup = _only_parse_errors(lambda: parse_smaps_rollup(data.decode("utf-8", errors="replace"), "fuzz"))
    if rollup is not None:
        _check_vma_bounds(smaps_module.Vma(**{f: getattr(rollup, f) for f in ("size_bytes", "kernel_page_size_bytes", "rss_bytes",
                                                                              "anon_huge_bytes", "shmem_pmd_mapped_bytes",
                                                                              "file_pmd_mapped_bytes", "shared_hugetlb_bytes",
                                                                              "private_hugetlb_bytes")}))


# --- a whole sample over a mutated host file -------------------------------------------------------

HOST_FILES = ["proc/8200/smaps", "proc/8200/smaps_rollup", "proc/8200/stat", "proc/8200/cmdline", "proc/8200/mountinfo",
              "proc/8200/status", "proc/8100/maps", "proc/sys/kernel/osrelease", "proc/sys/kernel/hostname",
              "sys/kernel/debug/kvm/8200-15/pages_2m", "sys/kernel/debug/kvm/pages_2m",
              "sys/kernel/mm/transparent_hugepage/enabled"]


@pytest.fixture(scope="module")
def host_tree(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    dst = tmp_path_factory.mktemp("fuzzhost") / "host"
    shutil.copytree(SEED, dst, symlinks=True)
    yield dst


@st.composite
def host_edit(draw: st.DrawFn) -> tuple[str, bytes]:
    name = draw(st.sampled_from(HOST_FILES))
    return name, draw(mutated((SEED / name).read_bytes()))


@fuzz_settings(60)
@given(st.data())
def test_a_sample_over_a_mutated_host_file_completes_and_serialises(host_tree: Path, data: st.DataObject) -> None:
    name, content = data.draw(host_edit())
    target = host_tree / name
    original = (SEED / name).read_bytes()
    target.write_bytes(content)
    try:
        for mode in ("full", "rollup"):
            s = Sampler(HostRoot.from_root(host_tree), SamplerConfig(smaps_mode=mode)).sample()
            host_report(s).SerializeToString()
            # The untouched VM keeps its verdict unless the edit was to a host-wide file.
            if name.startswith("proc/8200") or name.endswith("8200-15/pages_2m"):
                assert any(v.vm.pid == 8100 for v in s.vms)
    finally:
        target.write_bytes(original)
