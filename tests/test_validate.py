"""The aggregator's report checks (pure)."""

from __future__ import annotations

import math
import time
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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


# --- the one-pass checks and totals against a plain reference ------------------------------------

def _reference(e: pb.VmEstimate) -> str | None:
    """The estimate rules written the obvious way (every presence asked of protobuf): the oracle the
    optimised single pass in server/validate.py must agree with."""
    causes = set(pb.Cause.values())
    if e.cause not in causes:
        return "cause"
    if any(s.cause not in causes for s in e.breakdown):
        return "breakdown cause"
    if e.HasField("lost_ratio") and not (0.0 <= e.lost_ratio <= 1.0):
        return "ratio range"
    if e.HasField("lost_ratio") and not e.HasField("lost_huge_2m"):
        return "ratio without lost"
    if e.HasField("host_huge_capacity_2m") and e.HasField("allowed_huge_2m") and e.allowed_huge_2m > e.host_huge_capacity_2m:
        return "allowed"
    if e.HasField("lost_huge_2m"):
        if not (e.HasField("host_huge_capacity_2m") and e.HasField("observed_huge_2m")):
            return "lost without both"
        if e.lost_huge_2m != max(0, e.host_huge_capacity_2m - e.observed_huge_2m):
            return "lost definition"
        if sum(s.lost_huge_2m for s in e.breakdown) != e.lost_huge_2m:
            return "breakdown sum"
    return None


_OPTIONAL = ("host_huge_capacity_2m", "observed_huge_2m", "allowed_huge_2m", "lost_huge_2m")


@given(st.data())
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_single_pass_agrees_with_the_reference(report: pb.HostReport, data: st.DataObject) -> None:
    from eptwatch.server.validate import EXPLAINED_CAUSES, check_report

    r = pb.HostReport()
    r.CopyFrom(report)
    small = st.integers(0, 4)  # small values make zeros (unset-looking) and equalities common
    # One estimate mutated, the others left valid, so that each rule is reached often.
    for e in [r.estimates[data.draw(st.integers(0, len(r.estimates) - 1))]]:
        for name in _OPTIONAL:
            choice = data.draw(st.sampled_from(["keep", "clear", "set"]))
            if choice == "clear":
                e.ClearField(name)
            elif choice == "set":
                setattr(e, name, data.draw(small))
        ratio = data.draw(st.sampled_from(["keep", "clear", "clear", 0.0, 0.5, 1.0, 1.5, -0.0, math.nan]))
        if ratio == "clear":
            e.ClearField("lost_ratio")
        elif ratio != "keep":
            e.lost_ratio = ratio  # type: ignore[assignment]
        if data.draw(st.booleans()):
            del e.breakdown[:]
            for _ in range(data.draw(st.integers(0, 2))):
                s = e.breakdown.add()
                s.cause = data.draw(st.sampled_from([*pb.Cause.values(), 99]))  # type: ignore[assignment]
                s.lost_huge_2m = data.draw(small)
        if data.draw(st.integers(0, 9)) == 0:
            e.cause = 98  # type: ignore[assignment]
    expected = next((reason for reason in map(_reference, r.estimates) if reason), None)
    got = check_report(r, NOW)
    assert isinstance(got, str) == (expected is not None), (expected, got)
    if isinstance(got, str):
        return
    valid = [e for e in r.estimates if e.HasField("lost_huge_2m")]
    assert got.vms == len(r.estimates)
    assert got.capacity_2m == sum(e.host_huge_capacity_2m for e in valid)
    assert got.observed_2m == sum(e.observed_huge_2m for e in valid)
    assert got.lost_2m == sum(e.lost_huge_2m for e in valid)
    assert got.lost_explained_2m == sum(s.lost_huge_2m for e in valid for s in e.breakdown if s.cause in EXPLAINED_CAUSES)
    assert got.lost_unexplained_2m == sum(s.lost_huge_2m for e in valid for s in e.breakdown if s.cause == pb.CAUSE_UNEXPLAINED)
    assert dict(got.causes) == dict(Counter(int(e.cause) for e in r.estimates))
