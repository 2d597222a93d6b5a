"""Aggregator /metrics: a custom collector built from a snapshot at scrape time.

One place defines every aggregator metric name (METRICS below); the Grafana dashboard and the
alerting rules are checked against it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .app import Aggregator

log = logging.getLogger("eptwatch.server.metrics")

METRICS: dict[str, str] = {
    "eptwatch_server_up": "1 while the aggregator is ready to ingest",
    "eptwatch_server_hosts": "Hosts whose latest report this aggregator holds",
    "eptwatch_server_streams_open": "Agent streams open now",
    "eptwatch_server_streams_total": "Agent streams accepted",
    "eptwatch_server_streams_refused_total": "Agent streams refused, by gRPC status code",
    "eptwatch_server_reports_total": "Reports received, by result (applied, duplicate, rejected)",
    "eptwatch_server_store_commits_total": "SQLite transactions committed (each acknowledges a batch)",
}


class AggregatorCollector(Collector):
    def __init__(self, agg: Aggregator) -> None:
        self.agg = agg

    def collect(self) -> Iterator[Metric]:
        # Each section is guarded: one failing section must not sink the whole scrape.
        try:
            yield from self._ingest()
        except Exception:  # noqa: BLE001
            log.exception("ingest metrics failed")

    def _ingest(self) -> Iterator[Metric]:
        c = self.agg.ingest.counters
        yield GaugeMetricFamily("eptwatch_server_up", METRICS["eptwatch_server_up"], value=1 if self.agg.ready else 0)
        yield GaugeMetricFamily("eptwatch_server_hosts", METRICS["eptwatch_server_hosts"], value=len(self.agg.fleet))
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
                                  value=self.agg.store.commits_total)
