"""The aggregator's report checks (pure)."""

from __future__ import annotations

import math
import time

import pytest

from eptwatch.agent.hostroot import HostRoot
from eptwatch.agent.report import host_report
from eptwatch.agent.sampler import Sampler
from eptwatch.server.validate import validate_report
from eptwatch.v1 import report_pb2 as pb

from .conftest import FIXTURES

NOW = time.time()


@pytest.fixture
def report() -> pb.HostReport:
    r = host_report(Sampler(HostRoot.from_root(FIXTURES / "linux-6.6-pages2m")).sample(), sequence=1, agent_instance="i")
    r.sample_time.FromNanoseconds(int(NOW * 1e9))
    return r


def test_a_real_report_is_valid(report: pb.HostReport) -> None:
    assert validate_report(report, NOW) is None


@pytest.mark.parametrize("mutate, needle", [
    (lambda r: setattr(r, "host_id", ""), "empty host_id"),
    (lambda r: setattr(r, "host_id", "bad host"), "host_id"),
    (lambda r: setattr(r, "sequence", 0), "sequence"),
    (lambda r: r.sample_time.FromSeconds(int(NOW) + 3600), "future"),
    (lambda r: r.sample_time.FromSeconds(100), "before 2000"),
    (lambda r: setattr(r.kernel, "era", 99), "kernel.era: unknown value 99"),
    (lambda r: setattr(r.estimates[0], "cause", 77), "unknown cause 77"),
    (lambda r: setattr(r.estimates[1].breakdown[0], "cause", 78), "breakdown: unknown cause 78"),
    (lambda r: setattr(r.estimates[1], "lost_ratio", math.nan), "lost_ratio"),
    (lambda r: setattr(r.estimates[1], "lost_ratio", 1.5), "lost_ratio"),
    (lambda r: setattr(r.estimates[1], "lost_huge_2m", 5), "lost_huge_2m 5 != max(0"),
    (lambda r: setattr(r.estimates[1].breakdown[0], "lost_huge_2m", 1), "breakdown sums"),
    (lambda r: setattr(r.estimates[0], "allowed_huge_2m", 10**9), "allowed_huge_2m"),
    (lambda r: setattr(r.vms[0], "smaps_read_cost_seconds", math.nan), "smaps_read_cost_seconds"),
    (lambda r: setattr(r.vms[0], "smaps_read_cost_seconds", -1.0), "smaps_read_cost_seconds"),
    (lambda r: r.labels.update({f"k{i}": "v" for i in range(100)}), "labels"),
])
def test_impossible_values_are_named(report: pb.HostReport, mutate, needle: str) -> None:  # type: ignore[no-untyped-def]
    mutate(report)
    reason = validate_report(report, NOW)
    assert reason is not None and needle in reason


def test_unknown_informational_enums_follow_the_contract(report: pb.HostReport) -> None:
    """A newer agent's new smaps mode, backing, counter scope or source state is not a reason to refuse it."""
    report.vms[0].smaps_mode = 42  # type: ignore[assignment]
    report.vms[0].guest_ram[0].backing = 43  # type: ignore[assignment]
    report.vms[0].kvm.scope = 44  # type: ignore[assignment]
    report.sources[0].state = 45  # type: ignore[assignment]
    assert validate_report(report, NOW) is None
