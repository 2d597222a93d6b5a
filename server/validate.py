"""Checks a report must pass before it is applied. Pure; returns a reason or None.

An invalid report is acknowledged as REJECTED (so the agent drops it rather than resending a poison
report forever) and counted; it never touches fleet state.

Unknown enum values are rejected where the aggregator's logic depends on them (kernel era, estimate
causes). Informational per-VM enums (smaps mode, backing, counter scope, source states) follow the
wire contract instead: a receiver treats an unknown value as unspecified, so an agent newer than
this aggregator is not refused for adding one. They are also the bulk of a report: skipping them
halves the validation cost of a 20-VM report.

The same single walk over a report's estimates also yields the totals the fleet state keeps per host
(`ReportTotals`): protobuf field access from Python is most of the aggregator's own cost per report,
so the checks and the sums read each field once (bench/ingest_load.py).
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Iterable
from typing import NamedTuple

from eptwatch.v1 import report_pb2 as pb

MAX_FUTURE_SECONDS = 300.0  # clock skew we tolerate between an agent and the aggregator
MIN_SAMPLE_TIME = 946684800.0  # 2000-01-01: anything earlier is an unset or broken clock
MAX_VMS = 4096
MAX_LABELS = 64
MAX_LABEL_BYTES = 256
_HOST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,252}")

_ERAS = frozenset(pb.PredicateEra.values())
_CAUSES = frozenset(pb.Cause.values())
EXPLAINED_CAUSES = frozenset({pb.CAUSE_KNOWN_PAGE_CACHE_THP_BUG, pb.CAUSE_EXPECTED_FALSE_NEGATIVE, pb.CAUSE_NX_SPLIT})
_UNEXPLAINED = pb.CAUSE_UNEXPLAINED


class ReportTotals(NamedTuple):  # built for every report ingested: about half the cost of a frozen dataclass
    """A report's per-host sums, in 2 MiB units, over the estimates that carry the loss: the host-level
    estimate where the agent made one (VMs sharing only a host-wide counter), otherwise every VM's."""

    vms: int
    capacity_2m: int
    observed_2m: int
    lost_2m: int
    lost_explained_2m: int
    lost_unexplained_2m: int
    causes: tuple[tuple[int, int], ...]  # (pb.Cause, VMs), sorted


# The per-VM checks and totals from the report's wire bytes (server/_reportscan.c), where built: the same
# answer for a valid report as the walk below, None where Python must decide (every invalid report).
try:
    from ._reportscan import walk as _walk_wire
except ImportError:  # built without a compiler: the Python walk does the same, slower
    _walk_wire = None
_KNOWN_MASK = sum(1 << c for c in _CAUSES)
_EXPLAINED_MASK = sum(1 << c for c in EXPLAINED_CAUSES)
if max(_CAUSES) >= 64 or min(_CAUSES) < 0:  # the compiled walk knows causes by a 64-bit mask
    _walk_wire = None

# Which walk checks reports ("c" or "python"); exported on the aggregator's /metrics build info.
WALKER = "c" if _walk_wire is not None else "python"


def validate_report(r: pb.HostReport, now: float) -> str | None:
    """Why the report must be refused, or None."""
    checked = check_report(r, now)
    return checked if isinstance(checked, str) else None


def check_report(r: pb.HostReport, now: float, wire: tuple[bytes, int, int] | None = None) -> ReportTotals | str:
    """The report's totals if it may be applied, else the reason it may not (one walk for both).
    `wire`: (buffer, start, end) of the bytes `r` was parsed from, where the caller has them: the
    per-VM part is then read from those bytes in C."""
    if not r.host_id:
        return "empty host_id"
    if not _HOST_ID.fullmatch(r.host_id):
        return f"host_id {r.host_id[:64]!r}: expected letters, digits, '.', '_', ':', '-' (at most 253)"
    if not r.agent_instance or len(r.agent_instance) > 64:
        return "agent_instance: expected 1..64 characters"
    if r.sequence < 1:
        return "sequence: expected >= 1"
    if not r.HasField("sample_time"):
        return "sample_time missing"
    t = r.sample_time.seconds + r.sample_time.nanos / 1e9
    if t > now + MAX_FUTURE_SECONDS:
        return f"sample_time {t:.0f} is {t - now:.0f} s in the future (more than {MAX_FUTURE_SECONDS:.0f} s of clock skew)"
    if t < MIN_SAMPLE_TIME:
        return f"sample_time {t:.0f} is before 2000-01-01"
    if len(r.labels) > MAX_LABELS:
        return f"{len(r.labels)} labels: at most {MAX_LABELS}"
    for k, v in r.labels.items():
        if not k or len(k) > MAX_LABEL_BYTES or len(v) > MAX_LABEL_BYTES:
            return f"label {k[:40]!r}: keys 1..{MAX_LABEL_BYTES} and values up to {MAX_LABEL_BYTES} characters"
    if r.kernel.era not in _ERAS:
        return f"kernel.era: unknown value {r.kernel.era}"
    vms = r.vms
    if len(vms) > MAX_VMS or len(r.estimates) > MAX_VMS:
        return f"{max(len(vms), len(r.estimates))} VMs: at most {MAX_VMS}"
    if wire is not None and _walk_wire is not None:
        walked = _walk_wire(*wire, _KNOWN_MASK, _EXPLAINED_MASK, _UNEXPLAINED)
        if walked is not None:
            return ReportTotals._make(walked)
    for vm in vms:
        cost = vm.smaps_read_cost_seconds
        if cost < 0 or cost != cost or cost == math.inf:  # NaN compares unequal to itself
            return f"vm {vm.vm_id[:40]!r}: smaps_read_cost_seconds must be finite and >= 0"
    return estimate_totals(r)


def estimate_totals(r: pb.HostReport) -> ReportTotals | str:
    """The estimates' checks and sums: the per-host totals, or why an estimate is impossible."""
    by_host: _Sums | None = None
    if r.HasField("host_estimate"):
        host_walk = _walk((r.host_estimate,), None)
        if isinstance(host_walk, str):
            return host_walk
        if host_walk[1]:  # else no loss figure at host level: the VMs' estimates carry it
            by_host = host_walk
    causes: dict[int, int] = {}
    walked = _walk(r.estimates, causes)
    if isinstance(walked, str):
        return walked
    n = walked[0]
    # Several VMs sharing only a host-wide counter: the host-level estimate carries the loss.
    _, _, cap, obs, lost, explained, unexplained = by_host if by_host is not None else walked
    return ReportTotals(
        vms=n, capacity_2m=cap, observed_2m=obs,
        lost_2m=lost, lost_explained_2m=explained, lost_unexplained_2m=unexplained,
        causes=tuple(sorted(causes.items())),
    )


def report_totals(r: pb.HostReport) -> ReportTotals:
    """Totals of a report that passed `check_report` earlier (e.g. one loaded from the store)."""
    checked = estimate_totals(r)
    if isinstance(checked, str):
        raise ValueError(f"report of {r.host_id[:80]!r}: {checked}")
    return checked


# One call reads every field the checks need: protobuf field access from Python dominates their cost.
_ESTIMATE_FIELDS = operator.attrgetter("cause", "lost_huge_2m", "host_huge_capacity_2m", "observed_huge_2m",
                                       "allowed_huge_2m", "lost_ratio", "breakdown")


_Sums = tuple[int, int, int, int, int, int, int]


def _walk(estimates: Iterable[pb.VmEstimate], causes: dict[int, int] | None) -> _Sums | str:
    """Checks estimates and sums those that carry a loss: (estimates, with a loss, capacity, observed,
    lost, explained, unexplained), or why one is impossible; counts causes into `causes`. One loop with
    local sums, and optional fields (which read as 0 when unset) are asked for presence only when they
    read 0: this runs for every VM of every report, so each call into protobuf counts."""
    n = estimated = sum_cap = sum_obs = sum_lost = sum_explained = sum_unexplained = 0
    for e in estimates:
        cause, lost, cap, obs, allowed, ratio, breakdown = _ESTIMATE_FIELDS(e)
        n += 1
        if cause not in _CAUSES:
            return f"estimate {e.vm_id[:40]!r}: unknown cause {cause}"
        if causes is not None:
            causes[cause] = causes.get(cause, 0) + 1
        explained = unexplained = total = 0
        for share in breakdown:
            c, k = share.cause, share.lost_huge_2m
            if c in EXPLAINED_CAUSES:
                explained += k
            elif c == _UNEXPLAINED:
                unexplained += k
            elif c not in _CAUSES:
                return f"estimate {e.vm_id[:40]!r}: breakdown: unknown cause {c}"
            total += k
        has = e.HasField
        has_lost = lost != 0 or has("lost_huge_2m")
        if ratio != 0.0 or has("lost_ratio"):  # NaN != 0.0, so NaN is checked too
            if not 0.0 <= ratio <= 1.0:  # also false for NaN
                return f"estimate {e.vm_id[:40]!r}: lost_ratio {ratio!r}: expected a finite number in [0, 1]"
            if not has_lost:
                return f"estimate {e.vm_id[:40]!r}: lost_ratio without lost_huge_2m"
        # allowed > cap implies allowed is set; the capacity must be set too for the check to apply.
        if allowed > cap and (cap != 0 or has("host_huge_capacity_2m")):
            return f"estimate {e.vm_id[:40]!r}: allowed_huge_2m {allowed} exceeds capacity {cap}"
        if not has_lost:
            continue
        if (cap == 0 and not has("host_huge_capacity_2m")) or (obs == 0 and not has("observed_huge_2m")):
            return f"estimate {e.vm_id[:40]!r}: lost_huge_2m without both capacity and observed"
        # The model's definition: what the host maps huge and KVM does not. Anything else is not ours.
        if lost != (cap - obs if cap > obs else 0):
            return f"estimate {e.vm_id[:40]!r}: lost_huge_2m {lost} != max(0, capacity {cap} - observed {obs})"
        if total != lost:
            return f"estimate {e.vm_id[:40]!r}: breakdown sums to {total}, not lost_huge_2m {lost}"
        estimated += 1
        sum_cap += cap
        sum_obs += obs
        sum_lost += lost
        sum_explained += explained
        sum_unexplained += unexplained
    return n, estimated, sum_cap, sum_obs, sum_lost, sum_explained, sum_unexplained
