"""The agent's local Prometheus endpoint (node_exporter style), built from the latest sample.

Per-VM gauges live here, on the agent, not on the aggregator (bounded cardinality there).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from eptwatch.agent import __version__
from eptwatch.agent.model.sampler import HostSample
from eptwatch.agent.sources.smaps import SCANNER
from eptwatch.agent.sources.status import SourceState
from eptwatch.agent.uplink.delivery import DeliveryCounters
from eptwatch.agent.uplink.spool import Spool

log = logging.getLogger("eptwatch.agent.faces.metrics")

METRICS: dict[str, str] = {
    "eptwatch_vm_host_huge_capacity_2m": "Host huge pages (2 MiB units) backing the VM's guest RAM",
    "eptwatch_vm_observed_huge_2m": "Huge EPT/NPT mappings KVM holds for the VM (2 MiB units)",
    "eptwatch_vm_lost_huge_2m": "Host huge pages KVM does not map huge (2 MiB units)",
    "eptwatch_vm_lost_ratio": "lost / capacity",
    "eptwatch_vm_cause": "1 for the VM's current cause",
    "eptwatch_agent_source_success": "1 if the source was read (ok or partial), 0 if not",
    "eptwatch_agent_sample_duration_seconds": "Wall time of the last sample",
    "eptwatch_agent_collector_duration_seconds": "Wall seconds a collector took in the last sample (summed over VMs)",
    "eptwatch_agent_collector_success": "1 if every source of the collector was read or is absent here, 0 if one failed",
    "eptwatch_agent_smaps_read_cost_seconds": "CPU seconds the last smaps read of the VM cost",
    "eptwatch_agent_samples_total": "Samples taken",
    "eptwatch_agent_sample_failures_total": "Samples that raised (a bug: the sampler reports failures as data)",
    "eptwatch_agent_spool_reports": "Reports waiting in the spool for an acknowledgement",
    "eptwatch_agent_spool_bytes": "Bytes of reports in the spool",
    "eptwatch_agent_spool_file_bytes": "Bytes the spool's files (database, WAL, shared memory) take on disk",
    "eptwatch_agent_spool_dropped_total": "Reports dropped because the spool's size or age bound or a full disk forced it",
    "eptwatch_agent_instance_restarts_total": "New agent instances started because the aggregator showed the spool was rewound",
    "eptwatch_agent_reports_sent_total": "Reports sent (resends included)",
    "eptwatch_agent_reports_acked_total": "Reports acknowledged by the aggregator",
    "eptwatch_agent_reports_rejected_total": "Reports the aggregator rejected as invalid",
    "eptwatch_agent_reconnects_total": "Streams re-established after an error or rotation",
    "eptwatch_agent_connected": "1 while a stream to the aggregator is up",
    "eptwatch_agent_build_info": "Always 1: the agent's version, and its smaps scanner (c: compiled, regex: the slower fallback)",
}


# Which sources' statuses belong to which timed collector, by exact name: a prefix would count the
# per-VM "kvm_debugfs.vm" (the kvm_counters collector's) against the kvm_debugfs collector too.
# Collectors not listed own the source of their own name and its "name.*" sub-sources (thp.enabled).
_COLLECTOR_SOURCES: dict[str, frozenset[str]] = {
    "kvm_counters": frozenset({"kvm_debugfs.vm", "kvm_qmp", "kvm_counters.vm"}),
    "kvm_debugfs": frozenset({"kvm_debugfs", "kvm_debugfs.global"}),
    "smaps": frozenset({"smaps", "smaps.budget", "mountinfo"}),
    "process": frozenset({"process"}),
}


def _belongs(source: str, collector: str) -> bool:
    names = _COLLECTOR_SOURCES.get(collector)
    return source in names if names is not None else source == collector or source.startswith(collector + ".")


@dataclass
class AgentState:
    sample: HostSample | None = None
    sample_duration_seconds: float | None = None
    samples_total: int = 0
    sample_failures_total: int = 0
    delivery: DeliveryCounters = field(default_factory=DeliveryCounters)
    spool: Spool | None = None


def _g(name: str, labels: list[str] | None = None) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, METRICS[name], labels=labels)


def _c(name: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name.removesuffix("_total"), METRICS[name], value=value)


class AgentCollector(Collector):
    def __init__(self, state: AgentState) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        for section in (self._build, self._vms, self._sources, self._delivery):
            try:
                yield from section()
            except Exception:  # noqa: BLE001 - one broken section must not sink the scrape
                log.exception("metrics section %s failed", section.__name__)

    @staticmethod
    def _build() -> Iterator[Metric]:
        info = _g("eptwatch_agent_build_info", ["version", "smaps_scanner"])
        info.add_metric([__version__, SCANNER], 1)
        yield info

    def _vms(self) -> Iterator[Metric]:
        s = self.state.sample
        labels = ["vm_id", "vm_name", "pid"]
        fams = {n: _g(n, labels) for n in ("eptwatch_vm_host_huge_capacity_2m", "eptwatch_vm_observed_huge_2m",
                                           "eptwatch_vm_lost_huge_2m", "eptwatch_vm_lost_ratio", "eptwatch_agent_smaps_read_cost_seconds")}
        cause = _g("eptwatch_vm_cause", labels + ["cause"])
        if s is not None:
            names = {v.vm.vm_id: (v.vm.identity.name, str(v.vm.pid), v.smaps_cost_seconds) for v in s.vms}
            for e in s.estimates:
                name, pid, cost = names.get(e.vm_id, ("", "", None))
                lv = [e.vm_id, name, pid]
                # Unknown stays absent: no series rather than a fake 0.
                for fam, value in (("eptwatch_vm_host_huge_capacity_2m", e.host_huge_capacity_2m), ("eptwatch_vm_observed_huge_2m", e.observed_huge_2m),
                                   ("eptwatch_vm_lost_huge_2m", e.lost_huge_2m), ("eptwatch_vm_lost_ratio", e.lost_ratio),
                                   ("eptwatch_agent_smaps_read_cost_seconds", cost)):
                    if value is not None:
                        fams[fam].add_metric(lv, value)
                cause.add_metric(lv + [e.cause.value], 1)
        yield from fams.values()
        yield cause
        if self.state.sample_duration_seconds is not None:
            d = _g("eptwatch_agent_sample_duration_seconds")
            d.add_metric([], self.state.sample_duration_seconds)
            yield d

    def _sources(self) -> Iterator[Metric]:
        s = self.state.sample
        fam = _g("eptwatch_agent_source_success", ["source", "vm_id"])
        if s is not None:
            seen: set[tuple[str, str]] = set()
            rows = [(st, "") for st in s.statuses] + [(st, v.vm.vm_id) for v in s.vms for st in v.statuses]
            for st, vm_id in rows:
                key = (st.source, vm_id)
                if key in seen or st.state is SourceState.UNAVAILABLE and st.source.startswith("thp."):
                    continue
                seen.add(key)
                fam.add_metric([st.source, vm_id], 1 if st.usable else 0)
        yield fam
        if s is not None:
            dur = _g("eptwatch_agent_collector_duration_seconds", ["collector"])
            ok = _g("eptwatch_agent_collector_success", ["collector"])
            every = list(s.statuses) + [st for v in s.vms for st in v.statuses]
            for collector, seconds in s.collector_seconds:
                dur.add_metric([collector], seconds)
                failed = any(st.state is SourceState.ERROR for st in every if _belongs(st.source, collector))
                ok.add_metric([collector], 0 if failed else 1)
            yield dur
            yield ok
        yield _c("eptwatch_agent_samples_total", self.state.samples_total)
        yield _c("eptwatch_agent_sample_failures_total", self.state.sample_failures_total)

    def _delivery(self) -> Iterator[Metric]:
        d = self.state.delivery
        if self.state.spool is not None:
            st = self.state.spool.stats()
            for name, value in (("eptwatch_agent_spool_reports", st.depth), ("eptwatch_agent_spool_bytes", st.bytes),
                                ("eptwatch_agent_spool_file_bytes", st.file_bytes)):
                g = _g(name)
                g.add_metric([], value)
                yield g
            yield _c("eptwatch_agent_spool_dropped_total", st.dropped_total)
        yield _c("eptwatch_agent_reports_sent_total", d.reports_sent_total)
        yield _c("eptwatch_agent_reports_acked_total", d.reports_acked_total)
        yield _c("eptwatch_agent_reports_rejected_total", d.reports_rejected_total)
        yield _c("eptwatch_agent_reconnects_total", d.reconnects_total)
        yield _c("eptwatch_agent_instance_restarts_total", d.instance_restarts_total)
        g = _g("eptwatch_agent_connected")
        g.add_metric([], 1 if d.connected else 0)
        yield g
