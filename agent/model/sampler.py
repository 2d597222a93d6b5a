"""One sample of a host: run every collector in order, isolate their failures, evaluate the model.

The collectors (agent/sources/collectors/, one file per source) read and report; this module only orders
them and runs the model: kernel -> era, thp, kvm_debugfs, discovery, then per VM kvm_counters,
process, smaps, process again (same process?), then the estimates. Each source's outcome is a
`SourceStatus`; a failed source leaves its numbers unknown (None), never zero.

A VM whose process is gone before any of its files was read is a note of discovery's, not a VM row;
one that vanished after it was partly read stays a row, with the error that says so.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from eptwatch.agent.model.predicate import (
    Era,
    EraDecision,
    EraOverride,
    Estimate,
    HostHuge,
    ModelConfig,
    VmInputs,
    era_for,
    estimate_vm,
)
from eptwatch.agent.sources import kvm_qmp
from eptwatch.agent.sources.collectors.base import HostFacts, ProcessGone, Timings, VmKey, vm_key
from eptwatch.agent.sources.collectors.discovery import DiscoveryCollector, discovery_status
from eptwatch.agent.sources.collectors.kernel import KernelCollector
from eptwatch.agent.sources.collectors.kvm_counters import KvmCountersCollector
from eptwatch.agent.sources.collectors.kvm_debugfs import KvmDebugfsCollector
from eptwatch.agent.sources.collectors.kvm_debugfs_vm import DebugfsVmCounters
from eptwatch.agent.sources.collectors.kvm_qmp import QmpCounters
from eptwatch.agent.sources.collectors.process import ProcessCollector
from eptwatch.agent.sources.collectors.smaps import (
    SMAPS_FULL,
    SMAPS_REUSED,
    SMAPS_ROLLUP,
    SmapsCollector,
    SmapsReading,
    with_tmpfs_huge,
)
from eptwatch.agent.sources.collectors.thp import ThpCollector
from eptwatch.agent.sources.discovery import DiscoveredVm
from eptwatch.agent.sources.guest_ram import DEFAULT_GUEST_RAM_MIN_BYTES, GuestRamMapping
from eptwatch.agent.sources.hostroot import HostReadError, HostRoot
from eptwatch.agent.sources.kernel import KernelIdentity
from eptwatch.agent.sources.kvm_debugfs import CounterScope, KvmCounterValues
from eptwatch.agent.sources.smaps import Vma
from eptwatch.agent.sources.status import SourceStatus
from eptwatch.agent.sources.thp import ThpSettings

__all__ = [
    "SMAPS_FULL", "SMAPS_REUSED", "SMAPS_ROLLUP", "HostSample", "Sampler", "SamplerConfig", "VmSample",
]


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


class Sampler:
    def __init__(self, root: HostRoot, config: SamplerConfig = SamplerConfig(), clock: Callable[[], float] = time.time) -> None:
        self.root = root
        self.config = config
        self.clock = clock
        self._timings = Timings()
        self.kernel = KernelCollector(root)
        self.thp = ThpCollector(root)
        self.kvm_debugfs = KvmDebugfsCollector(root)
        self.discovery = DiscoveryCollector(root, scan_fds=config.scan_vm_fds)
        # Per-VM counters: the first source in this chain that has them wins.
        self.kvm_counters = KvmCountersCollector((
            DebugfsVmCounters(root),
            QmpCounters(root, enabled=config.use_qmp, timeout_seconds=config.qmp_timeout_seconds,
                        backoff_max_intervals=config.qmp_backoff_max_intervals),
        ))
        self.process = ProcessCollector(root)
        self.smaps = SmapsCollector(
            root, smaps_mode=config.smaps_mode, guest_ram_min_bytes=config.guest_ram_min_bytes,
            budget_seconds=config.smaps_budget_seconds, full_retry_intervals=config.full_retry_intervals,
            max_skip_intervals=config.max_skip_intervals, check_other_mappers=config.check_other_mappers,
        )

    def _host_id(self) -> str:
        if self.config.host_id:
            return self.config.host_id
        try:
            return self.root.read_text(self.root.proc("sys", "kernel", "hostname"), limit=256).strip() or "unknown"
        except HostReadError:
            return "unknown"

    def sample(self) -> HostSample:
        self._timings = Timings()
        self.smaps.begin_sample()
        timed = self._timings.timed
        with timed(self.kernel.name):
            kernel = self.kernel.collect()
        era = (
            era_for(kernel.kernel.release, kernel.kernel.machine, self.config.era_overrides)
            if kernel.kernel is not None
            else EraDecision(Era.UNKNOWN, "kernel release unreadable")
        )
        with timed(self.thp.name):
            thp = self.thp.collect()
        with timed(self.kvm_debugfs.name):
            debugfs = self.kvm_debugfs.collect()
        with timed(self.discovery.name):
            found = self.discovery.collect(debugfs.vm_dirs)
        notes = list(found.notes)

        samples: list[VmSample] = []
        for vm in found.vms:
            try:
                samples.append(self._sample_vm(vm, debugfs.kvm_dir, era.era))
            except ProcessGone as gone:
                notes.append(str(gone))  # nothing of it was read: a note, not a row of unknowns
            except Exception as exc:  # noqa: BLE001 - one VM's bad input must not silence the host
                # Every parser raises ParseError/HostReadError, handled per source by the collectors;
                # anything else is a defect met on this VM's input: it is dropped and named, the others
                # still sampled.
                notes.append(f"pid {vm.pid}: dropped: {type(exc).__name__}: {str(exc)[:200]}")
        live: set[VmKey] = {vm_key(s.vm) for s in samples}
        self.kvm_counters.retain(live)
        self.smaps.retain(live)

        statuses = [*kernel.statuses, *thp.statuses, *debugfs.statuses, discovery_status(notes)]
        samples = self._fill_global_counters(samples, debugfs.global_counters)
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
                thp.settings,
                self.config.model,
            )
            for s in samples
        )
        host_estimate = self._host_estimate(samples, debugfs.global_counters, era.era, thp.settings)
        return HostSample(self._host_id(), self.clock(), kernel.kernel, era, thp.settings, tuple(samples), estimates, debugfs.global_counters,
                          host_estimate, tuple(statuses), collector_seconds=self._timings.items())

    def _sample_vm(self, vm: DiscoveredVm, kvm_dir: Path | None, era: Era) -> VmSample:
        """One VM through the per-VM collectors. Raises ProcessGone if its process is gone before
        its first read."""
        host = HostFacts(kvm_dir, other_mappers_matter=era is Era.COMPOUND_MAP_FIXED)
        timed = self._timings.timed
        with timed(self.kvm_counters.name):
            counters = self.kvm_counters.collect(vm, host)
        statuses = list(counters.statuses)
        with timed(self.process.name):
            thp_enabled = self._read_thp_enabled(vm, statuses)

        reused = self.smaps.reuse(vm)
        if reused is not None:
            return self._vm_sample(vm, reused, counters.counters, thp_enabled, [*statuses, *reused.statuses])

        with timed(self.smaps.name):
            reading = self.smaps.read(vm, host)
        with timed(self.process.name):
            same, same_statuses = self.process.same_process(vm)
        counter_values = counters.counters
        if not same:
            reading, counter_values = reading.discarded(), None
        budget_statuses = self.smaps.finish(vm, reading)
        return self._vm_sample(vm, reading, counter_values, thp_enabled, [*statuses, *reading.statuses, *same_statuses, *budget_statuses])

    def _read_thp_enabled(self, vm: DiscoveredVm, statuses: list[SourceStatus]) -> bool | None:
        """The process collector's first read of the VM's own files (raises ProcessGone)."""
        thp_enabled, got = self.process.thp_enabled(vm)
        statuses.extend(got)
        return thp_enabled

    @staticmethod
    def _vm_sample(vm: DiscoveredVm, reading: SmapsReading, counters: KvmCounterValues | None, thp_enabled: bool | None,
                   statuses: list[SourceStatus]) -> VmSample:
        return VmSample(vm, reading.mode, reading.cost_seconds, reading.mappings, reading.host_huge, reading.whole_process, counters,
                        thp_enabled, tuple(statuses))

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

    # --- kept for callers of the pre-split sampler (tests, bench/smaps_cost.py) ---

    def _scan_smaps(self, path: Path) -> list[Vma]:
        return self.smaps.scan_smaps(path)

    _with_tmpfs_huge = staticmethod(with_tmpfs_huge)
