"""Processes that exit while a host is sampled (issue 13): one gone before any of its files was read is
a quiet note of discovery's, not a VM row; one that vanished after it was partly read stays a row with
its error. Simulated on fixture trees by a HostRoot that removes (or refuses, ESRCH) a pid's files at a
chosen read, after discovery has found it."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from eptwatch.agent.faces.table import render_table
from eptwatch.agent.model.predicate import Cause, Era
from eptwatch.agent.model.sampler import HostSample, Sampler, SamplerConfig
from eptwatch.agent.sources.collectors.base import HostFacts
from eptwatch.agent.sources.collectors.kvm_counters import CounterReading, KvmCountersCollector
from eptwatch.agent.sources.discovery import DiscoveredVm
from eptwatch.agent.sources.hostroot import MAX_READ_BYTES, HostReadError, HostRoot, ReadBuffer
from eptwatch.agent.sources.kvm_debugfs import CounterScope, KvmCounterValues
from eptwatch.agent.sources.status import SourceState, SourceStatus

from .conftest import FIXTURES

GONE, OTHER = 8100, 8200  # the two VMs of linux-6.6-pages2m


@dataclass(frozen=True)
class RacingRoot(HostRoot):
    """A fixture tree whose reads call `before_read(path)` first: there a test makes a process exit."""

    before_read: Callable[[Path], None] = lambda path: None

    def read_bytes(self, path: Path, limit: int = MAX_READ_BYTES, into: ReadBuffer | None = None) -> bytes | bytearray:  # type: ignore[override]
        self.before_read(path)
        if into is None:
            return super().read_bytes(path, limit)
        return super().read_bytes(path, limit, into=into)


@pytest.fixture
def host(tmp_path: Path) -> Path:
    dst = tmp_path / "host"
    shutil.copytree(FIXTURES / "linux-6.6-pages2m", dst, symlinks=True)
    return dst


def racing_root(base: Path, before_read: Callable[[Path], None]) -> RacingRoot:
    return RacingRoot(procfs=base / "proc", sysfs=base / "sys", debugfs=base / "sys" / "kernel" / "debug", root=base, before_read=before_read)


def exits_at(base: Path, pid: int, file_name: str) -> Callable[[Path], None]:
    """The process `pid` exits (its /proc directory goes: ENOENT) when its `file_name` is first opened."""
    def hook(path: Path) -> None:
        if path == base / "proc" / str(pid) / file_name and path.exists():
            shutil.rmtree(base / "proc" / str(pid))
    return hook


def discovery(s: HostSample) -> SourceStatus:
    (d,) = [x for x in s.statuses if x.source == "discovery"]
    return d


def assert_other_vm_sampled(s: HostSample) -> None:
    (v,) = s.vms
    assert v.vm.pid == OTHER and v.host_huge is not None and v.counters is not None
    assert [e.vm_id for e in s.estimates] == [v.vm.vm_id]
    assert s.estimates[0].cause is not Cause.UNKNOWN


def test_process_gone_before_its_first_read_is_a_note_not_a_vm(host: Path) -> None:
    reads: list[Path] = []
    hook = exits_at(host, GONE, "status")
    s = Sampler(racing_root(host, lambda p: (reads.append(p), hook(p))[-1]), SamplerConfig(smaps_mode="full")).sample()
    assert host / "proc" / str(GONE) / "status" in reads  # discovery found it; it exited when sampling began
    assert_other_vm_sampled(s)
    d = discovery(s)
    assert d.state is SourceState.PARTIAL
    assert f"pid {GONE} (" in d.reason and "exited before it was sampled" in d.reason
    # Nothing else was tried on it: no smaps read of a process known to be gone.
    assert host / "proc" / str(GONE) / "smaps" not in reads
    every = list(s.statuses) + [st for v in s.vms for st in v.statuses]
    assert not [st for st in every if st.state is SourceState.ERROR]
    table = render_table(s)
    assert "[error]" not in table and str(GONE) not in table.split("\n\n")[1]  # no VM row for it
    assert "unknown" not in [e.cause.value for e in s.estimates]


def test_process_gone_with_esrch_on_its_first_read_is_a_note(host: Path) -> None:
    """/proc/PID files held open answer ESRCH once the process exits (HostReadError kind "gone")."""
    exited = False

    def hook(path: Path) -> None:
        nonlocal exited
        if path.parent == host / "proc" / str(GONE):
            exited = exited or path.name == "status"
            if exited:
                raise HostReadError("gone", path, "process exited while being read")

    s = Sampler(racing_root(host, hook), SamplerConfig(smaps_mode="full")).sample()
    assert exited
    assert_other_vm_sampled(s)
    assert f"pid {GONE} (" in discovery(s).reason and "exited before it was sampled" in discovery(s).reason


def test_pid_reused_before_the_first_read_is_a_note(host: Path) -> None:
    """The process exits and a new one takes its pid before the sample reaches it: not that VM."""
    stat = host / "proc" / str(GONE) / "stat"

    def hook(path: Path) -> None:
        if path == host / "proc" / str(GONE) / "status" and path.exists():
            path.unlink()  # the new process's status is not there yet; its stat has a new start time
            stat.write_text(stat.read_text().replace(" 123456 ", " 777777 "))

    s = Sampler(racing_root(host, hook), SamplerConfig(smaps_mode="full")).sample()
    assert_other_vm_sampled(s)
    reason = discovery(s).reason
    assert f"pid {GONE} (" in reason and "exited before it was sampled" in reason and "123456 -> 777777" in reason


def test_process_vanished_after_a_partial_read_stays_an_unknown_row_with_its_error(host: Path) -> None:
    s = Sampler(racing_root(host, exits_at(host, GONE, "smaps")), SamplerConfig(smaps_mode="full")).sample()
    (gone,) = [v for v in s.vms if v.vm.pid == GONE]
    assert gone.thp_enabled_for_process is not None  # its status was read before it exited
    assert gone.host_huge is None and gone.counters is None
    (proc,) = [st for st in gone.statuses if st.source == "process"]
    assert proc.state is SourceState.ERROR and f"pid {GONE} exited during the sample" in proc.reason
    (e,) = [e for e in s.estimates if e.vm_id == gone.vm.vm_id]
    assert e.cause is Cause.UNKNOWN
    assert discovery(s).state is SourceState.OK  # not a discovery note: it was sampled, partly
    assert f"[error] process: pid {GONE} exited during the sample" in render_table(s)
    assert [v.vm.pid for v in s.vms] == [GONE, OTHER]


def test_missing_status_of_a_live_process_is_that_file_s_problem_not_an_exit(host: Path) -> None:
    """A tree (or kernel) without /proc/PID/status while the process is there: the VM is sampled."""
    (host / "proc" / str(GONE) / "status").unlink()
    s = Sampler(HostRoot.from_root(host), SamplerConfig(smaps_mode="full")).sample()
    (v,) = [v for v in s.vms if v.vm.pid == GONE]
    assert v.thp_enabled_for_process is None and v.host_huge is not None
    (st,) = [x for x in v.statuses if x.source == "process.status"]
    assert st.state is SourceState.UNAVAILABLE
    assert discovery(s).state is SourceState.OK


def test_state_of_a_gone_process_is_forgotten(host: Path) -> None:
    """Per-process state (smaps budgets) of a process gone before its read is not kept."""
    sampler = Sampler(HostRoot.from_root(host), SamplerConfig())
    sampler.sample()
    assert {k[0] for k in sampler.smaps._budgets} == {GONE, OTHER}
    sampler.root = racing_root(host, exits_at(host, GONE, "status"))
    sampler.process.root = sampler.root
    sampler.sample()
    assert {k[0] for k in sampler.smaps._budgets} == {OTHER}


# --- the counter chain: a new source is one class ---

@dataclass
class FakeSource:
    name: str
    result: KvmCounterValues | None
    applies: bool = True

    def read(self, vm: DiscoveredVm, host: HostFacts) -> CounterReading:
        if not self.applies:
            return CounterReading(None, ())
        state = SourceState.OK if self.result is not None else SourceState.UNAVAILABLE
        return CounterReading(self.result, (SourceStatus(self.name, state, "fake"),))

    def retain(self, live: set[tuple[int, int]]) -> None:
        pass


def test_counter_chain_first_success_wins_and_none_applying_is_named(host: Path) -> None:
    s = Sampler(HostRoot.from_root(host)).sample()
    vm, facts = s.vms[0].vm, HostFacts(None, other_mappers_matter=s.era.era is Era.COMPOUND_MAP_FIXED)
    found = KvmCountersCollector([]).collect(vm, facts)
    assert found.counters is None and [(x.source, x.state) for x in found.statuses] == [("kvm_counters.vm", SourceState.UNAVAILABLE)]
    values = KvmCounterValues(naming="pages_Nx", scope=CounterScope.QMP_QUERY_STATS, pages_2m=7)
    chain = KvmCountersCollector([FakeSource("a", None), FakeSource("b", None, applies=False), FakeSource("c", values), FakeSource("d", None)])
    got = chain.collect(vm, facts)
    assert got.counters == values and [x.source for x in got.statuses] == ["a", "c"]  # "b" did not apply, "d" not asked


def test_a_new_counter_source_plugs_into_the_sampler(host: Path) -> None:
    """Without debugfs the fixture's VMs have no per-VM counters; a source added to the chain gives them."""
    shutil.rmtree(host / "sys" / "kernel" / "debug" / "kvm")
    sampler = Sampler(HostRoot.from_root(host))
    assert all(v.counters is None for v in sampler.sample().vms)
    values = KvmCounterValues(naming="pages_Nx", scope=CounterScope.QMP_QUERY_STATS, pages_2m=0, pages_4k=1)
    sampler.kvm_counters.sources += (FakeSource("kvm_new", values),)
    s = sampler.sample()
    assert [v.counters for v in s.vms] == [values, values]
    assert all(any(x.source == "kvm_new" for x in v.statuses) for v in s.vms)
