"""Issue 6, case 6 — streamed: the agent daemon reports the VM to a real aggregator on loopback; the
aggregator's API shows the same numbers.

One real VM (guest RAM in a file on tmpfs huge=always, align=2M), one real aggregator process
(``eptwatch-server --insecure-plaintext --insecure-no-auth`` on free loopback ports, state in tmp) and
one real agent daemon process (``eptwatch-agent run --interval 1`` on the live host: no --root). The test
reads the kernel's numbers itself, without the agent's code — the guest-RAM VMA's smaps (qemu_vm.read_smaps)
and the VM's debugfs ``kvm/<pid>-<fd>/`` — and checks that the aggregator's ``/api/v1/hosts/e2e-host``
(latest report and summary), its ``/api/v1/fleet`` totals and the agent's own ``/metrics`` say the same.

The guest idles in ``hlt`` once it has touched its RAM, so the numbers are stable; each comparison still
reads the kernel before and after and waits for a report sampled in between (``_settled``).

Other test sessions may run VMs on this host: the agent reports them too, so everything about "our" VM
is looked up by QEMU's pid, and host/fleet totals are compared with the sum over the report's VMs.
Everything started here (QEMU, aggregator, agent) is stopped by its pid, also when the test fails; the
processes also get PR_SET_PDEATHSIG=SIGKILL so they cannot outlive a killed test run.

Skips (with the reason) without /dev/kvm, QEMU, binutils or root, or with EPTWATCH_SKIP_E2E=1.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ..procs import env_without_proxy, free_port, http_fetch
from .qemu_vm import (
    QemuVm,
    SmapsVma,
    ensure_debugfs,
    mounted_tmpfs,
    read_kvm_page_counts,
    real_vm_skip_reason,
)

MEM_MIB = 512
TMPFS_SIZE = "600M"
TOUCH_TIMEOUT = 90.0
VM_NAME = "e2e-streamed"
HOST_ID = "e2e-host"
TWO_MIB = 2 << 20
PMDS_PER_1G = 512
BIN = Path(sys.executable).parent
# Until the aggregator shows the VM: agent start (~1-2 s of imports), first sample, stream setup.
REPORT_TIMEOUT = 60.0
# A report whose sample_time (taken when the sample ends) is this long after the kernel was read was
# sampled after it: one sample takes well under this (the agent's /metrics sample duration is checked).
SAMPLED_AFTER_MARGIN = 2.0


def _skip_reason() -> str | None:
    reason = real_vm_skip_reason("tmpfs mounts, debugfs, other processes' smaps and fds")
    if reason is not None:
        return reason
    for exe in ("eptwatch-server", "eptwatch-agent"):
        if not (BIN / exe).exists():
            return f"{BIN / exe} is not installed (pip install -e .)"
    return None


_REASON = _skip_reason()
pytestmark = [pytest.mark.kvm, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]


# --- processes and HTTP ---------------------------------------------------------------------------------


def _get_json(url: str) -> Any:
    status, body = http_fetch(url)
    assert status == 200, f"{url}: HTTP {status}: {body[:300]!r}"
    return json.loads(body)


def _die_with_us() -> None:
    # PR_SET_PDEATHSIG(SIGKILL): the child cannot outlive the test process, even if that is SIGKILLed.
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)


@dataclass
class Started:
    """A process this test started; stopped by its pid only."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @classmethod
    def start(cls, name: str, args: list[str], log: Path) -> Started:
        with open(log, "ab") as fh:
            popen = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT, env=env_without_proxy(),
                                     preexec_fn=_die_with_us, close_fds=True)
        return cls(name, popen, log)

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.popen.returncode}:\n{self.output()[-3000:]}")

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM (both drain and exit 0 on it), SIGKILL by pid after ``timeout``; always reaped."""
        p = self.popen
        try:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(p.pid, signal.SIGKILL)
        finally:
            if p.poll() is None:  # e.g. KeyboardInterrupt while waiting
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
            p.wait()
        return p.returncode


def _wait(what: str, cond: Callable[[], Any], timeout: float, procs: tuple[Started, ...] = ()) -> Any:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        for p in procs:
            p.check_alive()
        try:
            got = cond()
        except (OSError, ValueError, KeyError) as exc:  # not up yet
            got, last = None, exc
        if got:
            return got
        time.sleep(0.1)
    logs = "".join(f"\n--- {p.name} log:\n{p.output()[-2000:]}" for p in procs)
    raise TimeoutError(f"{what}: not within {timeout} s (last error: {last}){logs}")


# --- what the kernel says ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Truth:
    vma: SmapsVma
    counts: dict[str, int]  # debugfs pages_4k/pages_2m/pages_1g of this VM
    nx_lpage_splits: int | None  # debugfs, where readable
    start_time_ticks: int  # /proc/PID/stat field 22

    @property
    def key(self) -> tuple[int, ...]:
        f = self.vma.fields
        return (self.vma.start, self.vma.end, f.get("Rss", 0), f.get("ShmemPmdMapped", 0), f.get("AnonHugePages", 0),
                f.get("FilePmdMapped", 0), *(self.counts.get(k, -1) for k in ("pages_4k", "pages_2m", "pages_1g")),
                -1 if self.nx_lpage_splits is None else self.nx_lpage_splits)

    @property
    def capacity_2m(self) -> int:
        return self.vma.fields["ShmemPmdMapped"] * 1024 // TWO_MIB  # smaps is in kB

    @property
    def observed_2m(self) -> int:
        return self.counts["pages_2m"] + PMDS_PER_1G * self.counts.get("pages_1g", 0)


def _truth(vm: QemuVm) -> Truth:
    d = vm.debugfs_dir()
    assert d is not None, f"no debugfs kvm/{vm.pid}-<fd> directory"
    nx: int | None
    try:
        nx = int((d / "nx_lpage_splits").read_text().strip())
    except (OSError, ValueError):
        nx = None
    stat = Path(f"/proc/{vm.pid}/stat").read_text()
    start = int(stat[stat.rindex(")") + 2 :].split()[19])
    return Truth(vm.ram_vma(), read_kvm_page_counts(d), nx, start)


def _ts(value: str) -> float:
    """A proto3 JSON Timestamp ("2025-01-02T03:04:05.123456Z") as Unix seconds."""
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def _only(items: list[dict[str, Any]], **match: Any) -> dict[str, Any]:
    found = [i for i in items if all(i.get(k) == v for k, v in match.items())]
    assert len(found) == 1, f"{match}: {len(found)} matches in {[{k: i.get(k) for k in match} for i in items]}"
    return found[0]


# --- the setup: VM, aggregator, agent ---------------------------------------------------------------------


@dataclass
class Streamed:
    vm: QemuVm
    aggregator: Started
    agent: Started
    api: str  # http://127.0.0.1:PORT of the aggregator
    agent_http: str  # http://127.0.0.1:PORT of the agent's /metrics
    boot_seconds: float
    first_report_seconds: float  # agent start -> the aggregator's API shows the VM

    def host(self) -> dict[str, Any]:
        got: dict[str, Any] = _get_json(f"{self.api}/api/v1/hosts/{HOST_ID}")
        return got

    def fleet(self) -> dict[str, Any]:
        got: dict[str, Any] = _get_json(f"{self.api}/api/v1/fleet")
        return got

    def shows_vm(self, detail: dict[str, Any]) -> dict[str, Any] | None:
        vms = [v for v in detail.get("latest_report", {}).get("vms", []) if v.get("pid") == self.vm.pid]
        return vms[0] if vms else None

    def settled(self) -> tuple[Truth, dict[str, Any]]:
        """The kernel's numbers and a host detail whose report was sampled after they were read and
        before they were read again, unchanged."""
        for _attempt in range(3):
            before = _truth(self.vm)
            t0 = time.time()

            def sampled_after() -> dict[str, Any] | None:
                d = self.host()
                rep = d.get("latest_report", {})
                if self.shows_vm(d) is not None and _ts(rep["sample_time"]) >= t0 + SAMPLED_AFTER_MARGIN:
                    return d
                return None

            detail: dict[str, Any] = _wait("a report sampled after the kernel was read", sampled_after, 30.0,
                                           (self.agent, self.aggregator))
            after = _truth(self.vm)
            if before.key == after.key:
                return after, detail
            time.sleep(0.5)
        raise AssertionError(f"the kernel's numbers kept moving: {before.key} -> {after.key}")


@pytest.fixture(scope="class")
def streamed(guest_elf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Streamed]:
    if not ensure_debugfs():
        pytest.skip("KVM debugfs (/sys/kernel/debug/kvm) not available: nothing independent to compare with")
    tmp = tmp_path_factory.mktemp("streamed")
    with ExitStack() as stack:
        # VM first (its boot is the slow part and is not disturbed by the agent's sampling).
        mnt = stack.enter_context(mounted_tmpfs(tmp, huge="always", size=TMPFS_SIZE))
        t0 = time.monotonic()
        vm = stack.enter_context(QemuVm(guest_elf, name=VM_NAME, memory_mib=MEM_MIB, backend="file",
                                        mem_path=mnt.path / "guest.ram", workdir=tmp))
        vm.wait_touched(timeout=TOUCH_TIMEOUT)
        vm.wait_ready(timeout=TOUCH_TIMEOUT)
        boot_seconds = time.monotonic() - t0

        grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
        agg = Started.start("aggregator", [
            str(BIN / "eptwatch-server"), "--listen", f"127.0.0.1:{grpc_port}", "--http", f"127.0.0.1:{http_port}",
            "--state", str(tmp / "state"), "--insecure-plaintext", "--insecure-no-auth",
        ], tmp / "aggregator.log")
        stack.callback(agg.stop)  # ExitStack unwinds in reverse: agent, aggregator, VM, tmpfs
        api = f"http://127.0.0.1:{http_port}"
        _wait("aggregator /readyz", lambda: http_fetch(f"{api}/readyz", 1.0)[0] == 200, 30.0, (agg,))

        cfg = tmp / "agent.yaml"
        cfg.write_text("backoff_initial_seconds: 0.1\nbackoff_max_seconds: 1\n")
        t1 = time.monotonic()
        agent = Started.start("agent", [
            str(BIN / "eptwatch-agent"), "run", "--server", f"127.0.0.1:{grpc_port}", "--insecure-plaintext",
            "--interval", "1", "--spool", str(tmp / "spool" / "agent.sqlite3"),
            "--metrics-listen", f"127.0.0.1:{metrics_port}", "--host-id", HOST_ID, "--config", str(cfg),
        ], tmp / "agent.log")
        stack.callback(agent.stop)
        s = Streamed(vm, agg, agent, api, f"http://127.0.0.1:{metrics_port}", boot_seconds, 0.0)

        def shows() -> bool:
            status, body = http_fetch(f"{api}/api/v1/hosts/{HOST_ID}", 2.0)
            return status == 200 and s.shows_vm(json.loads(body)) is not None

        _wait(f"/api/v1/hosts/{HOST_ID} showing QEMU pid {vm.pid}", shows, REPORT_TIMEOUT, (agent, agg))
        s.first_report_seconds = time.monotonic() - t1
        print(f"\n[case 6 streamed] boot+touch {boot_seconds:.1f}s, agent start -> VM in the aggregator's API "
              f"{s.first_report_seconds:.2f}s")
        yield s
        # Clean shutdown is part of the contract (SIGTERM: flush, exit 0); the ExitStack stops them anyway.
        assert agent.stop() == 0, agent.output()[-2000:]
        assert agg.stop() == 0, agg.output()[-2000:]


# --- the tests --------------------------------------------------------------------------------------------


class TestStreamed:
    def test_latest_report_vm_entry_equals_the_kernels_numbers(self, streamed: Streamed) -> None:
        truth, detail = streamed.settled()
        rep = detail["latest_report"]
        assert rep["host_id"] == HOST_ID
        v = streamed.shows_vm(detail)
        assert v is not None
        vm = streamed.vm
        assert (v["pid"], v["name"], v["uuid"], v["vm_id"]) == (vm.pid, VM_NAME, vm.uuid, vm.uuid)
        assert v["pid_start_time_ticks"] == str(truth.start_time_ticks)  # proto3 JSON: 64-bit integers are strings
        assert v["guest_ram_bytes"] == str(MEM_MIB << 20)
        (g,) = v["guest_ram"]
        f = truth.vma.fields
        assert (g["start"], g["end"], g["path"]) == (str(truth.vma.start), str(truth.vma.end), str(vm.mem_path))
        assert g["backing"] == "BACKING_KIND_SHMEM" and g["tmpfs_huge"] == "always" and g["pmd_aligned"] is True
        assert g["size_bytes"] == str(MEM_MIB << 20)
        assert g["rss_bytes"] == str(f["Rss"] * 1024)
        assert g["shmem_pmd_mapped_bytes"] == str(f["ShmemPmdMapped"] * 1024)
        assert g["anon_huge_bytes"] == str(f.get("AnonHugePages", 0) * 1024)
        k = v["kvm"]
        d = vm.debugfs_dir()
        assert d is not None
        assert k["scope"] == "COUNTER_SCOPE_PER_VM_DEBUGFS" and k["path"] == str(d) and k["naming"] == "pages_Nx"
        assert {n: k.get(n) for n in ("pages_4k", "pages_2m", "pages_1g")} == {n: str(c) for n, c in truth.counts.items()}
        if truth.nx_lpage_splits is not None:
            assert k["nx_lpage_splits"] == str(truth.nx_lpage_splits)
        src = _only(v["sources"], source="kvm_debugfs.vm")
        assert src["state"] in ("SOURCE_STATE_OK", "SOURCE_STATE_PARTIAL") and src["path"] == str(d)
        print(f"\n[case 6 report] pid={vm.pid} seq={rep['sequence']} ShmemPmdMapped={f['ShmemPmdMapped']} kB "
              f"Rss={f['Rss']} kB debugfs={truth.counts} nx_lpage_splits={truth.nx_lpage_splits}")

    def test_estimate_equals_the_kernels_numbers_and_is_healthy(self, streamed: Streamed) -> None:
        truth, detail = streamed.settled()
        v = streamed.shows_vm(detail)
        assert v is not None
        e = _only(detail["latest_report"]["estimates"], vm_id=v["vm_id"])
        cap, obs = truth.capacity_2m, truth.observed_2m
        assert cap > 200, "the guest touched ~500 MiB: most of it must be PMD-mapped"
        assert e["host_huge_capacity_2m"] == str(cap)
        assert e["observed_huge_2m"] == str(obs)
        assert e["lost_huge_2m"] == str(max(0, cap - obs))
        assert e["cause"] == "CAUSE_HEALTHY", e["explanation"]
        print(f"\n[case 6 estimate] capacity_2m={cap} observed_2m={obs} lost_2m={e['lost_huge_2m']} "
              f"allowed_2m={e.get('allowed_huge_2m')} cause={e['cause']} :: {e['explanation']}")

    def test_host_summary_and_fleet_totals_include_the_vm(self, streamed: Streamed) -> None:
        truth, _ = streamed.settled()
        # One consistent view: the summary (fleet state) and the stored latest report of the same
        # sequence, with the fleet read in between (reports arrive every second).
        for _attempt in range(50):
            d1 = streamed.host()
            fleet = streamed.fleet()
            d2 = streamed.host()
            seq = d1["summary"]["sequence"]
            if seq == d2["summary"]["sequence"] == d2["latest_report"]["sequence"]:
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"no consistent host/fleet view: {d1['summary']['sequence']} {d2['summary']['sequence']}")
        summary, rep = d2["summary"], d2["latest_report"]
        assert summary["host_id"] == HOST_ID and summary["stale"] is False
        # Our VM, as the aggregator has it
        v = streamed.shows_vm(d2)
        assert v is not None
        e = _only(rep["estimates"], vm_id=v["vm_id"])
        assert (e["host_huge_capacity_2m"], e["observed_huge_2m"]) == (str(truth.capacity_2m), str(truth.observed_2m))
        # The host summary sums every VM the agent saw (other sessions' VMs too)... (or carries the host-wide
        # estimate, should several VMs share only the global counter: not with per-VM debugfs as here)
        if "lost_huge_2m" in rep.get("host_estimate", {}):
            rows = [rep["host_estimate"]]
        else:
            rows = [x for x in rep["estimates"] if "lost_huge_2m" in x]
            assert e in rows
        sums = {k: sum(int(x[k]) for x in rows) for k in ("host_huge_capacity_2m", "observed_huge_2m", "lost_huge_2m")}
        assert int(summary["vms"]) == len(rep["estimates"]) >= 1
        assert {k: int(summary[k]) for k in sums} == sums
        assert int(summary["vms_by_cause"]["healthy"]) >= 1
        # ...and the fleet is this one host: its totals are the summary's, so they include the VM.
        total = fleet["total"]
        assert int(total["hosts"]) == 1 and int(fleet["hosts_stale"]) == 0
        assert int(total["vms"]) == int(summary["vms"])
        assert {k: int(total[k]) for k in sums} == sums
        assert int(total["host_huge_capacity_2m"]) >= truth.capacity_2m and int(total["observed_huge_2m"]) >= truth.observed_2m
        assert int(total["vms_by_cause"]["healthy"]) >= 1
        (kernel,) = fleet["kernels"]
        assert kernel["kernel_release"] == Path("/proc/sys/kernel/osrelease").read_text().strip()
        assert int(kernel["rollup"]["host_huge_capacity_2m"]) == sums["host_huge_capacity_2m"]
        print(f"\n[case 6 fleet] hosts={total['hosts']} vms={total['vms']} capacity_2m={total['host_huge_capacity_2m']} "
              f"observed_2m={total['observed_huge_2m']} lost_2m={total['lost_huge_2m']} by_cause={total['vms_by_cause']}")

    def test_agent_metrics_show_the_same_capacity(self, streamed: Streamed) -> None:
        before = _truth(streamed.vm)
        status, body = http_fetch(f"{streamed.agent_http}/metrics")
        after = _truth(streamed.vm)
        assert status == 200 and before.key == after.key
        fams = {f.name: f for f in text_string_to_metric_families(body.decode())}
        vm = streamed.vm

        def value(name: str) -> float:
            got = [s for s in fams[name].samples if s.labels.get("pid") == str(vm.pid)]
            assert len(got) == 1, (name, fams[name].samples)
            assert got[0].labels["vm_name"] == VM_NAME and got[0].labels["vm_id"] == vm.uuid
            return float(got[0].value)

        assert value("eptwatch_vm_host_huge_capacity_2m") == after.capacity_2m
        assert value("eptwatch_vm_observed_huge_2m") == after.observed_2m
        assert value("eptwatch_vm_lost_huge_2m") == max(0, after.capacity_2m - after.observed_2m)
        cause = [s for s in fams["eptwatch_vm_cause"].samples if s.labels.get("pid") == str(vm.pid)]
        assert [(s.labels["cause"], s.value) for s in cause] == [("healthy", 1.0)]
        # the stream is up and delivering
        one = {s.name: s.value for f in fams.values() for s in f.samples if not s.labels}
        assert one["eptwatch_agent_connected"] == 1.0
        assert one["eptwatch_agent_reports_acked_total"] >= 1
        duration = one["eptwatch_agent_sample_duration_seconds"]
        # settled() takes a report sampled >= SAMPLED_AFTER_MARGIN after the kernel read as sampled after it
        assert duration < SAMPLED_AFTER_MARGIN, f"a sample took {duration:.3f} s: settled()'s margin assumes less"
        print(f"\n[case 6 agent /metrics] capacity_2m={after.capacity_2m} acked={one['eptwatch_agent_reports_acked_total']:.0f} "
              f"sample_duration={duration:.3f}s")
