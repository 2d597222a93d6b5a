"""A hostile or odd host tree under `sample` (issue 11, "Agent: hostile or odd host trees").

Each case is a copy of a real fixture host (two VMs: 8100 healthy, 8200 regressed) with one thing
made hostile. What must hold every time: the sample completes, the report serialises (JSON and
protobuf), the bad input is named in a status, and it costs only its own source or VM — the other VM
is still sampled with its verdict unchanged, and nothing is shown as healthy that was not measured.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from eptwatch.agent.faces.cli import main
from eptwatch.agent.model.predicate import Cause
from eptwatch.agent.model.sampler import HostSample, Sampler, SamplerConfig
from eptwatch.agent.report.host_report import host_report, report_to_json
from eptwatch.agent.sources import hostroot, smaps
from eptwatch.agent.sources.hostroot import HostReadError, HostRoot, ReadBuffer, read_file
from eptwatch.agent.sources.status import SourceState

from .conftest import FIXTURES

GOOD_PID, BAD_PID = 8100, 8200
SECRET = "root:$6$not-for-the-report:19000:0:99999:7:::"


@pytest.fixture
def host(tmp_path: Path) -> Path:
    dst = tmp_path / "host"
    shutil.copytree(FIXTURES / "linux-6.6-pages2m", dst, symlinks=True)
    return dst


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A file outside the host tree that no link inside it may make the agent read."""
    path = tmp_path / "shadow"
    path.write_text(SECRET + "\n")
    return path


@pytest.fixture(params=["openat2", "walk"])
def resolver(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every confinement case runs with openat2 (where the kernel has it) and with the hand walk."""
    if request.param == "openat2":
        if not hostroot._have_openat2():
            pytest.skip("openat2 is not available on this kernel (or is filtered by seccomp)")
        monkeypatch.setattr(hostroot, "_openat2_usable", True)
    else:
        monkeypatch.setattr(hostroot, "_openat2_usable", False)
    return str(request.param)


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{path} does not contain {old!r}"
    path.write_text(text.replace(old, new, 1))


def sample(root: Path, **kw: object) -> HostSample:
    return Sampler(HostRoot.from_root(root), SamplerConfig(**kw)).sample()  # type: ignore[arg-type]


def sample_json(root: Path, capsys: pytest.CaptureFixture[str]) -> tuple[dict, str]:  # type: ignore[type-arg]
    capsys.readouterr()
    assert main(["sample", "--root", str(root), "--format", "json", "--smaps-mode", "full"]) == 0
    out = capsys.readouterr().out
    return json.loads(out), out


def estimate_of(s: HostSample, pid: int) -> Cause | None:
    for vm, e in zip(s.vms, s.estimates):
        if vm.vm.pid == pid:
            return e.cause
    return None


def statuses_of(s: HostSample, pid: int) -> list[str]:
    return [f"{x.source}:{x.state.value}:{x.reason}" for v in s.vms if v.vm.pid == pid for x in v.statuses]


def discovery_note(s: HostSample) -> str:
    (d,) = [x for x in s.statuses if x.source == "discovery"]
    return d.reason


def assert_other_vm_unharmed(s: HostSample) -> None:
    assert estimate_of(s, GOOD_PID) is Cause.HEALTHY
    host_report(s).SerializeToString()  # every integer fits its wire field


def test_the_untouched_copy_is_what_the_cases_start_from(host: Path) -> None:
    s = sample(host)
    assert estimate_of(s, GOOD_PID) is Cause.HEALTHY and estimate_of(s, BAD_PID) is Cause.UNEXPLAINED


# --- numbers -------------------------------------------------------------------------------------

def test_a_400_digit_memory_size_drops_only_that_process(host: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cmdline = host / f"proc/{BAD_PID}/cmdline"
    cmdline.write_bytes(cmdline.read_bytes().replace(b"-m\x004096", b"-m\x00" + b"9" * 400))
    s = sample(host)
    assert [v.vm.pid for v in s.vms] == [GOOD_PID]
    assert f"pid {BAD_PID}: dropped" in discovery_note(s) and "out of range" in discovery_note(s)
    assert_other_vm_unharmed(s)
    doc, _ = sample_json(host, capsys)
    assert [v["pid"] for v in doc["vms"]] == [GOOD_PID]


@pytest.mark.parametrize("field", ["Size", "ShmemPmdMapped", "Rss"])
def test_a_2_to_the_70_kb_field_is_an_smaps_error_and_unknown(host: Path, field: str, capsys: pytest.CaptureFixture[str]) -> None:
    smaps_path = host / f"proc/{BAD_PID}/smaps"
    lines = smaps_path.read_text().split("\n")
    start = lines.index("Size:            4194304 kB")  # the guest-RAM VMA
    i = next(j for j in range(start, len(lines)) if lines[j].startswith(f"{field}:"))
    lines[i] = f"{field}:{2**70} kB"
    smaps_path.write_text("\n".join(lines))
    s = sample(host)
    assert estimate_of(s, BAD_PID) is Cause.UNKNOWN
    assert any(x.startswith("smaps:error:") and "out of range" in x for x in statuses_of(s, BAD_PID))
    assert_other_vm_unharmed(s)
    sample_json(host, capsys)


@pytest.mark.parametrize("where", ["smaps", "counter", "starttime", "osrelease", "maps_inode"])
def test_a_5000_digit_number_costs_only_its_source(host: Path, where: str, capsys: pytest.CaptureFixture[str]) -> None:
    huge = "7" * 5000
    if where == "smaps":
        edit(host / f"proc/{BAD_PID}/smaps", "Rss:             4196352 kB", f"Rss: {huge} kB")
    elif where == "counter":
        # (5,000 digits exceed the 4 KiB read limit of a counter file: the most that can be read)
        (host / f"sys/kernel/debug/kvm/{BAD_PID}-15/pages_2m").write_text(huge[:4090] + "\n")
    elif where == "starttime":
        edit(host / f"proc/{BAD_PID}/stat", " 123456 ", f" {huge} ")
    elif where == "osrelease":
        (host / "proc/sys/kernel/osrelease").write_text(f"{huge}.4.0\n")
    else:
        maps = host / f"proc/{GOOD_PID}/maps"
        maps.write_text(f"7f0000000000-7f0000001000 rw-s 00000000 00:01 {huge}    /dev/shm/x\n")
    s = sample(host)
    report = host_report(s)
    report.SerializeToString()
    sample_json(host, capsys)
    if where == "smaps":
        assert estimate_of(s, BAD_PID) is Cause.UNKNOWN
        assert any(x.startswith("smaps:error:") for x in statuses_of(s, BAD_PID))
    elif where == "counter":
        # The per-VM counter file is unreadable; the VM gets no verdict from a number it does not have.
        assert estimate_of(s, BAD_PID) is not Cause.HEALTHY
        assert any("kvm_debugfs.vm" in x and "out of range" in x for x in statuses_of(s, BAD_PID))
    elif where == "starttime":
        assert [v.vm.pid for v in s.vms] == [GOOD_PID] and f"pid {BAD_PID}" in discovery_note(s)
    elif where == "osrelease":
        assert s.kernel is None and any(x.source == "kernel" and x.state is SourceState.ERROR for x in s.statuses)
    if where != "osrelease":
        assert_other_vm_unharmed(s)


def test_pids_and_fds_beyond_2_to_the_31_are_not_processes(host: Path, capsys: pytest.CaptureFixture[str]) -> None:
    big = str(2**31 + 5)
    shutil.copytree(host / f"proc/{BAD_PID}", host / f"proc/{big}", symlinks=True)
    os.symlink("anon_inode:kvm-vm", host / f"proc/{GOOD_PID}/fd/{2**32}")
    shutil.copytree(host / f"sys/kernel/debug/kvm/{BAD_PID}-15", host / f"sys/kernel/debug/kvm/{big}-15")
    shutil.copytree(host / f"sys/kernel/debug/kvm/{BAD_PID}-15", host / f"sys/kernel/debug/kvm/{GOOD_PID}-{2**40}")
    s = sample(host)
    assert sorted(v.vm.pid for v in s.vms) == [GOOD_PID, BAD_PID]
    assert all(fd < 2**31 for v in s.vms for fd in v.vm.vm_fds)
    assert estimate_of(s, BAD_PID) is Cause.UNEXPLAINED
    assert_other_vm_unharmed(s)
    doc, _ = sample_json(host, capsys)
    assert sorted(v["pid"] for v in doc["vms"]) == [GOOD_PID, BAD_PID]


def test_a_starttime_beyond_2_to_the_64_drops_the_process(host: Path, capsys: pytest.CaptureFixture[str]) -> None:
    edit(host / f"proc/{BAD_PID}/stat", " 123456 ", f" {2**64} ")
    s = sample(host)
    assert [v.vm.pid for v in s.vms] == [GOOD_PID]
    assert f"pid {BAD_PID}" in discovery_note(s) and "starttime" in discovery_note(s)
    assert_other_vm_unharmed(s)
    sample_json(host, capsys)


# --- corrupt input is never healthy --------------------------------------------------------------

@pytest.mark.parametrize("search", ["regex", "c"])
def test_size_lots_kb_on_guest_ram_is_an_error_in_both_scanners(host: Path, search: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if search == "c":
        if smaps._big_size_lines_c is None:
            pytest.skip("the compiled scanner eptwatch.agent.sources._smapscan is not built here")
        monkeypatch.setattr(smaps, "_big_size_lines", smaps._big_size_lines_c)
    else:
        monkeypatch.setattr(smaps, "_big_size_lines", smaps._big_size_lines_regex)
    edit(host / f"proc/{GOOD_PID}/smaps", "Size:            4194304 kB", "Size: lots kB")
    s = sample(host)
    assert estimate_of(s, GOOD_PID) is Cause.UNKNOWN
    assert any(x.startswith("smaps:error:") and "lots" in x for x in statuses_of(s, GOOD_PID))
    assert estimate_of(s, BAD_PID) is Cause.UNEXPLAINED


def test_a_counter_of_2_to_the_64_minus_1_is_implausible_not_healthy(host: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (host / f"sys/kernel/debug/kvm/{GOOD_PID}-14/pages_2m").write_text(f"{2**64 - 1}\n")
    s = sample(host)
    (est,) = [e for v, e in zip(s.vms, s.estimates) if v.vm.pid == GOOD_PID]
    assert est.cause is Cause.IMPLAUSIBLE and str(2**64 - 1) in est.explanation
    # No absurd number goes out as if it were measured: the aggregator bounds them.
    assert est.host_huge_capacity_2m is None and est.observed_huge_2m is None and est.lost_huge_2m is None
    assert estimate_of(s, BAD_PID) is Cause.UNEXPLAINED
    doc, _ = sample_json(host, capsys)
    (wire,) = [e for e in doc["estimates"] if e["vm_id"] == s.vms[0].vm.vm_id]
    assert wire["cause"] == "CAUSE_IMPLAUSIBLE" and "lost_huge_2m" not in wire and "host_huge_capacity_2m" not in wire
    (vm,) = [v for v in doc["vms"] if v["pid"] == GOOD_PID]
    assert "pages_2m" not in vm["kvm"]


def test_observed_far_above_capacity_is_implausible(host: Path) -> None:
    (host / f"sys/kernel/debug/kvm/{GOOD_PID}-14/pages_2m").write_text("100000\n")  # capacity 2048
    s = sample(host)
    assert estimate_of(s, GOOD_PID) is Cause.IMPLAUSIBLE
    assert estimate_of(s, BAD_PID) is Cause.UNEXPLAINED


def test_capacity_above_guest_ram_is_implausible(host: Path) -> None:
    smaps_path = host / f"proc/{GOOD_PID}/smaps"
    lines = smaps_path.read_text().split("\n")
    start = lines.index("Size:            4194304 kB")
    for j in range(start, len(lines)):
        if lines[j].startswith("AnonHugePages:"):
            lines[j] = f"AnonHugePages:  {4194304 * 4} kB"
            break
    smaps_path.write_text("\n".join(lines))
    s = sample(host)
    (est,) = [e for v, e in zip(s.vms, s.estimates) if v.vm.pid == GOOD_PID]
    assert est.cause is Cause.IMPLAUSIBLE and "exceeds the VM's guest RAM" in est.explanation
    assert estimate_of(s, BAD_PID) is Cause.UNEXPLAINED


# --- --root is a boundary ------------------------------------------------------------------------

def test_smaps_linked_outside_the_root_is_an_error_not_content(host: Path, secret: Path, resolver: str,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    for i, target in enumerate((str(secret), os.path.relpath(secret, host / f"proc/{BAD_PID}"))):
        link = host / f"proc/{BAD_PID}/smaps"
        link.unlink()
        link.symlink_to(target)
        s = sample(host)
        assert estimate_of(s, BAD_PID) is Cause.UNKNOWN, target
        assert any("smaps:error:" in x and "outside the root" in x for x in statuses_of(s, BAD_PID))
        assert_other_vm_unharmed(s)
        _, out = sample_json(host, capsys)
        assert "not-for-the-report" not in out and "not-for-the-report" not in report_to_json(host_report(s))


@pytest.mark.parametrize("name", ["hostname", "osrelease"])
def test_kernel_files_linked_outside_the_root_do_not_leak(host: Path, secret: Path, resolver: str, name: str,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    link = host / "proc/sys/kernel" / name
    link.unlink()
    link.symlink_to(secret)
    s = sample(host)
    _, out = sample_json(host, capsys)
    assert "not-for-the-report" not in out
    if name == "hostname":
        assert s.host_id == "unknown"
        assert_other_vm_unharmed(s)
    else:
        (k,) = [x for x in s.statuses if x.source == "kernel"]
        assert k.state is SourceState.ERROR and "outside the root" in k.reason
        # Without a kernel release there is no era: both VMs are still sampled, without a verdict.
        assert sorted(v.vm.pid for v in s.vms) == [GOOD_PID, BAD_PID]


def test_a_directory_linked_outside_the_root_is_not_listed_or_read(host: Path, tmp_path: Path, resolver: str) -> None:
    """A process directory that is a link to a copy of a QEMU process elsewhere is not followed."""
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(host / f"proc/{BAD_PID}", elsewhere, symlinks=True)
    shutil.rmtree(host / f"proc/{BAD_PID}")
    (host / f"proc/{BAD_PID}").symlink_to(elsewhere)
    s = sample(host)
    assert estimate_of(s, BAD_PID) in (None, Cause.UNKNOWN)  # listed by debugfs, but nothing read through the link
    assert_other_vm_unharmed(s)


def test_links_within_the_root_still_resolve(host: Path, resolver: str) -> None:
    real = host / f"proc/{BAD_PID}/smaps"
    moved = host / "proc/smaps-of-8200"
    real.rename(moved)
    real.symlink_to("../smaps-of-8200")
    root = HostRoot.from_root(host)
    assert root.read_bytes(real) == moved.read_bytes()
    assert root.exists(real) and root.readlink(host / f"proc/{BAD_PID}/fd/15") == "anon_inode:kvm-vm"
    assert estimate_of(sample(host), BAD_PID) is Cause.UNEXPLAINED


def test_a_link_loop_is_refused_not_followed_forever(host: Path, resolver: str) -> None:
    proc = host / f"proc/{BAD_PID}"
    (proc / "smaps").unlink()
    (proc / "loop-a").symlink_to("loop-b")
    (proc / "loop-b").symlink_to("loop-a")
    (proc / "smaps").symlink_to("loop-a")
    with pytest.raises(HostReadError) as info:
        HostRoot.from_root(host).read_bytes(proc / "smaps")
    assert info.value.kind == "outside_root"
    assert estimate_of(sample(host), BAD_PID) is Cause.UNKNOWN


def test_dot_dot_and_paths_outside_every_anchor_are_refused(host: Path, secret: Path) -> None:
    root = HostRoot.from_root(host)
    for path in (host / "proc" / ".." / ".." / secret.name, secret):
        with pytest.raises(HostReadError) as info:
            root.read_bytes(path)
        assert info.value.kind == "outside_root"


def test_the_live_host_keeps_the_kernels_own_links() -> None:
    """On / the kernel's own links (/proc/self) resolve as they always did."""
    fd = os.open(os.devnull, os.O_RDONLY)
    try:
        for root in (HostRoot(), HostRoot.from_root("/")):
            assert root.read_text(root.proc("self", "stat")).startswith(str(os.getpid()))
            assert str(fd) in root.listdir(root.proc("self", "fd"))
            assert root.readlink(root.proc("self", "fd", str(fd))) == os.devnull
    finally:
        os.close(fd)


# --- only regular files, bounded in time ----------------------------------------------------------

def _run_with_hang_guard(fn: object) -> HostSample:
    """Run `fn` in a thread; the generous join timeout only keeps a regression from hanging the suite."""
    result: list[HostSample] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            result.append(fn())  # type: ignore[operator]
        except BaseException as exc:  # noqa: BLE001 - reported to the test below
            errors.append(exc)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout=300)
    assert not t.is_alive(), "sample blocked on a FIFO"
    assert not errors, errors
    return result[0]


def test_a_fifo_as_smaps_does_not_block_the_sample(host: Path) -> None:
    fifo = host / f"proc/{BAD_PID}/smaps"
    fifo.unlink()
    os.mkfifo(fifo)
    s = _run_with_hang_guard(lambda: sample(host))
    assert estimate_of(s, BAD_PID) is Cause.UNKNOWN
    assert any("smaps:error:" in x and "FIFO" in x for x in statuses_of(s, BAD_PID))
    assert_other_vm_unharmed(s)


def test_a_fifo_as_a_kernel_file_does_not_block(host: Path) -> None:
    for name in ("hostname", "osrelease"):
        path = host / "proc/sys/kernel" / name
        path.unlink()
        os.mkfifo(path)
    s = _run_with_hang_guard(lambda: sample(host))
    assert s.host_id == "unknown" and s.kernel is None
    assert estimate_of(s, GOOD_PID) is not None


@pytest.fixture
def slow_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[set[str]]:
    """Make reads of the files whose names the test puts in the returned set slow: hostroot's deadline
    clock advances 100 s at each look while such a file is being read (small chunks, so a file
    takes several looks); other reads see a still clock."""
    slow: set[str] = set()
    now = [0.0]
    current = [""]
    original = hostroot._require_regular

    def require_regular(fd: int, path: Path) -> None:
        current[0] = str(path)
        original(fd, path)

    def clock() -> float:
        if current[0] in slow:
            now[0] += 100.0
        return now[0]

    monkeypatch.setattr(hostroot, "_require_regular", require_regular)
    monkeypatch.setattr(hostroot, "_monotonic", clock)
    monkeypatch.setattr(hostroot, "_CHUNK_BYTES", 4096)
    monkeypatch.setattr(hostroot, "_STEP_BYTES", 4096)
    yield slow


def test_a_read_that_outlives_its_deadline_is_given_up(tmp_path: Path, slow_reads: set[str]) -> None:
    path = tmp_path / "slow"
    path.write_bytes(b"x" * 100_000)
    assert read_file(path) == read_file(path, into=ReadBuffer()) == b"x" * 100_000  # not slow yet
    slow_reads.add(str(path))
    with pytest.raises(HostReadError) as plain:
        read_file(path)
    with pytest.raises(HostReadError) as lent:
        read_file(path, into=ReadBuffer())
    assert plain.value.kind == lent.value.kind == "timeout"


def test_a_timed_out_smaps_costs_only_that_vm(host: Path, slow_reads: set[str]) -> None:
    slow_reads.add(str(host / f"proc/{BAD_PID}/smaps"))
    s = sample(host)
    assert estimate_of(s, BAD_PID) is Cause.UNKNOWN
    assert any("smaps:error:" in x and "longer than" in x for x in statuses_of(s, BAD_PID))
    assert_other_vm_unharmed(s)


# --- per-process isolation -----------------------------------------------------------------------

def test_an_unexpected_failure_on_one_vm_drops_only_that_vm(host: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = Sampler._read_thp_enabled

    def failing(self: Sampler, vm, statuses):  # type: ignore[no-untyped-def]
        if vm.pid == BAD_PID:
            raise RuntimeError("a defect met on this VM's input")
        return original(self, vm, statuses)

    monkeypatch.setattr(Sampler, "_read_thp_enabled", failing)
    s = sample(host)
    assert [v.vm.pid for v in s.vms] == [GOOD_PID]
    note = discovery_note(s)
    assert f"pid {BAD_PID}: dropped: RuntimeError" in note
    (d,) = [x for x in s.statuses if x.source == "discovery"]
    assert d.state is SourceState.PARTIAL
    assert_other_vm_unharmed(s)
