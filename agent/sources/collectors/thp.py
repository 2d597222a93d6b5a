"""Collector `thp`: the host's transparent huge page settings and nx_huge_pages (sysfs)."""

from __future__ import annotations

from dataclasses import dataclass

from eptwatch.agent.sources.hostroot import HostRoot
from eptwatch.agent.sources.status import SourceStatus
from eptwatch.agent.sources.thp import ThpSettings, read_thp_settings


@dataclass(frozen=True)
class ThpReading:
    settings: ThpSettings
    statuses: tuple[SourceStatus, ...]


class ThpCollector:
    name = "thp"

    def __init__(self, root: HostRoot) -> None:
        self.root = root

    def collect(self) -> ThpReading:
        settings, statuses = read_thp_settings(self.root)
        return ThpReading(settings, tuple(statuses))
