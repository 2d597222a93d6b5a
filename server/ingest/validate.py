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

Bounds (docs/configuration.md, "Report bounds"): every integer that reaches storage or a fleet sum is
bounded, so that a report the aggregator keeps can neither fail a SQLite write (INTEGER is signed 64
bits) nor make the read side's sums absurd. A VM's guest RAM is at most MAX_GUEST_RAM_BYTES (4 PiB);
every 2 MiB count at most MAX_HUGE_2M (that RAM in 2 MiB units); a VM's capacity at most its own guest
RAM in 2 MiB units, rounded up, where the agent measured it. An estimate with cause IMPLAUSIBLE and no
loss figure is exempt: it is the agent saying its readings contradict each other (a KVM counter of
2^64-1, say), it carries no verdict and enters no sum.
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
MAX_STORED_INTEGER = 2**63 - 1  # SQLite INTEGER: sequence, spool_dropped_total
MAX_GUEST_RAM_BYTES = 2**52  # 4 PiB per VM: far beyond any machine, well inside every sum we keep
TWO_MIB = 2**21
MAX_HUGE_2M = MAX_GUEST_RAM_BYTES // TWO_MIB  # 2^31: any 2 MiB count (capacity, observed, allowed, lost)
MAX_LABELS = 64
MAX_LABEL_BYTES = 256
_HOST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,252}")

_ERAS = frozenset(pb.PredicateEra.values())
_CAUSES = frozenset(pb.Cause.values())
EXPLAINED_CAUSES = frozenset({pb.CAUSE_KNOWN_PAGE_CACHE_THP_BUG, pb.CAUSE_EXPECTED_FALSE_NEGATIVE, pb.CAUSE_NX_SPLIT})
_UNEXPLAINED = pb.CAUSE_UNEXPLAINED
_IMPLAUSIBLE = pb.CAUSE_IMPLAUSIBLE


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


# The per-VM checks and totals from the report's wire bytes (server/ingest/_reportscan.c), where built: the same
# answer for a valid report as the walk below, None where Python must decide (every invalid report).
try:
    from eptwatch.server.ingest._reportscan import walk as _walk_wire
except ImportError:  # built without a compiler: the Python walk does the same, slower
    _walk_wire = None
try:  # the report-level checks too, then the walk, in one call (used only where _walk_wire is)
    from eptwatch.server.ingest._reportscan import check as _check_wire
except ImportError:  # an older build of the extension: the report-level checks stay in Python
    _check_wire = None
_KNOWN_MASK = sum(1 << c for c in _CAUSES)
_EXPLAINED_MASK = sum(1 << c for c in EXPLAINED_CAUSES)
if max(_CAUSES) >= 64 or min(_CAUSES) < 0:  # the compiled walk knows causes by a 64-bit mask
    _walk_wire = None
# The compiled walk's arguments after (data, start, end): the bounds are defined here only.
_WALK_ARGS = (_KNOWN_MASK, _EXPLAINED_MASK, _UNEXPLAINED, _IMPLAUSIBLE, MAX_HUGE_2M, MAX_GUEST_RAM_BYTES)
MAX_AGENT_INSTANCE_CHARS = 64
if max(_ERAS) >= 64 or min(_ERAS) < 0:  # the compiled checks know eras by a 64-bit mask
    _check_wire = None
# The compiled report-level checks' arguments after (data, start, end, now), then the walk's.
_CHECK_ARGS = (MAX_FUTURE_SECONDS, MIN_SAMPLE_TIME, sum(1 << e for e in _ERAS), MAX_LABELS, MAX_LABEL_BYTES, MAX_VMS,
               MAX_AGENT_INSTANCE_CHARS, MAX_STORED_INTEGER, *_WALK_ARGS)

# Which walk checks reports ("c" or "python"); exported on the aggregator's /metrics build info.
WALKER = "c" if _walk_wire is not None else "python"


def validate_report(r: pb.HostReport, now: float) -> str | None:
    """Why the report must be refused, or None."""
    checked = check_report(r, now)
    return checked if isinstance(checked, str) else None


def check_report(r: pb.HostReport, now: float, wire: tuple[bytes, int, int] | None = None) -> ReportTotals | str:
    """The report's totals if it may be applied, else the reason it may not (one walk for both).
    `wire`: (buffer, start, end) of the bytes `r` was parsed from, where the caller has them: the
    per-VM part is then read from those bytes in C, and where built, the report-level checks below
    too (in the same call: a valid report then costs no protobuf field access here; anything else is
    decided by the Python checks, which word the reason)."""
    if wire is not None and _check_wire is not None and _walk_wire is not None:
        walked = _check_wire(*wire, now, *_CHECK_ARGS)
        if walked is not None:
            return ReportTotals._make(walked)
    if not r.host_id:
        return "empty host_id"
    if not _HOST_ID.fullmatch(r.host_id):
        return f"host_id {r.host_id[:64]!r}: expected letters, digits, '.', '_', ':', '-' (at most 253)"
    if not r.agent_instance or len(r.agent_instance) > MAX_AGENT_INSTANCE_CHARS:
        return f"agent_instance: expected 1..{MAX_AGENT_INSTANCE_CHARS} characters"
    if r.sequence < 1:
        return "sequence: expected >= 1"
    if r.sequence > MAX_STORED_INTEGER:
        return f"sequence {r.sequence}: expected at most {MAX_STORED_INTEGER} (2^63-1)"
    if not r.HasField("sample_time"):
        return "sample_time missing"
    t = r.sample_time.seconds + r.sample_time.nanos / 1e9
    if t > now + MAX_FUTURE_SECONDS:
        return f"sample_time {t:.0f} is {t - now:.0f} s in the future (more than {MAX_FUTURE_SECONDS:.0f} s of clock skew)"
    if t < MIN_SAMPLE_TIME:
        return f"sample_time {t:.0f} is before 2000-01-01"
    labels = r.labels
    if len(labels) > MAX_LABELS:
        return f"{len(labels)} labels: at most {MAX_LABELS}"
    for k in labels:  # keys, then each value by key: the map's items() is a pure-Python view, slower
        if not k or len(k) > MAX_LABEL_BYTES or len(labels[k]) > MAX_LABEL_BYTES:
            return f"label {k[:40]!r}: keys 1..{MAX_LABEL_BYTES} and values up to {MAX_LABEL_BYTES} characters"
    if r.kernel.era not in _ERAS:
        return f"kernel.era: unknown value {r.kernel.era}"
    vms = r.vms
    if len(vms) > MAX_VMS or len(r.estimates) > MAX_VMS:
        return f"{max(len(vms), len(r.estimates))} VMs: at most {MAX_VMS}"
    if wire is not None and _walk_wire is not None:
        walked = _walk_wire(*wire, *_WALK_ARGS)
        if walked is not None:
            return ReportTotals._make(walked)
    for vm in vms:
        cost = vm.smaps_read_cost_seconds
        if cost < 0 or cost != cost or cost == math.inf:  # NaN compares unequal to itself
            return f"vm {vm.vm_id[:40]!r}: smaps_read_cost_seconds must be finite and >= 0"
    return estimate_totals(r)


def check_spool_dropped(spool_dropped_total: int) -> str | None:
    """Why an AgentMessage's spool_dropped_total cannot be stored (it goes with each of its reports)."""
    if spool_dropped_total > MAX_STORED_INTEGER:
        return f"spool_dropped_total {spool_dropped_total}: expected at most {MAX_STORED_INTEGER} (2^63-1)"
    return None


def _ram_limits(r: pb.HostReport) -> tuple[dict[str, int | None], int | None] | str:
    """Each vm_id's capacity bound (ceil(guest RAM / 2 MiB); None where a VM of that id has no RAM
    figure) and the host-level estimate's (their sum, None unless every VM has one), or why a VM's
    guest RAM is beyond the bound."""
    limits: dict[str, int | None] = {}
    host: int | None = 0 if len(r.vms) else None
    for vm in r.vms:
        ram = vm.guest_ram_bytes
        if ram > MAX_GUEST_RAM_BYTES:
            return f"vm {vm.vm_id[:40]!r}: guest_ram_bytes {ram} exceeds {MAX_GUEST_RAM_BYTES} (2^52, the documented bound)"
        limit = -(-ram // TWO_MIB) if ram else None
        vm_id = vm.vm_id
        if vm_id in limits:  # several VMs with one id: the largest bound, none if any is unknown
            prev = limits[vm_id]
            limits[vm_id] = None if prev is None or limit is None else max(prev, limit)
        else:
            limits[vm_id] = limit
        host = None if host is None or limit is None else host + limit
    return limits, host


def estimate_totals(r: pb.HostReport) -> ReportTotals | str:
    """The estimates' checks and sums: the per-host totals, or why an estimate is impossible."""
    ram = _ram_limits(r)
    if isinstance(ram, str):
        return ram
    limits, host_limit = ram
    by_host: _Sums | None = None
    if r.HasField("host_estimate"):
        host_walk = _walk((r.host_estimate,), None, None, host_limit)
        if isinstance(host_walk, str):
            return host_walk
        if host_walk[1]:  # else no loss figure at host level: the VMs' estimates carry it
            by_host = host_walk
    causes: dict[int, int] = {}
    walked = _walk(r.estimates, causes, limits, None)
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


def _walk(estimates: Iterable[pb.VmEstimate], causes: dict[int, int] | None,
          limits: dict[str, int | None] | None, fixed_limit: int | None) -> _Sums | str:
    """Checks estimates and sums those that carry a loss: (estimates, with a loss, capacity, observed,
    lost, explained, unexplained), or why one is impossible; counts causes into `causes`. Capacity is
    bounded by `limits[vm_id]` (VM estimates) or `fixed_limit` (the host-level one). One loop with
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
        explained = unexplained = total = max_share = 0
        for share in breakdown:
            c, k = share.cause, share.lost_huge_2m
            if k > max_share:
                max_share = k
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
        if cause != _IMPLAUSIBLE or has_lost:  # see the module comment: implausible readings are data
            for name, v in (("host_huge_capacity_2m", cap), ("observed_huge_2m", obs), ("allowed_huge_2m", allowed),
                            ("lost_huge_2m", lost), ("breakdown lost_huge_2m", max_share)):
                if v > MAX_HUGE_2M:
                    return (f"estimate {e.vm_id[:40]!r}: {name} {v} exceeds {MAX_HUGE_2M} "
                            f"(2^31: {MAX_GUEST_RAM_BYTES} bytes of guest RAM in 2 MiB units)")
            if limits is not None:
                vm_id = e.vm_id
                limit = limits.get(vm_id)
                what = f"the guest RAM of VM {vm_id[:40]!r}"
            else:
                limit = fixed_limit
                what = "the guest RAM of all VMs"
            if limit is not None and cap > limit:
                return (f"estimate {e.vm_id[:40]!r}: host_huge_capacity_2m {cap} exceeds {what} "
                        f"({limit} x 2 MiB): cannot be")
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
