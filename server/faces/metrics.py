"""Aggregator /metrics: a custom collector built from a snapshot at scrape time.

One place defines every aggregator metric name (METRICS below); the Grafana dashboard and the
alerting rules are checked against it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from eptwatch.common import __version__
from eptwatch.server.fleet.state import CAUSE_NAMES, ERA_NAMES, FleetView
from eptwatch.server.ingest.servicer import IngestCounters
from eptwatch.server.ingest.validate import WALKER
from eptwatch.server.store.commit import DATABASE, DISK_FULL, REPORT

log = logging.getLogger("eptwatch.server.faces.metrics")

METRICS: dict[str, str] = {
    "eptwatch_server_up": "1 while the aggregator is ready to ingest",
    "eptwatch_server_build_info": "Always 1: the aggregator's version, and how it checks reports (c: compiled walk, python: the slower fallback)",
    "eptwatch_server_hosts": "Hosts whose latest report this aggregator holds",
    "eptwatch_server_streams_open": "Agent streams open now",
    "eptwatch_server_streams_total": "Agent streams accepted",
    "eptwatch_server_streams_refused_total": "Agent streams refused, by gRPC status code",
    "eptwatch_server_reports_total": "Reports received, by result (applied, duplicate, rejected)",
    "eptwatch_server_store_commits_total": "State-store transactions committed, SQLite or PostgreSQL (each acknowledges a batch)",
    # A shared store (PostgreSQL): every replica follows it; one exports the fleet rollups.
    "eptwatch_server_fleet_exporter": "1 where this process exports the eptwatch_fleet_* and eptwatch_kernel_* series (always with SQLite; the lease holder among replicas sharing PostgreSQL)",
    "eptwatch_server_store_followed_hosts_total": "Host changes committed by other replicas and taken into this one's fleet view (shared store)",
    "eptwatch_server_store_follow_failures_total": "Polls of the shared store that failed (the fleet view falls behind while they do)",
    "eptwatch_server_store_commit_failures_total": "SQLite commits that failed, by reason (disk_full, database: nothing "
                                                   "acknowledged; report: one report could not be written and was rejected)",
    # Fleet rollups: counts and sums only (never ratios), so replicas add up in PromQL. Hosts that went
    # stale have left these. Labels: kernel_release, era.
    "eptwatch_fleet_hosts": "Fresh hosts, by kernel release and predicate era",
    "eptwatch_fleet_vms": "VMs on fresh hosts, by kernel release and predicate era",
    "eptwatch_fleet_host_huge_capacity_2m": "Sum of host huge capacity (2 MiB units) of VMs with a loss estimate",
    "eptwatch_fleet_observed_huge_2m": "Sum of huge EPT mappings (2 MiB units) of VMs with a loss estimate",
    "eptwatch_fleet_lost_huge_2m": "Sum of lost huge mappings (2 MiB units)",
    "eptwatch_fleet_lost_explained_2m": "Lost huge mappings the predicate model explains (known bug, NX split, false negative)",
    "eptwatch_fleet_lost_unexplained_2m": "Lost huge mappings the predicate model does not explain",
    "eptwatch_fleet_vms_by_cause": "VMs on fresh hosts by their estimate's cause",
    # The same sums per configured host label (rollup_labels), labels: label, value.
    "eptwatch_fleet_label_hosts": "Fresh hosts per value of a configured host label",
    "eptwatch_fleet_label_host_huge_capacity_2m": "Host huge capacity per value of a configured host label",
    "eptwatch_fleet_label_lost_huge_2m": "Lost huge mappings per value of a configured host label",
    "eptwatch_fleet_label_lost_unexplained_2m": "Unexplained lost huge mappings per value of a configured host label",
    "eptwatch_fleet_hosts_stale": "Hosts whose agent has been silent longer than the staleness bound",
    "eptwatch_fleet_hosts_departed": "Hosts whose agent closed its stream here cleanly (stopped or moved to another replica)",
    "eptwatch_fleet_hosts_invalid": "Hosts whose latest report cannot be evaluated (named per host on /api/v1/hosts?status=invalid)",
    "eptwatch_fleet_agent_spool_dropped": "Reports fresh hosts' agents dropped from their spools (latest count)",
    # Verdicts, with their evidence on the API.
    # Identifying labels only, so a verdict flip changes a value, never the series; what the verdict was
    # compared with is its own info series (join on kernel_release, era).
    "eptwatch_kernel_regressed": "1 for a kernel release the detector judges regressed, else 0 (labels: kernel_release, era)",
    "eptwatch_kernel_comparison_info": "Always 1: the comparable kernel that decided a regressed verdict (labels: kernel_release, era, compared_to)",
    "eptwatch_kernel_known_bad_hosts": "Fresh hosts running a kernel the model predicts to have the page-cache THP bug",
    "eptwatch_fleet_worst_host_lost_ratio": "Top-N hosts by lost / capacity (labels: host_id, kernel_release)",
    "eptwatch_fleet_worst_host_lost_huge_2m": "Top-N hosts' lost huge mappings (labels: host_id, kernel_release)",
    # This HTTP server's own limits (http_idle_timeout_seconds, http_max_connections).
    "eptwatch_server_http_connections_open": "HTTP connections being served now",
    "eptwatch_server_http_connections_refused_total": "HTTP connections answered 503 at the connection cap",
    "eptwatch_server_http_connections_timed_out_total": "HTTP connections closed for sending nothing within the idle timeout",
}


class StoreCounters(Protocol):
    """What the collector reads of the store: its commit counters."""

    @property
    def commits_total(self) -> int: ...

    @property
    def commit_failures_total(self) -> Mapping[str, int]: ...


class HttpCounters(Protocol):
    """What the collector reads of the HTTP server (eptwatch.common.httpserve): its connection counters."""

    @property
    def connections_active(self) -> int: ...

    @property
    def connections_refused_total(self) -> int: ...

    @property
    def connections_timed_out_total(self) -> int: ...


class FollowerCounters(Protocol):
    """What the collector reads of a shared-store follower (server/fleet/follow.py)."""

    @property
    def hosts_followed_total(self) -> int: ...

    @property
    def polls_failed_total(self) -> int: ...

    def exports_fleet(self) -> bool: ...


class AggregatorCollector(Collector):
    """Takes what it reads as arguments (read-only callables and counter objects), never the Aggregator:
    metrics -> app would close an import loop (app builds the HTTP server, which serves this)."""

    def __init__(self, *, ready: Callable[[], bool], fleet_view: Callable[[], FleetView], hosts_held: Callable[[], int],
                 ingest: IngestCounters, store: StoreCounters, http: Callable[[], HttpCounters | None] = lambda: None,
                 follower: FollowerCounters | None = None) -> None:
        self.ready = ready
        self.fleet_view = fleet_view
        self.hosts_held = hosts_held
        self.ingest = ingest
        self.store = store
        self.http = http  # None until the HTTP server is listening
        self.follower = follower  # only on a shared store (PostgreSQL)

    def collect(self) -> Iterator[Metric]:
        # Each section is guarded: one failing section must not sink the whole scrape.
        # On a shared store every replica sees the whole fleet: only the lease holder exports its rollups.
        follower = self.follower
        sections = (self._ingest, self._fleet, self._http) if follower is None or follower.exports_fleet() else (self._ingest, self._http)
        for section in sections:
            try:
                yield from section()
            except Exception:  # noqa: BLE001
                log.exception("metrics section %s failed", section.__name__)

    def _ingest(self) -> Iterator[Metric]:
        c = self.ingest
        yield GaugeMetricFamily("eptwatch_server_up", METRICS["eptwatch_server_up"], value=1 if self.ready() else 0)
        info = GaugeMetricFamily("eptwatch_server_build_info", METRICS["eptwatch_server_build_info"], labels=["version", "report_walker"])
        info.add_metric([__version__, WALKER], 1)
        yield info
        yield GaugeMetricFamily("eptwatch_server_hosts", METRICS["eptwatch_server_hosts"], value=self.hosts_held())
        yield GaugeMetricFamily("eptwatch_server_streams_open", METRICS["eptwatch_server_streams_open"], value=c.streams_open)
        yield CounterMetricFamily("eptwatch_server_streams", METRICS["eptwatch_server_streams_total"], value=c.streams_total)
        refused = CounterMetricFamily("eptwatch_server_streams_refused", METRICS["eptwatch_server_streams_refused_total"], labels=["code"])
        for code, n in sorted(c.streams_refused.items()):
            refused.add_metric([code], n)
        yield refused
        reports = CounterMetricFamily("eptwatch_server_reports", METRICS["eptwatch_server_reports_total"], labels=["result"])
        reports.add_metric(["applied"], c.reports_applied_total)
        reports.add_metric(["duplicate"], c.reports_duplicate_total)
        reports.add_metric(["rejected"], c.reports_rejected_total)
        yield reports
        yield CounterMetricFamily("eptwatch_server_store_commits", METRICS["eptwatch_server_store_commits_total"],
                                  value=self.store.commits_total)
        failures = CounterMetricFamily("eptwatch_server_store_commit_failures", METRICS["eptwatch_server_store_commit_failures_total"],
                                       labels=["reason"])
        # Every reason always exported (0 until it happens), so that an alert's rate() has a series to start from.
        counts = self.store.commit_failures_total
        for reason in (DISK_FULL, DATABASE, REPORT):
            failures.add_metric([reason], counts.get(reason, 0))
        yield failures
        follower = self.follower
        yield GaugeMetricFamily("eptwatch_server_fleet_exporter", METRICS["eptwatch_server_fleet_exporter"],
                                value=1 if follower is None or follower.exports_fleet() else 0)
        if follower is not None:
            yield CounterMetricFamily("eptwatch_server_store_followed_hosts", METRICS["eptwatch_server_store_followed_hosts_total"],
                                      value=follower.hosts_followed_total)
            yield CounterMetricFamily("eptwatch_server_store_follow_failures", METRICS["eptwatch_server_store_follow_failures_total"],
                                      value=follower.polls_failed_total)

    def _fleet(self) -> Iterator[Metric]:
        v = self.fleet_view()
        kl = ["kernel_release", "era"]
        fams = {
            "eptwatch_fleet_hosts": (lambda r: r.hosts),
            "eptwatch_fleet_vms": (lambda r: r.vms),
            "eptwatch_fleet_host_huge_capacity_2m": (lambda r: r.capacity_2m),
            "eptwatch_fleet_observed_huge_2m": (lambda r: r.observed_2m),
            "eptwatch_fleet_lost_huge_2m": (lambda r: r.lost_2m),
            "eptwatch_fleet_lost_explained_2m": (lambda r: r.lost_explained_2m),
            "eptwatch_fleet_lost_unexplained_2m": (lambda r: r.lost_unexplained_2m),
        }
        for name, get in fams.items():
            g = GaugeMetricFamily(name, METRICS[name], labels=kl)
            for k in v.kernels:
                g.add_metric([k.kernel_release, ERA_NAMES.get(k.era, str(k.era))], get(k))
            yield g
        by_cause = GaugeMetricFamily("eptwatch_fleet_vms_by_cause", METRICS["eptwatch_fleet_vms_by_cause"], labels=["cause"])
        for c, n in sorted(v.total.causes.items()):
            by_cause.add_metric([CAUSE_NAMES.get(c, str(c))], n)
        yield by_cause
        for name, get in (("eptwatch_fleet_label_hosts", lambda r: r.hosts),
                          ("eptwatch_fleet_label_host_huge_capacity_2m", lambda r: r.capacity_2m),
                          ("eptwatch_fleet_label_lost_huge_2m", lambda r: r.lost_2m),
                          ("eptwatch_fleet_label_lost_unexplained_2m", lambda r: r.lost_unexplained_2m)):
            g = GaugeMetricFamily(name, METRICS[name], labels=["label", "value"])
            for (lk, lv), r in sorted(v.labels.items()):
                g.add_metric([lk, lv], get(r))
            yield g
        yield GaugeMetricFamily("eptwatch_fleet_hosts_stale", METRICS["eptwatch_fleet_hosts_stale"], value=v.hosts_stale)
        yield GaugeMetricFamily("eptwatch_fleet_hosts_departed", METRICS["eptwatch_fleet_hosts_departed"], value=v.hosts_departed)
        yield GaugeMetricFamily("eptwatch_fleet_hosts_invalid", METRICS["eptwatch_fleet_hosts_invalid"], value=len(v.invalid))
        yield GaugeMetricFamily("eptwatch_fleet_agent_spool_dropped", METRICS["eptwatch_fleet_agent_spool_dropped"], value=v.total.spool_dropped)
        reg = GaugeMetricFamily("eptwatch_kernel_regressed", METRICS["eptwatch_kernel_regressed"], labels=kl)
        compared = GaugeMetricFamily("eptwatch_kernel_comparison_info", METRICS["eptwatch_kernel_comparison_info"],
                                     labels=[*kl, "compared_to"])
        bad = GaugeMetricFamily("eptwatch_kernel_known_bad_hosts", METRICS["eptwatch_kernel_known_bad_hosts"], labels=["kernel_release"])
        for k in v.kernels:
            era = ERA_NAMES.get(k.era, str(k.era))
            reg.add_metric([k.kernel_release, era], 1 if k.regressed else 0)
            if k.regressed and k.compared_to:
                compared.add_metric([k.kernel_release, era, k.compared_to], 1)
            if k.known_bad:
                bad.add_metric([k.kernel_release], k.hosts)
        yield reg
        yield compared
        yield bad
        ratio = GaugeMetricFamily("eptwatch_fleet_worst_host_lost_ratio", METRICS["eptwatch_fleet_worst_host_lost_ratio"], labels=["host_id", "kernel_release"])
        lost = GaugeMetricFamily("eptwatch_fleet_worst_host_lost_huge_2m", METRICS["eptwatch_fleet_worst_host_lost_huge_2m"], labels=["host_id", "kernel_release"])
        for h in v.worst_hosts:
            ratio.add_metric([h.host_id, h.kernel_release], h.lost_ratio or 0.0)
            lost.add_metric([h.host_id, h.kernel_release], h.lost_2m)
        yield ratio
        yield lost

    def _http(self) -> Iterator[Metric]:
        h = self.http()
        if h is None:
            return
        yield GaugeMetricFamily("eptwatch_server_http_connections_open", METRICS["eptwatch_server_http_connections_open"],
                                value=h.connections_active)
        yield CounterMetricFamily("eptwatch_server_http_connections_refused", METRICS["eptwatch_server_http_connections_refused_total"],
                                  value=h.connections_refused_total)
        yield CounterMetricFamily("eptwatch_server_http_connections_timed_out",
                                  METRICS["eptwatch_server_http_connections_timed_out_total"], value=h.connections_timed_out_total)
