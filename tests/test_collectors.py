"""Readers against fixture trees and mutated copies of them: every failure becomes a status."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eptwatch.agent.model.predicate import Cause
from eptwatch.agent.model.sampler import Sampler, SamplerConfig
from eptwatch.agent.sources.discovery import (
    parse_cmdline,
    parse_qemu_identity,
    parse_stat,
    parse_status_thp_enabled,
    split_qemu_opts,
)
from eptwatch.agent.sources.hostroot import HostReadError, HostRoot, read_file
from eptwatch.agent.sources.kernel import parse_release, read_kernel_identity
from eptwatch.agent.sources.kvm_debugfs import CounterScope, parse_counter, read_counters
from eptwatch.agent.sources.status import ParseError, SourceState
from eptwatch.agent.sources.thp import mount_for_path, parse_bracketed, parse_mountinfo, read_thp_settings

from .conftest import FIXTURES


@pytest.fixture
def seed_copy(tmp_path: Path) -> Path:
    dst = tmp_path / "host"
    shutil.copytree(FIXTURES / "linux-5.3-unfixed", dst, symlinks=True)
    return dst


def sample(root: Path, **kw: object):  # type: ignore[no-untyped-def]
    return Sampler(HostRoot.from_root(root), SamplerConfig(**kw)).sample()  # type: ignore[arg-type]


def all_statuses(s):  # type: ignore[no-untyped-def]
    return list(s.statuses) + [st for v in s.vms for st in v.statuses]


# --- kernel identity ---

def test_parse_release() -> None:
    v = parse_release("4.18.0-305.el8.x86_64")
    assert v is not None and (v.major, v.minor, v.patch, v.extra) == (4, 18, 0, "-305.el8.x86_64")
    assert parse_release("5.4") is not None and parse_release("5.4").patch == 0  # type: ignore[union-attr]
    assert parse_release("Linux") is None


def test_kernel_identity_from_fixture_and_garbage(seed_copy: Path) -> None:
    k, st_ = read_kernel_identity(HostRoot.from_root(seed_copy))
    assert k is not None and k.release == "5.3.0" and st_.state is SourceState.OK
    (seed_copy / "proc/sys/kernel/osrelease").write_text("\x00\x01garbage\n")
    k, st_ = read_kernel_identity(HostRoot.from_root(seed_copy))
    assert k is None and st_.state is SourceState.ERROR and "osrelease" in st_.reason


# --- THP ---

def test_bracketed() -> None:
    assert parse_bracketed("always [madvise] never\n", "enabled") == "madvise"
    with pytest.raises(ParseError, match="exactly one"):
        parse_bracketed("always madvise never", "enabled")
    with pytest.raises(ParseError):
        parse_bracketed("[always] [never]", "enabled")


def test_thp_settings_missing_file_is_unavailable(seed_copy: Path) -> None:
    os.remove(seed_copy / "sys/kernel/mm/transparent_hugepage/shmem_enabled")
    thp, statuses = read_thp_settings(HostRoot.from_root(seed_copy))
    assert thp.enabled == "madvise" and thp.shmem_enabled is None
    assert any(s.source == "thp.shmem_enabled" and s.state is SourceState.UNAVAILABLE for s in statuses)


MOUNTINFO = textwrap.dedent("""\
    22 1 253:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
    40 22 0:26 / /dev/shm rw,nosuid,nodev shared:2 - tmpfs tmpfs rw,size=32G,huge=always
    41 22 0:27 / /srv/vm\\040ram rw shared:3 - tmpfs tmpfs rw,huge=within_size
    42 40 0:28 / /dev/shm/inner rw shared:4 - tmpfs tmpfs rw
""")


def test_mountinfo_and_lookup() -> None:
    mounts = parse_mountinfo(MOUNTINFO, "mountinfo")
    assert mount_for_path(mounts, "/dev/shm/qemu.mem").option("huge") == "always"  # type: ignore[union-attr]
    assert mount_for_path(mounts, "/srv/vm ram/guest").option("huge") == "within_size"  # type: ignore[union-attr]
    inner = mount_for_path(mounts, "/dev/shm/inner/x")
    assert inner is not None and inner.mount_point == "/dev/shm/inner" and inner.option("huge") is None
    assert mount_for_path(mounts, "/var/lib/x").fstype == "ext4"  # type: ignore[union-attr]


def test_mountinfo_malformed_names_line() -> None:
    with pytest.raises(ParseError) as info:
        parse_mountinfo(MOUNTINFO + "garbage without separator\n", "/proc/1/mountinfo")
    assert info.value.line == 5


# --- debugfs counters ---

def test_counter_parse() -> None:
    assert parse_counter("271\n", "c") == 271
    for bad in ("", "-1\n", "12 kB\n", "0x10\n", "١٢\n", str(2**64) + "\n"):
        with pytest.raises(ParseError):
            parse_counter(bad, "c")


def test_garbage_counter_is_error_not_zero(seed_copy: Path) -> None:
    (seed_copy / "sys/kernel/debug/kvm/4242-14/largepages").write_text("garbage\n")
    s = sample(seed_copy)
    statuses = all_statuses(s)
    assert any(st_.state is SourceState.ERROR and "largepages" in st_.reason for st_ in statuses)
    # The global counter still covers the only VM: the estimate falls back to it, and says so.
    (e,) = s.estimates
    assert e.observed_huge_2m == 12 and any("host-wide counter" in u for u in e.uncertainty)


def test_unreadable_extra_counter_is_partial(seed_copy: Path) -> None:
    (seed_copy / "sys/kernel/debug/kvm/4242-14/nx_largepages_splitted").write_text("not a number\n")
    c, st_ = read_counters(HostRoot.from_root(seed_copy), seed_copy / "sys/kernel/debug/kvm/4242-14", CounterScope.PER_VM_DEBUGFS, "x")
    assert c is not None and c.large_pages == 12 and c.nx_lpage_splits is None
    assert st_.state is SourceState.PARTIAL and "nx_largepages_splitted" in st_.reason


def test_debugfs_missing_is_unavailable_and_unknown() -> None:
    s = sample(FIXTURES / "debugfs-missing")
    d = [x for x in s.statuses if x.source == "kvm_debugfs"][0]
    assert d.state is SourceState.UNAVAILABLE and "not mounted" in d.reason
    (e,) = s.estimates
    assert e.cause is Cause.UNKNOWN and e.observed_huge_2m is None and e.host_huge_capacity_2m == 2048


def test_kvm_module_not_loaded(tmp_path: Path) -> None:
    shutil.copytree(FIXTURES / "debugfs-missing", tmp_path / "h", symlinks=True)
    (tmp_path / "h/sys/kernel/debug/tracing").mkdir(parents=True)  # git keeps no empty mount point
    s = sample(tmp_path / "h")
    d = [x for x in s.statuses if x.source == "kvm_debugfs"][0]
    assert "kvm module not loaded" in d.reason


# --- smaps failures ---

def test_truncated_smaps_is_error_with_file_and_line(seed_copy: Path) -> None:
    p = seed_copy / "proc/4242/smaps"
    text = p.read_text()
    p.write_text(text[: len(text) // 2])
    s = sample(seed_copy)
    (vm,) = s.vms
    err = [x for x in vm.statuses if x.source == "smaps"][0]
    assert err.state is SourceState.ERROR and str(p) in err.reason
    assert vm.host_huge is None
    assert s.estimates[0].cause is Cause.UNKNOWN and s.estimates[0].host_huge_capacity_2m is None


def test_process_exited_between_discovery_and_read(seed_copy: Path) -> None:
    os.remove(seed_copy / "proc/4242/smaps")
    os.remove(seed_copy / "proc/4242/smaps_rollup")
    s = sample(seed_copy)
    (vm,) = s.vms
    assert any(x.source == "smaps" and x.state is not SourceState.OK for x in vm.statuses)
    assert s.estimates[0].cause is Cause.UNKNOWN


def test_debugfs_dir_of_a_dead_pid_is_dropped_with_a_note(seed_copy: Path) -> None:
    (seed_copy / "sys/kernel/debug/kvm/9999-11").mkdir()
    (seed_copy / "sys/kernel/debug/kvm/9999-11/largepages").write_text("5\n")
    s = sample(seed_copy)
    assert [v.vm.pid for v in s.vms] == [4242]
    disc = [x for x in s.statuses if x.source == "discovery"][0]
    assert disc.state is SourceState.PARTIAL and "pid 9999" in disc.reason and "exited" in disc.reason


def test_pid_reused_during_sample_is_discarded(seed_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pid whose start time changes between discovery and the end of the read is not the same VM."""
    stat = seed_copy / "proc/4242/stat"
    original = HostRoot.read_bytes

    def racing_read(self: HostRoot, path: Path, limit: int = 1 << 28, **kwargs: object) -> bytes:
        data = original(self, path, limit, **kwargs)  # type: ignore[call-overload]
        if path.name == "smaps":  # the process exits and a new one takes its pid while smaps is read
            stat.write_text(stat.read_text().replace(" 123456 ", " 777777 "))
        return data

    monkeypatch.setattr(HostRoot, "read_bytes", racing_read)
    s = Sampler(HostRoot.from_root(seed_copy), SamplerConfig()).sample()
    (vm,) = s.vms
    assert any("reused" in x.reason for x in vm.statuses)
    assert vm.host_huge is None and s.estimates[0].cause is Cause.UNKNOWN


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv to drop DAC capabilities")
def test_permission_denied_is_a_status_not_a_crash(seed_copy: Path) -> None:
    """Root bypasses file modes, so the sample runs without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH
    against a mode-000 smaps: a real EACCES from the kernel, not a mock."""
    os.chmod(seed_copy / "proc/4242/smaps", 0)
    code = textwrap.dedent(f"""
        import json
        from eptwatch.agent.sources.hostroot import HostRoot
        from eptwatch.agent.model.sampler import Sampler, SamplerConfig
        s = Sampler(HostRoot.from_root({str(seed_copy)!r}), SamplerConfig(smaps_mode="full")).sample()
        print(json.dumps([[x.source, x.state.value, x.reason] for x in s.vms[0].statuses]))
        print(s.estimates[0].cause.value)
    """)
    out = subprocess.run(["setpriv", "--bounding-set=-dac_override,-dac_read_search", sys.executable, "-c", code],
                         capture_output=True, text=True, check=True)
    statuses, cause = out.stdout.strip().split("\n")
    assert '"smaps", "error"' in statuses and "permission denied" in statuses
    assert cause == "unknown"


# --- discovery and identity ---

def test_qemu_identity() -> None:
    argv = ["/usr/bin/qemu-system-x86_64", "-name", "guest=web,,01,debug-threads=on", "-uuid", "5B1F0C7E-2D4A-4C38-9A51-0E6A3B7C0001", "-m", "size=4G,slots=4,maxmem=8G"]
    ident = parse_qemu_identity(argv)
    assert ident.name == "web,01" and ident.uuid == "5b1f0c7e-2d4a-4c38-9a51-0e6a3b7c0001"
    assert ident.memory_bytes == 4 * 1024**3 and ident.is_qemu
    assert parse_qemu_identity(["qemu-kvm", "-name", "plain", "-m", "2048"]).name == "plain"
    assert parse_qemu_identity(["qemu-kvm", "-m", "2048"]).memory_bytes == 2048 * 1024**2
    assert parse_qemu_identity(["qemu-kvm", "-name"]).name == ""  # truncated argv: no crash
    assert not parse_qemu_identity(["/bin/bash"]).is_qemu
    assert split_qemu_opts("a,,b,c") == ["a,b", "c"]


def test_cmdline_and_stat_parsing() -> None:
    assert parse_cmdline(b"qemu\x00-name\x00x\x00") == ["qemu", "-name", "x"]
    assert parse_cmdline(b"") == []
    line = "42 (qemu (weird) name) S " + " ".join(["1"] * 18) + " 987654 " + " ".join(["0"] * 30)
    assert parse_stat(line, "stat") == ("qemu (weird) name", 987654)
    with pytest.raises(ParseError):
        parse_stat("42 qemu S 1", "stat")
    assert parse_status_thp_enabled("Name:\tq\nTHP_enabled:\t0\n") is False
    assert parse_status_thp_enabled("Name:\tq\n") is None


def test_discovery_sources_union() -> None:
    s = sample(FIXTURES / "linux-6.6-pages2m")
    by = {v.vm.vm_id: v.vm.discovered_by for v in s.vms}
    assert all(set(b) == {"cmdline", "debugfs", "vm_fd"} for b in by.values())
    assert {v.vm.identity.name for v in s.vms} == {"healthy-66", "regressed-66"}


def test_kernel_threads_are_not_vms() -> None:
    s = sample(FIXTURES / "linux-5.3-unfixed")
    assert [v.vm.pid for v in s.vms] == [4242]


# --- adaptive smaps budget ---

def test_budget_falls_back_to_rollup_then_skips_and_reports() -> None:
    root = FIXTURES / "linux-5.3-unfixed"
    sampler = Sampler(HostRoot.from_root(root), SamplerConfig(smaps_budget_seconds=0.0, max_skip_intervals=2))
    first = sampler.sample().vms[0]
    assert first.smaps_mode == "full" and any("using smaps_rollup next" in x.reason for x in first.statuses)
    second = sampler.sample()
    assert second.vms[0].smaps_mode == "rollup" and second.vms[0].whole_process
    assert any("smaps_rollup" in u for u in second.estimates[0].uncertainty)
    assert second.estimates[0].cause is Cause.KNOWN_PAGE_CACHE_THP_BUG  # the rollup still carries the verdict
    third = sampler.sample()
    assert third.vms[0].smaps_mode == "reused"
    assert any("reused" in u for u in third.estimates[0].uncertainty)


def test_budget_generous_stays_full() -> None:
    sampler = Sampler(HostRoot.from_root(FIXTURES / "linux-5.4-fixed"), SamplerConfig(smaps_budget_seconds=60.0))
    for _ in range(3):
        assert sampler.sample().vms[0].smaps_mode == "full"


def test_hostroot_errors_are_classified(tmp_path: Path) -> None:
    with pytest.raises(HostReadError) as info:
        read_file(tmp_path / "nope")
    assert info.value.kind == "absent"
    big = tmp_path / "big"
    big.write_bytes(b"x" * 100)
    with pytest.raises(HostReadError) as info:
        read_file(big, limit=10)
    assert info.value.kind == "too_large"


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_small_parsers_never_crash(raw: bytes) -> None:
    text = raw.decode("utf-8", errors="replace")
    for fn in (parse_counter, parse_bracketed, parse_mountinfo, parse_stat):
        try:
            fn(text, "fuzz")  # type: ignore[operator]
        except ParseError:
            pass
    try:
        parse_qemu_identity(parse_cmdline(raw))
    except ParseError:  # a -m out of range
        pass
    parse_status_thp_enabled(text)
