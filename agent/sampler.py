"""One sample of a host: run every collector, isolate their failures, evaluate the model.

The pipeline is discover -> per VM (smaps, counters, process THP) -> model. Each source's outcome is a
`SourceStatus`; a failed source leaves its numbers unknown (None), never zero.

Reading smaps walks QEMU's page tables under its mmap lock, stalling the guest's faults, so the
sampler keeps an adaptive per-process budget: a full smaps read over budget switches that process to
smaps_rollup, a rollup over budget makes it skip intervals (reusing the last sample), and both say so.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from . import kvm_binary_stats, kvm_qmp
from .bounds import MAX_BYTES, MAX_PID, MAX_U64, small_decimal
from .discovery import DiscoveredVm, discover_vms, parse_stat, parse_status_thp_enabled
from .guest_ram import DEFAULT_GUEST_RAM_MIN_BYTES, Backing, GuestRamMapping, attribute_guest_ram, on_internal_shm_mount
from .hostroot import HostReadError, HostRoot
from .kernel import KernelIdentity, read_kernel_identity
from .kvm_debugfs import CounterScope, KvmCounterValues, debugfs_kvm_dir, list_vm_dirs, read_counters
from .model import Era, EraDecision, EraOverride, Estimate, HostHuge, ModelConfig, VmInputs, era_for, estimate_vm
from .smaps import LargeVmaScanner, Vma, parse_smaps_rollup
from .status import ParseError, SourceState, SourceStatus
from .thp import Mount, ThpSettings, mount_for_path, parse_mountinfo, read_thp_settings

SMAPS_FULL, SMAPS_ROLLUP, SMAPS_REUSED = "full", "rollup", "reused"


@dataclass(frozen=True)
class SamplerConfig:
    guest_ram_min_bytes: int = DEFAULT_GUEST_RAM_MIN_BYTES
    # CPU seconds one process's smaps read may cost before the sampler backs off for that process.
    smaps_budget_seconds: float = 0.25
    smaps_mode: str = "auto"  # auto | full | rollup
    # After backing off to rollup, try full smaps again this often (intervals).
    full_retry_intervals: int = 10
    # Longest run of intervals a too-expensive process is skipped for.
    max_skip_intervals: int = 8
    scan_vm_fds: bool = True
    use_binary_stats: bool = True
    # Last resort for per-VM counters (live host only): QEMU's QMP query-stats over a monitor socket
    # named on its command line. A busy monitor costs up to qmp_timeout_seconds per VM and sample.
    use_qmp: bool = True
    qmp_timeout_seconds: float = kvm_qmp.DEFAULT_TIMEOUT_SECONDS
    # After a failed QMP attempt, leave that VM's monitors alone for 1, 2, 4, ... intervals, at most this
    # many (0: ask every interval); a success resets it (kvm_qmp.QmpBackoff).
    qmp_backoff_max_intervals: int = kvm_qmp.DEFAULT_BACKOFF_MAX_INTERVALS
    check_other_mappers: bool = True
    host_id: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    era_overrides: tuple[EraOverride, ...] = ()


@dataclass(frozen=True)
class VmSample:
    vm: DiscoveredVm
    smaps_mode: str
    smaps_cost_seconds: float | None
    mappings: tuple[GuestRamMapping, ...]
    host_huge: HostHuge | None
    whole_process: bool
    counters: KvmCounterValues | None
    thp_enabled_for_process: bool | None
    statuses: tuple[SourceStatus, ...]

    @property
    def guest_ram_bytes(self) -> int:
        return sum(m.size_bytes for m in self.mappings)


@dataclass(frozen=True)
class HostSample:
    host_id: str
    sample_time: float
    kernel: KernelIdentity | None
    era: EraDecision
    thp: ThpSettings
    vms: tuple[VmSample, ...]
    estimates: tuple[Estimate, ...]
    global_counters: KvmCounterValues | None
    host_estimate: Estimate | None
    statuses: tuple[SourceStatus, ...]
    # Wall seconds each collector took in this sample, summed over VMs (node_exporter's
    # scrape_collector_duration_seconds): kernel, thp, kvm_debugfs, discovery, smaps, kvm_counters, process.
    collector_seconds: tuple[tuple[str, float], ...] = ()


@dataclass
class _Budget:
    mode: str = SMAPS_FULL
    skip_left: int = 0
    since_full: int = 0
    last: VmSample | None = None
    qmp: kvm_qmp.QmpBackoff = field(default_factory=kvm_qmp.QmpBackoff)


def _status_from_read_error(source: str, exc: HostReadError) -> SourceStatus:
    state = SourceState.UNAVAILABLE if exc.kind == "absent" else SourceState.ERROR
    return SourceStatus(source, state, str(exc), str(exc.path))


class Sampler:
    def __init__(self, root: HostRoot, config: SamplerConfig = SamplerConfig(), clock: Callable[[], float] = time.time) -> None:
        self.root = root
        self.config = config
        self.clock = clock
        self._budgets: dict[tuple[int, int], _Budget] = {}
        self._timings: dict[str, float] = {}
        self._file_mapper_index: dict[tuple[str, int], set[int]] | None = None
        # Full smaps streams through one reused scanner and its small buffer (see _scan_smaps).
        self._smaps_scanner = LargeVmaScanner()

    @contextmanager
    def _timed(self, collector: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._timings[collector] = self._timings.get(collector, 0.0) + time.perf_counter() - t0

    # --- host-level sources ---

    def _host_id(self) -> str:
        if self.config.host_id:
            return self.config.host_id
        try:
            return self.root.read_text(self.root.proc("sys", "kernel", "hostname"), limit=256).strip() or "unknown"
        except HostReadError:
            return "unknown"

    def sample(self) -> HostSample:
        statuses: list[SourceStatus] = []
        self._timings = {}
        self._file_mapper_index = None  # rebuilt lazily, once per sample
        with self._timed("kernel"):
            kernel, kstatus = read_kernel_identity(self.root)
        statuses.append(kstatus)
        era = (
            era_for(kernel.release, kernel.machine, self.config.era_overrides)
            if kernel is not None
            else EraDecision(Era.UNKNOWN, "kernel release unreadable")
        )
        with self._timed("thp"):
            thp, thp_statuses = read_thp_settings(self.root)
        statuses.extend(thp_statuses)
        global_counters: KvmCounterValues | None = None
        vm_dirs: list[tuple[int, int]] = []
        with self._timed("kvm_debugfs"):
            kvm_dir, dstatus = debugfs_kvm_dir(self.root)
            statuses.append(dstatus)
            if kvm_dir is not None:
                global_counters, gstatus = read_counters(self.root, kvm_dir, CounterScope.GLOBAL_DEBUGFS, "kvm_debugfs.global")
                statuses.append(gstatus)
                vm_dirs = list_vm_dirs(self.root, kvm_dir)
        with self._timed("discovery"):
            vms, notes = discover_vms(self.root, vm_dirs, scan_fds=self.config.scan_vm_fds)
        statuses.append(SourceStatus("discovery", SourceState.PARTIAL if notes else SourceState.OK, "; ".join(notes)))

        samples: list[VmSample] = []
        for vm in vms:
            try:
                samples.append(self._sample_vm(vm, kvm_dir, era.era))
            except Exception as exc:  # noqa: BLE001 - one VM's bad input must not silence the host
                # Every parser raises ParseError/HostReadError, handled per source below; anything else
                # is a defect met on this VM's input: it is dropped and named, the others still sampled.
                notes.append(f"pid {vm.pid}: dropped: {type(exc).__name__}: {str(exc)[:200]}")
        statuses = [s if s.source != "discovery" else SourceStatus("discovery", SourceState.PARTIAL if notes else SourceState.OK, "; ".join(notes))
                    for s in statuses]
        live_keys = {(s.vm.pid, s.vm.start_time_ticks) for s in samples}
        for key in list(self._budgets):
            if key not in live_keys:
                del self._budgets[key]  # exited or pid reused: its history no longer applies

        samples = self._fill_global_counters(samples, global_counters)
        estimates = tuple(
            estimate_vm(
                VmInputs(
                    vm_id=s.vm.vm_id,
                    host_huge=s.host_huge,
                    mappings=s.mappings,
                    whole_process=s.whole_process,
                    counters=s.counters,
                    counter_scope=s.counters.scope if s.counters else None,
                    thp_enabled_for_process=s.thp_enabled_for_process,
                    extra_uncertainty=(("smaps not re-read this interval (over budget): previous sample reused",) if s.smaps_mode == SMAPS_REUSED else ()),
                ),
                era.era,
                thp,
                self.config.model,
            )
            for s in samples
        )
        host_estimate = self._host_estimate(samples, global_counters, era.era, thp)
        return HostSample(self._host_id(), self.clock(), kernel, era, thp, tuple(samples), estimates, global_counters, host_estimate,
                          tuple(statuses), collector_seconds=tuple(sorted(self._timings.items())))

    def _fill_global_counters(self, samples: list[VmSample], global_counters: KvmCounterValues | None) -> list[VmSample]:
        # With a single VM on the host, the host-wide counter is that VM's.
        if global_counters is None or len(samples) != 1 or samples[0].counters is not None:
            return samples
        s = samples[0]
        return [replace(s, counters=global_counters)]

    def _host_estimate(self, samples: list[VmSample], global_counters: KvmCounterValues | None, era: Era, thp: ThpSettings) -> Estimate | None:
        """Several VMs without per-VM counters: judge the host as a whole against the global counter."""
        if global_counters is None or len(samples) < 2 or all(s.counters is not None for s in samples):
            return None
        huge = [s.host_huge for s in samples]
        total: HostHuge | None = None
        if all(h is not None for h in huge):
            total = huge[0]
            for h in huge[1:]:
                total = total + h  # type: ignore[operator]
        return estimate_vm(
            VmInputs(vm_id="host", host_huge=total, counters=global_counters, counter_scope=CounterScope.GLOBAL_DEBUGFS,
                     extra_uncertainty=("host-wide counter compared with the sum over all VMs",)),
            era, thp, self.config.model,
        )

    # --- per-VM sources ---

    def _sample_vm(self, vm: DiscoveredVm, kvm_dir: Path | None, era: Era) -> VmSample:
        statuses: list[SourceStatus] = []
        key = (vm.pid, vm.start_time_ticks)
        budget = self._budgets.get(key)
        if budget is None:
            budget = self._budgets[key] = _Budget(qmp=kvm_qmp.QmpBackoff(self.config.qmp_backoff_max_intervals))
        with self._timed("kvm_counters"):
            counters = self._read_vm_counters(vm, kvm_dir, statuses, budget.qmp)
        with self._timed("process"):
            thp_enabled = self._read_thp_enabled(vm, statuses)

        if budget.skip_left > 0 and budget.last is not None:
            budget.skip_left -= 1
            statuses.append(SourceStatus("smaps", SourceState.OK, f"over budget: reusing the previous sample ({budget.skip_left} more interval(s) to skip)"))
            return replace(budget.last, smaps_mode=SMAPS_REUSED, counters=counters, thp_enabled_for_process=thp_enabled, statuses=tuple(statuses), vm=vm)

        mode = self.config.smaps_mode if self.config.smaps_mode != "auto" else budget.mode
        if mode == SMAPS_ROLLUP and self.config.smaps_mode == "auto" and budget.since_full >= self.config.full_retry_intervals:
            mode = SMAPS_FULL
        host_huge: HostHuge | None = None
        mappings: tuple[GuestRamMapping, ...] = ()
        whole_process = False
        cost: float | None = None
        t0 = time.thread_time()
        wall0 = time.perf_counter()
        if mode == SMAPS_ROLLUP:
            host_huge, read_ok = self._read_rollup(vm, statuses)
            whole_process = host_huge is not None
            if not read_ok:  # kernel before 4.14: no smaps_rollup, full smaps is all there is
                mode = SMAPS_FULL
        if mode == SMAPS_FULL:
            mappings_list = self._read_full(vm, era, statuses)
            if mappings_list is not None:
                mappings = tuple(mappings_list)
                host_huge = HostHuge.from_mappings(mappings)
        cost = time.thread_time() - t0
        self._timings["smaps"] = self._timings.get("smaps", 0.0) + time.perf_counter() - wall0

        with self._timed("process"):
            same = self._same_process(vm, statuses)
        if not same:
            host_huge, mappings, whole_process, counters = None, (), False, None

        self._adapt(budget, mode, cost, statuses)
        sample = VmSample(vm, mode, cost, mappings, host_huge, whole_process, counters, thp_enabled, tuple(statuses))
        budget.last = sample
        return sample

    def _adapt(self, budget: _Budget, mode: str, cost: float, statuses: list[SourceStatus]) -> None:
        limit = self.config.smaps_budget_seconds
        if self.config.smaps_mode != "auto":
            return
        if mode == SMAPS_FULL:
            budget.since_full = 0
            if cost > limit:
                budget.mode = SMAPS_ROLLUP
                statuses.append(SourceStatus("smaps.budget", SourceState.OK, f"full smaps cost {cost:.3f} s CPU > budget {limit:.3f} s: using smaps_rollup next"))
            else:
                budget.mode = SMAPS_FULL
        else:
            budget.since_full += 1
            if cost > limit:
                budget.skip_left = min(self.config.max_skip_intervals, math.ceil(cost / limit) - 1) if limit > 0 else self.config.max_skip_intervals
                statuses.append(SourceStatus("smaps.budget", SourceState.OK, f"smaps_rollup cost {cost:.3f} s CPU > budget {limit:.3f} s: skipping {budget.skip_left} interval(s)"))

    def _same_process(self, vm: DiscoveredVm, statuses: list[SourceStatus]) -> bool:
        path = self.root.proc(vm.pid, "stat")
        try:
            _, start = parse_stat(self.root.read_text(path, limit=4096), str(path))
        except (HostReadError, ParseError) as exc:
            statuses.append(SourceStatus("process", SourceState.ERROR, f"pid {vm.pid} exited during the sample: {exc}", str(path)))
            return False
        if start != vm.start_time_ticks:
            statuses.append(SourceStatus("process", SourceState.ERROR, f"pid {vm.pid} was reused during the sample (start time {vm.start_time_ticks} -> {start}): discarded", str(path)))
            return False
        return True

    def _read_thp_enabled(self, vm: DiscoveredVm, statuses: list[SourceStatus]) -> bool | None:
        try:
            return parse_status_thp_enabled(self.root.read_text(self.root.proc(vm.pid, "status"), limit=65536))
        except HostReadError as exc:
            statuses.append(_status_from_read_error("process.status", exc))
            return None

    def _read_rollup(self, vm: DiscoveredVm, statuses: list[SourceStatus]) -> tuple[HostHuge | None, bool]:
        path = self.root.proc(vm.pid, "smaps_rollup")
        try:
            r = parse_smaps_rollup(self.root.read_text(path), str(path))
        except HostReadError as exc:
            if exc.kind == "absent":
                return None, False
            statuses.append(_status_from_read_error("smaps", exc))
            return None, True
        except ParseError as exc:
            statuses.append(SourceStatus("smaps", SourceState.ERROR, str(exc), str(path)))
            return None, True
        statuses.append(SourceStatus("smaps", SourceState.OK, "smaps_rollup: whole-process totals", str(path)))
        huge = HostHuge(
            anon_thp_2m=(r.anon_huge_bytes or 0) >> 21,
            shmem_thp_2m=(r.shmem_pmd_mapped_bytes or 0) >> 21,
            file_thp_2m=(r.file_pmd_mapped_bytes or 0) >> 21,
            hugetlb_2m=r.hugetlb_bytes >> 21,
            hugetlb_1g_bytes=0,
            resident_bytes=(r.rss_bytes or 0) + r.hugetlb_bytes,
        )
        return huge, True

    def _read_full(self, vm: DiscoveredVm, era: Era, statuses: list[SourceStatus]) -> list[GuestRamMapping] | None:
        path = self.root.proc(vm.pid, "smaps")
        try:
            vmas = self._scan_smaps(path)
        except HostReadError as exc:
            statuses.append(_status_from_read_error("smaps", exc))
            return None
        except ParseError as exc:
            statuses.append(SourceStatus("smaps", SourceState.ERROR, str(exc), str(path)))
            return None
        mounts = self._mounts(vm, statuses)

        def fstype(p: str) -> str | None:
            m = mount_for_path(mounts, p) if mounts else None
            return m.fstype if m is not None else None

        mappings = attribute_guest_ram(vmas, fstype, self.config.guest_ram_min_bytes)
        guest_ram_bytes = sum(m.size_bytes for m in mappings)
        if guest_ram_bytes > MAX_BYTES:
            # Each field is bounded by the parser; their sum can still be no machine's memory.
            statuses.append(SourceStatus("smaps", SourceState.ERROR,
                                         f"guest RAM mappings total {guest_ram_bytes} bytes, above {MAX_BYTES}: implausible, not used", str(path)))
            return None
        mappings = [self._with_tmpfs_huge(m, mounts) for m in mappings]
        if self.config.check_other_mappers and era is Era.COMPOUND_MAP_FIXED:
            mappings = self._with_other_mappers(vm.pid, mappings)
        statuses.append(SourceStatus("smaps", SourceState.OK, f"{len(mappings)} guest-RAM mapping(s)", str(path)))
        return mappings

    def _scan_smaps(self, path: Path) -> list[Vma]:
        """The VMAs of one process's smaps big enough to be guest RAM, each parsed strictly (see
        smaps.scan_large_vmas). Raises HostReadError or ParseError.

        The file (megabytes for a big QEMU) is read in chunks into the scanner's small reused buffer and
        each chunk is scanned while it is in cache; the file is never held whole. bench/smaps_cost.py
        measures this function against `cat`."""
        self._smaps_scanner.start(str(path), self.config.guest_ram_min_bytes)
        self.root.read_bytes(path, into=self._smaps_scanner)
        return self._smaps_scanner.finish()

    def _mounts(self, vm: DiscoveredVm, statuses: list[SourceStatus]) -> list[Mount]:
        path = self.root.proc(vm.pid, "mountinfo")
        try:
            return parse_mountinfo(self.root.read_text(path, limit=16 * 1024 * 1024), str(path))
        except HostReadError as exc:
            statuses.append(_status_from_read_error("mountinfo", exc))
        except ParseError as exc:
            statuses.append(SourceStatus("mountinfo", SourceState.ERROR, str(exc), str(path)))
        return []

    @staticmethod
    def _with_tmpfs_huge(m: GuestRamMapping, mounts: list[Mount]) -> GuestRamMapping:
        # /dev/zero and SysV segments live on the kernel's internal shm mount, whose policy is
        # shmem_enabled: the tmpfs mounted at /dev (containers) says nothing about them.
        if m.backing is not Backing.SHMEM or not m.path.startswith("/") or on_internal_shm_mount(m):
            return m
        mount = mount_for_path(mounts, m.path)
        if mount is None or mount.fstype != "tmpfs":
            return m
        return replace(m, tmpfs_huge=mount.option("huge") or "never")  # tmpfs default is huge=never

    def _file_mappers(self) -> dict[tuple[str, int], set[int]]:
        """(dev, inode) -> pids mapping that file, from every process's /proc/PID/maps; read at most
        once per sample however many VMs ask (maps does not walk page tables: cheap next to smaps)."""
        if self._file_mapper_index is not None:
            return self._file_mapper_index
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
        self._file_mapper_index = index
        return index

    def _with_other_mappers(self, pid: int, mappings: list[GuestRamMapping]) -> list[GuestRamMapping]:
        """Other processes mapping the same guest-RAM file make 169226f7e0's predicate say "small"."""
        wanted = {(m.dev, m.inode) for m in mappings if m.backing in (Backing.SHMEM, Backing.MEMFD, Backing.FILE) and m.inode}
        if not wanted:
            return mappings
        index = self._file_mappers()
        found = {k: index.get(k, set()) - {pid} for k in wanted}
        return [replace(m, other_mapper_pids=tuple(sorted(found.get((m.dev, m.inode), ())))) if (m.dev, m.inode) in found else m for m in mappings]

    def _read_vm_counters(self, vm: DiscoveredVm, kvm_dir: Path | None, statuses: list[SourceStatus],
                          qmp_backoff: kvm_qmp.QmpBackoff | None = None) -> KvmCounterValues | None:
        problems: list[str] = []
        if kvm_dir is not None:
            for fd in vm.vm_fds:
                d = kvm_dir / f"{vm.pid}-{fd}"
                if not self.root.exists(d):
                    continue
                counters, st = read_counters(self.root, d, CounterScope.PER_VM_DEBUGFS, "kvm_debugfs.vm")
                statuses.append(st)
                if counters is not None:
                    return counters
                problems.append(st.reason)
        if self.config.use_binary_stats and self.root.is_live and vm.vm_fds:
            fd = vm.vm_fds[0]
            try:
                stats = kvm_binary_stats.read_vm_binary_stats(vm.pid, fd)
            except (kvm_binary_stats.KvmStatsUnavailable, kvm_binary_stats.KvmStatsFormatError) as exc:
                statuses.append(SourceStatus("kvm_binary_stats", SourceState.UNAVAILABLE, f"pid {vm.pid} fd {fd}: {exc}"))
            else:
                values = kvm_binary_stats.to_counters(stats)
                lpages = stats.scalar("lpages")  # 5.14 only: 2 MiB and 1 GiB mappings together
                counters = KvmCounterValues(
                    naming="pages_Nx" if values.get("pages_2m") is not None else "lpages",
                    scope=CounterScope.BINARY_STATS, path=f"pid {vm.pid} fd {fd}", large_pages=lpages, **values,
                )
                if counters.has_huge_count:
                    statuses.append(SourceStatus("kvm_binary_stats", SourceState.OK, f"pid {vm.pid} fd {fd}"))
                    return counters
                statuses.append(SourceStatus("kvm_binary_stats", SourceState.UNAVAILABLE, f"pid {vm.pid} fd {fd}: no pages_2m or lpages stat"))
        if self.config.use_qmp and self.root.is_live and vm.identity.is_qemu:
            # KVM refuses KVM_GET_STATS_FD on a VM fd from outside QEMU; QEMU itself can read it for us.
            # A monitor that failed (busy, unreachable) is left alone for a growing number of intervals.
            backoff = qmp_backoff if qmp_backoff is not None else kvm_qmp.QmpBackoff(0)
            if backoff.skip():
                statuses.append(SourceStatus("kvm_qmp", SourceState.UNAVAILABLE, backoff.skip_note()))
            else:
                try:
                    counters, notes = kvm_qmp.read_qmp_counters(self.root, vm.pid, self.config.qmp_timeout_seconds)
                except kvm_qmp.QmpUnavailable as exc:
                    backoff.failed(str(exc))
                    why = "; ".join(x for x in (str(exc), backoff.failure_note()) if x)
                    statuses.append(SourceStatus("kvm_qmp", SourceState.UNAVAILABLE, why))
                else:
                    backoff.succeeded()
                    statuses.append(SourceStatus("kvm_qmp", SourceState.OK, "; ".join(notes), counters.path))
                    return counters
        if not any(s.source.startswith(("kvm_debugfs.vm", "kvm_binary_stats", "kvm_qmp")) for s in statuses):
            why = "; ".join(problems) or "no per-VM counters (no per-VM debugfs directory, no readable VM fd)"
            statuses.append(SourceStatus("kvm_counters.vm", SourceState.UNAVAILABLE, why))
        return None
