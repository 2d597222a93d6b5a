"""Checks a report must pass before it is applied. Pure; returns a reason or None.

An invalid report is acknowledged as REJECTED (so the agent drops it rather than resending a poison
report forever) and counted; it never touches fleet state.

Unknown enum values are rejected where the aggregator's logic depends on them (kernel era, estimate
causes). Informational per-VM enums (smaps mode, backing, counter scope, source states) follow the
wire contract instead: a receiver treats an unknown value as unspecified, so an agent newer than
this aggregator is not refused for adding one. They are also the bulk of a report: skipping them
halves the validation cost of a 20-VM report.
"""

from __future__ import annotations

import math
import re

from eptwatch.v1 import report_pb2 as pb

MAX_FUTURE_SECONDS = 300.0  # clock skew we tolerate between an agent and the aggregator
MIN_SAMPLE_TIME = 946684800.0  # 2000-01-01: anything earlier is an unset or broken clock
MAX_VMS = 4096
MAX_LABELS = 64
MAX_LABEL_BYTES = 256
_HOST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,252}")

_ERAS = set(pb.PredicateEra.values())
_CAUSES = set(pb.Cause.values())


def validate_report(r: pb.HostReport, now: float) -> str | None:
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
    if len(r.vms) > MAX_VMS or len(r.estimates) > MAX_VMS:
        return f"{max(len(r.vms), len(r.estimates))} VMs: at most {MAX_VMS}"
    for vm in r.vms:
        cost = vm.smaps_read_cost_seconds
        if cost < 0 or cost != cost or cost == math.inf:  # NaN compares unequal to itself
            return f"vm {vm.vm_id[:40]!r}: smaps_read_cost_seconds must be finite and >= 0"
    estimates = list(r.estimates)
    if r.HasField("host_estimate"):
        estimates.append(r.host_estimate)
    for e in estimates:
        reason = _validate_estimate(e)
        if reason:
            return f"estimate {e.vm_id[:40]!r}: {reason}"
    return None


def _validate_estimate(e: pb.VmEstimate) -> str | None:
    if e.cause not in _CAUSES:
        return f"unknown cause {e.cause}"
    has = e.HasField
    lost = e.lost_huge_2m if has("lost_huge_2m") else None
    breakdown_total = 0
    for share in e.breakdown:
        if share.cause not in _CAUSES:
            return f"breakdown: unknown cause {share.cause}"
        breakdown_total += share.lost_huge_2m
    if has("lost_ratio"):
        ratio = e.lost_ratio
        if not 0.0 <= ratio <= 1.0:  # also false for NaN
            return f"lost_ratio {ratio!r}: expected a finite number in [0, 1]"
        if lost is None:
            return "lost_ratio without lost_huge_2m"
    cap = e.host_huge_capacity_2m if has("host_huge_capacity_2m") else None
    if lost is not None:
        obs = e.observed_huge_2m if has("observed_huge_2m") else None
        if cap is None or obs is None:
            return "lost_huge_2m without both capacity and observed"
        # The model's definition: what the host maps huge and KVM does not. Anything else is not ours.
        if lost != max(0, cap - obs):
            return f"lost_huge_2m {lost} != max(0, capacity {cap} - observed {obs})"
        if breakdown_total != lost:
            return f"breakdown sums to {breakdown_total}, not lost_huge_2m {lost}"
    if cap is not None and has("allowed_huge_2m") and e.allowed_huge_2m > cap:
        return f"allowed_huge_2m {e.allowed_huge_2m} exceeds capacity {cap}"
    return None
