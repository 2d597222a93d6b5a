"""Fleet state and the fleet view: latest state per host, staleness, rollups, verdicts. Domain only.

Memory: a host is kept as one compact summary with its per-host totals precomputed at ingest (values
hosts share, such as kernel release and labels, held once), and the rollups are running sums updated
as each report arrives, so a view walks neither VMs nor, for its sums, hosts (100,000 hosts x 20 VMs
must fit well under a GiB and scrape in under a second: bench/fleet_scale.py). Per-VM detail lives in
the durable store and on the agents' own /metrics.

Every host is in exactly one state: fresh, stale, departed (its agent closed its stream cleanly) or
invalid (its latest report cannot be evaluated: the problem is named in its summary). An invalid host
never enters the sums, so one absurd stored report costs only its own host and no view can fail on it.

Counting a host exactly once across replicas: a host counts on the replica that holds its live stream.
When its stream ends cleanly (the agent rotating to another replica, or shutting down) it leaves the
rollups at once; when the stream breaks it stays until it has been silent for the staleness bound,
because the agent is most likely coming back here.
"""

from __future__ import annotations

import heapq
import operator
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

from eptwatch.server.ingest.validate import EXPLAINED_CAUSES, ReportTotals, report_totals
from eptwatch.v1 import report_pb2 as pb

CAUSE_NAMES = {v: pb.Cause.Name(v).removeprefix("CAUSE_").lower() for v in pb.Cause.values()}
T = TypeVar("T")
ERA_NAMES = {v: pb.PredicateEra.Name(v).removeprefix("PREDICATE_ERA_").lower() for v in pb.PredicateEra.values()}


@dataclass(frozen=True, slots=True)
class HostSummary:
    host_id: str
    agent_instance: str
    sequence: int
    sample_time: float  # the agent's clock
    received: float  # this aggregator's clock: staleness is judged on it
    kernel_release: str
    era: int  # pb.PredicateEra
    labels: tuple[tuple[str, str], ...]
    agent_version: str
    vms: int
    capacity_2m: int  # sums over estimated VMs
    observed_2m: int
    lost_2m: int
    lost_explained_2m: int
    lost_unexplained_2m: int
    known_bug_vms: int
    causes: tuple[tuple[int, int], ...]  # (pb.Cause, VMs)
    spool_dropped_total: int = 0
    problem: str = ""  # why this report cannot be evaluated ("" for a valid one): the host is then invalid
    lost_by_cause: tuple[tuple[int, int], ...] = ()  # (pb.Cause, lost 2 MiB units), sorted; sums to lost_2m

    @property
    def lost_ratio(self) -> float | None:
        return self.lost_2m / self.capacity_2m if self.capacity_2m else None

    def label(self, key: str) -> str | None:
        for k, v in self.labels:
            if k == key:
                return v
        return None


# Bounds on what one host can hold. A real hypervisor has at most tens of TiB (~2^24 units of 2 MiB) and
# a few thousand VMs; a host beyond these is a broken or hostile report, not a measurement. With every
# counted host inside them, fleet sums stay far below 2^63 (the wire's uint64, SQLite's and Prometheus'
# exact integers) for any fleet size that fits in memory.
MAX_HOST_HUGE_2M = 1 << 32  # 8 PiB per host in 2 MiB units
MAX_HOST_VMS = 1 << 16
MAX_COUNT = (1 << 63) - 1  # counters from agents (spool drops), clamped to what every consumer can hold
# Timestamps a protobuf Timestamp (and its JSON form) can carry: 0001-01-01 .. 9999-12-31.
MIN_TIMESTAMP_SECONDS = -62135596800.0
MAX_TIMESTAMP_SECONDS = 253402300799.0


def summarise(r: pb.HostReport, received: float, spool_dropped_total: int = 0,
              totals: ReportTotals | None = None) -> HostSummary:
    """A host's summary from its report; `totals` from `check_report` when ingest already walked it.

    Never raises: a report that cannot be evaluated (from the store, written by an aggregator whose
    checks were looser, or by hand) gives a summary with `problem` set and zero sums, so its host is
    shown invalid, with the problem named, and never counted."""
    problem = ""
    try:
        t = totals if totals is not None else report_totals(r)
    except Exception as exc:  # noqa: BLE001 - any failure to evaluate one report costs only its host
        t, problem = _NO_TOTALS, f"cannot evaluate the report: {str(exc)[:300]}"
    sample_time = r.sample_time.seconds + r.sample_time.nanos / 1e9
    if not problem:
        problem = _implausible(t, sample_time)
    if not MIN_TIMESTAMP_SECONDS <= sample_time <= MAX_TIMESTAMP_SECONDS:
        sample_time = 0.0  # a value every reader can show; the problem names the real one
    if problem:
        t = _NO_TOTALS
    return HostSummary(
        host_id=r.host_id, agent_instance=r.agent_instance, sequence=r.sequence,
        sample_time=sample_time, received=received,
        kernel_release=_shared(r.kernel.release or "unknown"), era=int(r.kernel.era), labels=_shared(tuple(sorted(r.labels.items()))),
        agent_version=_shared(r.agent_version), vms=t.vms,
        capacity_2m=t.capacity_2m, observed_2m=t.observed_2m, lost_2m=t.lost_2m, lost_explained_2m=t.lost_explained_2m,
        lost_unexplained_2m=t.lost_unexplained_2m, known_bug_vms=dict(t.causes).get(pb.CAUSE_KNOWN_PAGE_CACHE_THP_BUG, 0),
        causes=_shared(t.causes), spool_dropped_total=min(max(spool_dropped_total, 0), MAX_COUNT), problem=problem,
        lost_by_cause=lost_by_cause(r, t),
    )


_NO_TOTALS = ReportTotals(0, 0, 0, 0, 0, 0, ())


def _implausible(t: ReportTotals, sample_time: float) -> str:
    """Why a report's totals cannot be a measurement, or "": numbers beyond the bounds above, or sums
    that contradict each other."""
    # The usual case in five comparisons (this runs for every report ingested). The sums are of uint64
    # fields, so never negative; explained and unexplained are parts of lost; a cause counts estimates.
    if (t.vms <= MAX_HOST_VMS and t.capacity_2m <= MAX_HOST_HUGE_2M and t.observed_2m <= MAX_HOST_HUGE_2M
            and t.lost_explained_2m + t.lost_unexplained_2m <= t.lost_2m <= t.capacity_2m
            and MIN_TIMESTAMP_SECONDS <= sample_time <= MAX_TIMESTAMP_SECONDS):
        return ""
    if not MIN_TIMESTAMP_SECONDS <= sample_time <= MAX_TIMESTAMP_SECONDS:
        return f"sample_time {sample_time!r} is not a date (years 1 to 9999)"
    if not 0 <= t.vms <= MAX_HOST_VMS:
        return f"{t.vms} VMs: at most {MAX_HOST_VMS} per host"
    for name in ("capacity_2m", "observed_2m", "lost_2m", "lost_explained_2m", "lost_unexplained_2m"):
        value = getattr(t, name)
        if not 0 <= value <= MAX_HOST_HUGE_2M:
            return f"{name} {value}: at most {MAX_HOST_HUGE_2M} (2 MiB units) per host"
    if t.lost_2m > t.capacity_2m:
        return f"lost_2m {t.lost_2m} exceeds capacity_2m {t.capacity_2m}"
    for cause, n in t.causes:
        if not 0 <= n <= MAX_HOST_VMS:
            return f"{n} VMs of cause {cause}: at most {MAX_HOST_VMS} per host"
    return ""


def lost_by_cause(r: pb.HostReport, t: ReportTotals) -> tuple[tuple[int, int], ...]:
    """The host's lost huge mappings per cause, from the loss breakdowns of the estimates that carry the
    loss (the same ones `report_totals` sums: the host-level estimate where it has a loss figure, else
    every VM's). The report passed the checks, so each breakdown sums to its estimate's loss (an invalid
    report's totals are zero: nothing is walked). Walked
    only when the totals leave the split open: a host without loss, or with unexplained loss only
    (most of a fleet), costs no protobuf access here."""
    if not t.lost_2m:
        return ()
    if t.lost_unexplained_2m == t.lost_2m:
        return ((pb.CAUSE_UNEXPLAINED, t.lost_2m),)
    he = r.host_estimate
    carriers = (he,) if r.HasField("host_estimate") and he.HasField("lost_huge_2m") else r.estimates
    sums: dict[int, int] = {}
    for e in carriers:
        if e.HasField("lost_huge_2m"):  # an estimate without a loss figure adds nothing to the totals
            for share in e.breakdown:
                if share.lost_huge_2m:
                    sums[share.cause] = sums.get(share.cause, 0) + share.lost_huge_2m
    return tuple(sorted(sums.items()))


_SHARED: dict[object, object] = {}
_SHARED_MAX = 1 << 16


def _shared(value: T) -> T:
    """One copy of a value many hosts have in common (kernel release, labels, agent version, causes):
    100,000 summaries then hold references, not 100,000 equal tuples and strings. Bounded: past
    _SHARED_MAX distinct values the table starts over (sharing saves memory, correctness never needs it)."""
    v = _SHARED.get(value)
    if v is None:
        if len(_SHARED) >= _SHARED_MAX:
            _SHARED.clear()
        v = _SHARED[value] = value
    return v  # type: ignore[return-value]


@dataclass(frozen=True)
class FleetConfig:
    stale_after_seconds: float = 120.0
    rollup_labels: tuple[str, ...] = ()
    top_n: int = 10
    # Regressed-kernel detection.
    min_hosts: int = 3  # evidence from fewer hosts is noise
    unexplained_ratio_threshold: float = 0.05  # unexplained loss / capacity
    margin_vs_best: float = 0.02  # unexplained loss worse than the best comparable kernel by this much
    min_capacity_2m: int = 1  # hosts with less capacity do not enter ratios or the worst-hosts list


@dataclass
class Rollup:
    hosts: int = 0
    vms: int = 0
    capacity_2m: int = 0
    observed_2m: int = 0
    lost_2m: int = 0
    lost_explained_2m: int = 0
    lost_unexplained_2m: int = 0
    known_bug_vms: int = 0
    spool_dropped: int = 0
    causes: Counter[int] = field(default_factory=Counter)
    lost_by_cause: Counter[int] = field(default_factory=Counter)  # pb.Cause -> lost 2 MiB units

    def add(self, h: HostSummary, sign: int = 1) -> None:
        """Adds a host's totals (sign -1: takes them away again; a cause count reaching 0 is dropped)."""
        self.hosts += sign
        self.vms += sign * h.vms
        self.capacity_2m += sign * h.capacity_2m
        self.observed_2m += sign * h.observed_2m
        self.lost_2m += sign * h.lost_2m
        self.lost_explained_2m += sign * h.lost_explained_2m
        self.lost_unexplained_2m += sign * h.lost_unexplained_2m
        self.known_bug_vms += sign * h.known_bug_vms
        self.spool_dropped += sign * h.spool_dropped_total
        _add_counts(self.causes, h.causes, sign)
        _add_counts(self.lost_by_cause, h.lost_by_cause, sign)

    def replace(self, old: HostSummary, new: HostSummary) -> None:
        """The same as add(old, -1) then add(new), in one pass: a host's next report replacing its last in
        the same rollup (the usual case, once per report ingested or followed). Causes are touched only
        where they changed, which a host's consecutive reports mostly do not."""
        self.vms += new.vms - old.vms
        self.capacity_2m += new.capacity_2m - old.capacity_2m
        self.observed_2m += new.observed_2m - old.observed_2m
        self.lost_2m += new.lost_2m - old.lost_2m
        self.lost_explained_2m += new.lost_explained_2m - old.lost_explained_2m
        self.lost_unexplained_2m += new.lost_unexplained_2m - old.lost_unexplained_2m
        self.known_bug_vms += new.known_bug_vms - old.known_bug_vms
        self.spool_dropped += new.spool_dropped_total - old.spool_dropped_total
        if old.causes != new.causes:
            _move_counts(self.causes, old.causes, new.causes)
        if old.lost_by_cause != new.lost_by_cause:
            _move_counts(self.lost_by_cause, old.lost_by_cause, new.lost_by_cause)

    def values(self) -> dict[str, object]:
        """The sums as constructor arguments (the causes copied): a snapshot of a running rollup."""
        return {"hosts": self.hosts, "vms": self.vms, "capacity_2m": self.capacity_2m, "observed_2m": self.observed_2m,
                "lost_2m": self.lost_2m, "lost_explained_2m": self.lost_explained_2m, "lost_unexplained_2m": self.lost_unexplained_2m,
                "known_bug_vms": self.known_bug_vms, "spool_dropped": self.spool_dropped, "causes": Counter(self.causes),
                "lost_by_cause": Counter(self.lost_by_cause)}

    @property
    def lost_ratio(self) -> float | None:
        return self.lost_2m / self.capacity_2m if self.capacity_2m else None

    @property
    def unexplained_ratio(self) -> float | None:
        return self.lost_unexplained_2m / self.capacity_2m if self.capacity_2m else None


VERDICT_OK = "ok"
VERDICT_REGRESSED = "regressed"
VERDICT_KNOWN_BAD = "known_bad"
VERDICT_INSUFFICIENT = "insufficient_hosts"


@dataclass
class KernelRollup(Rollup):
    kernel_release: str = ""
    era: int = 0
    verdict: str = VERDICT_OK
    known_bad: bool = False
    compared_to: str = ""  # the best comparable kernel, when that comparison decided
    compared_ratio: float | None = None
    evidence: str = ""

    @property
    def regressed(self) -> bool:
        return self.verdict == VERDICT_REGRESSED


STATUS_FRESH = "fresh"
STATUS_STALE = "stale"
STATUS_DEPARTED = "departed"
STATUS_INVALID = "invalid"
STATUSES = (STATUS_FRESH, STATUS_STALE, STATUS_DEPARTED, STATUS_INVALID)


@dataclass
class FleetView:
    generated_at: float
    config: FleetConfig
    total: Rollup
    hosts_stale: int
    hosts_departed: int
    kernels: list[KernelRollup]
    labels: dict[tuple[str, str], Rollup]
    worst_hosts: list[HostSummary]
    fresh: dict[str, HostSummary]
    stale: dict[str, HostSummary]
    newest_received: float | None
    oldest_fresh_received: float | None
    # The other two states; a host id is in exactly one of fresh, stale, departed and invalid.
    departed: dict[str, HostSummary] = field(default_factory=dict)
    invalid: dict[str, HostSummary] = field(default_factory=dict)
    # Indexes the read side derives from this view (hosts sorted by id, per kernel), built at most once
    # per view by whichever request needs them first.
    memo: dict[object, object] = field(default_factory=dict, repr=False, compare=False)


def judge_kernels(kernels: list[KernelRollup], cfg: FleetConfig) -> None:
    """Regressed: across >= min_hosts hosts, loss the model does not explain exceeds the threshold, or
    exceeds that of the best comparable kernel (same predicate era, itself with >= min_hosts) by the
    margin. Loss the model explains (the known bug, NX splits, the fix's false negatives) never makes a
    kernel regressed: the bug makes it known-bad, NX splits are host configuration.
    Known-bad: the model predicts the page-cache THP bug for this kernel's era. Both keep evidence."""
    best: dict[int, KernelRollup] = {}
    for k in kernels:
        if k.hosts >= cfg.min_hosts and k.unexplained_ratio is not None:
            b = best.get(k.era)
            if b is None or k.unexplained_ratio < (b.unexplained_ratio or 0.0):
                best[k.era] = k
    for k in kernels:
        k.known_bad = k.era == pb.PREDICATE_ERA_COMPOUND_MAP_UNFIXED
        reasons: list[str] = []
        if k.hosts >= cfg.min_hosts and k.capacity_2m >= cfg.min_capacity_2m:
            ur = k.unexplained_ratio or 0.0
            if ur > cfg.unexplained_ratio_threshold:
                reasons.append(f"unexplained loss {ur:.1%} of capacity over {k.hosts} hosts > {cfg.unexplained_ratio_threshold:.1%}")
            b = best.get(k.era)
            if b is not None and b is not k and b.unexplained_ratio is not None and ur - b.unexplained_ratio > cfg.margin_vs_best:
                reasons.append(f"unexplained loss {ur:.1%} vs {b.unexplained_ratio:.1%} on {b.kernel_release} "
                               f"({b.hosts} hosts, same era): worse by more than {cfg.margin_vs_best:.1%}")
                k.compared_to, k.compared_ratio = b.kernel_release, b.unexplained_ratio
        if reasons:
            k.verdict = VERDICT_REGRESSED
        elif k.known_bad:
            k.verdict = VERDICT_KNOWN_BAD
        elif k.hosts < cfg.min_hosts:
            k.verdict = VERDICT_INSUFFICIENT
        else:
            k.verdict = VERDICT_OK
        if k.known_bad:
            reasons.append(f"lacks 169226f7e0 (era {ERA_NAMES.get(k.era, k.era)}): {k.hosts} host(s) still run it, "
                           f"{k.known_bug_vms} VM(s) losing huge mappings to the bug")
        if not reasons:
            ratio = "n/a" if k.lost_ratio is None else f"{k.lost_ratio:.1%}"
            explained = ""
            if k.capacity_2m and k.lost_explained_2m:
                by = ", ".join(CAUSE_NAMES.get(c, str(c)) for c, n in sorted(k.lost_by_cause.items(), key=lambda cn: (-cn[1], cn[0]))
                               if c in EXPLAINED_CAUSES)
                explained = f", explained {k.lost_explained_2m / k.capacity_2m:.1%}" + (f" by {by}" if by else "")
            reasons.append(f"{k.hosts} host(s), loss ratio {ratio}{explained}, unexplained {(k.unexplained_ratio or 0.0):.1%}")
        k.evidence = "; ".join(reasons)


def _add_counts(counts: Counter[int], pairs: tuple[tuple[int, int], ...], sign: int) -> None:
    """Adds `sign` times each (cause, count) of `pairs` to `counts`; a count reaching 0 is dropped. Plain
    dict methods: Counter's own __missing__ and __delitem__ are Python functions."""
    for c, n in pairs:
        m = dict.get(counts, c, 0) + sign * n
        if m:
            counts[c] = m
        else:
            dict.pop(counts, c, None)


def _move_counts(counts: Counter[int], old: tuple[tuple[int, int], ...], new: tuple[tuple[int, int], ...]) -> None:
    """Takes `old`'s counts away from `counts` and adds `new`'s, as Rollup.add(old, -1) then add(new) do."""
    _add_counts(counts, old, -1)
    _add_counts(counts, new, 1)


_Snapshot = tuple[Rollup, list[KernelRollup], dict[tuple[str, str], Rollup]]


class Rollups:
    """Running sums over a set of hosts: the fleet total and per kernel and configured label value.
    Hosts are added and taken away one at a time, so a view never has to walk the whole fleet."""

    def __init__(self, rollup_labels: tuple[str, ...]) -> None:
        self.rollup_labels = rollup_labels
        self.total = Rollup()
        self.kernels: dict[tuple[str, int], Rollup] = {}
        self.labels: dict[tuple[str, str], Rollup] = {}

    def add(self, h: HostSummary, sign: int = 1) -> None:
        self.total.add(h, sign)
        _add_to(self.kernels, (h.kernel_release, h.era), h, sign)
        if self.rollup_labels:
            labels = self.labels
            for lk in self.rollup_labels:
                v = h.label(lk)
                if v is not None:
                    _add_to(labels, (lk, v), h, sign)

    def replace(self, old: HostSummary, new: HostSummary) -> None:
        """add(old, -1) then add(new) (a counted host's next report): one pass over each rollup both fall
        in (the same kernel, the same label values: the usual case), the two steps elsewhere."""
        if old is new:
            return
        self.total.replace(old, new)
        kernels = self.kernels
        key = (old.kernel_release, old.era)
        r = kernels.get(key)
        if r is not None and key == (new.kernel_release, new.era):
            r.replace(old, new)
        else:
            _add_to(kernels, key, old, -1)
            _add_to(kernels, (new.kernel_release, new.era), new, 1)
        if self.rollup_labels:
            labels = self.labels
            for lk in self.rollup_labels:
                v_old, v_new = old.label(lk), new.label(lk)
                r = labels.get((lk, v_old)) if v_old is not None else None
                if r is not None and v_old == v_new:
                    r.replace(old, new)
                    continue
                if v_old is not None:
                    _add_to(labels, (lk, v_old), old, -1)
                if v_new is not None:
                    _add_to(labels, (lk, v_new), new, 1)

    def snapshot(self) -> _Snapshot:
        """Copies for a view: kernels in version order (5.3 before 5.10), then era, not yet judged."""
        ordered = sorted(self.kernels.items(), key=lambda item: (kernel_version_key(item[0][0]), item[0][1]))
        kernels = [KernelRollup(kernel_release=rel, era=era, **r.values()) for (rel, era), r in ordered]  # type: ignore[arg-type]
        return (Rollup(**self.total.values()), kernels,  # type: ignore[arg-type]
                {k: Rollup(**r.values()) for k, r in self.labels.items()})  # type: ignore[arg-type]


def kernel_version_key(release: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key for kernel release strings: numeric runs compare as numbers, so 5.3 < 5.10 and
    6.6.15 < 6.18.2; text runs compare as text. Each part is tagged so numbers and text never compare
    with each other (a release is outside input: any string must sort without raising)."""
    parts: list[tuple[int, int | str]] = []
    for run in re.findall(r"[0-9]+|[^0-9]+", release):
        # A run of digits longer than any real version part is compared as text: bounded int().
        parts.append((0, int(run)) if run[0] in "0123456789" and len(run) <= 18 else (1, run))
    return tuple(parts)


def _add_to(rollups: dict, key: object, h: HostSummary, sign: int) -> None:  # type: ignore[type-arg]
    r = rollups.get(key)
    if r is None:
        r = rollups[key] = Rollup()
    r.add(h, sign)
    if not r.hosts:
        del rollups[key]  # no host left: the key leaves the rollups, as if never seen


def _rank(h: HostSummary) -> tuple[float, int, str]:
    return (-(h.lost_ratio or 0.0), -h.lost_2m, h.host_id)


def worst_hosts(hosts: Iterable[HostSummary], cfg: FleetConfig) -> list[HostSummary]:
    """Top-N hosts by loss ratio, then lost mappings, then host id: a bounded heap (the same order as a
    full sort, without sorting the fleet)."""
    min_cap = cfg.min_capacity_2m
    return heapq.nsmallest(cfg.top_n, (h for h in hosts if h.lost_2m > 0 and h.capacity_2m >= min_cap), key=_rank)


def _finish_view(now: float, cfg: FleetConfig, snapshot: _Snapshot, fresh: dict[str, HostSummary], stale: dict[str, HostSummary],
                 departed: dict[str, HostSummary], invalid: dict[str, HostSummary]) -> FleetView:
    total, kernels, labels = snapshot
    judge_kernels(kernels, cfg)
    newest = oldest = None
    if fresh:
        received = list(map(_RECEIVED, fresh.values()))
        newest, oldest = max(received), min(received)
    return FleetView(now, cfg, total, len(stale), len(departed), kernels, labels, worst_hosts(fresh.values(), cfg), fresh, stale,
                     newest, oldest, departed=departed, invalid=invalid)


def host_status(v: FleetView, host_id: str) -> tuple[HostSummary, str] | None:
    """A host of the view and its state, or None if the view does not know it."""
    for status, pool in ((STATUS_FRESH, v.fresh), (STATUS_STALE, v.stale), (STATUS_DEPARTED, v.departed),
                         (STATUS_INVALID, v.invalid)):
        h = pool.get(host_id)
        if h is not None:
            return h, status
    return None


_RECEIVED = operator.attrgetter("received")


def build_view(hosts: Iterable[HostSummary], departed: set[str], now: float, cfg: FleetConfig) -> FleetView:
    """The view of a set of hosts from scratch (FleetState keeps the same sums up to date as reports
    arrive instead)."""
    fresh: dict[str, HostSummary] = {}
    stale: dict[str, HostSummary] = {}
    gone: dict[str, HostSummary] = {}
    invalid: dict[str, HostSummary] = {}
    for h in hosts:
        if h.host_id in departed:
            gone[h.host_id] = h
        elif h.problem:
            invalid[h.host_id] = h
        elif now - h.received > cfg.stale_after_seconds:
            stale[h.host_id] = h
        else:
            fresh[h.host_id] = h
    rollups = Rollups(cfg.rollup_labels)
    for h in fresh.values():
        rollups.add(h)
    return _finish_view(now, cfg, rollups.snapshot(), fresh, stale, gone, invalid)


class FleetState:
    """Latest summary per host plus which hosts hold a live stream. Written from the event loop, read
    from HTTP threads: readers get immutable summaries and a view that is rebuilt at most every
    `max_view_age` seconds.

    The rollups are kept up to date as reports arrive: a host counts while it is neither departed nor
    stale, and leaves (or re-enters) the sums as that changes. Staleness is judged when a view is built:
    a heap of (received, host) finds the hosts that went silent since the last view without walking the
    fleet. A view then costs copies of the rollups and of the host table, and a bounded top-N pass."""

    def __init__(self, cfg: FleetConfig = FleetConfig(), clock: Callable[[], float] = time.time, max_view_age: float = 1.0,
                 on_departed: Callable[[str, float | None], None] | None = None) -> None:
        self.cfg = cfg
        # Told (under the lock: it must only queue) when a host departs (host, time) or returns (host, None),
        # so that departures can be made durable off the ingest path.
        self._on_departed = on_departed
        self._clock = clock
        self._hosts: dict[str, HostSummary] = {}
        self._departed: set[str] = set()
        self._invalid: set[str] = set()  # latest report cannot be evaluated (HostSummary.problem); never counted
        self._stale: set[str] = set()  # judged stale at the last view (never departed ones)
        self._streams: dict[str, int] = {}  # host -> live streams carrying it
        self._rollups = Rollups(cfg.rollup_labels)  # over counted hosts: neither departed nor stale
        self._by_received: list[tuple[float, str]] = []  # heap; entries of replaced reports are dropped lazily
        self._last_now: float | None = None
        self._lock = threading.Lock()
        self._view: FleetView | None = None
        self._max_view_age = max_view_age

    def _counted(self, host_id: str) -> bool:
        return (host_id in self._hosts and host_id not in self._departed and host_id not in self._stale
                and host_id not in self._invalid)

    def _count(self, h: HostSummary) -> None:
        """Enter a host into the sums; it stays until a view finds it stale (or its stream departs)."""
        self._rollups.add(h)
        heapq.heappush(self._by_received, (h.received, h.host_id))
        if len(self._by_received) > 2 * len(self._hosts) + 1024:
            self._compact()

    def _compact(self) -> None:
        self._by_received = [(h.received, k) for k, h in self._hosts.items() if self._counted(k)]
        heapq.heapify(self._by_received)

    def put(self, summary: HostSummary, tell_return: bool = True) -> None:
        """A host's newest report. It is back if it had departed; `tell_return=False` when that is known
        to the store already (a change followed from a shared store)."""
        with self._lock:
            host_id = summary.host_id
            old = self._hosts.get(host_id)
            counted = old if old is not None and self._counted(host_id) else None  # in the sums now
            # An invalid report never holds back a later valid one (its sample time may be the absurd part).
            current = old
            if old is None or summary.sample_time >= old.sample_time or old.problem:
                current = self._hosts[host_id] = summary
            assert current is not None
            self._returned(host_id, tell_return)
            self._stale.discard(host_id)  # judged again at the next view, on the kept report's receive time
            if current.problem:
                if counted is not None:
                    self._rollups.add(counted, -1)
                self._invalid.add(host_id)
            else:
                self._invalid.discard(host_id)
                if counted is not None:
                    # Out of the sums and in again in one pass (what _count does, but for the heap below).
                    self._rollups.replace(counted, current)
                else:
                    self._rollups.add(current)
                heapq.heappush(self._by_received, (current.received, host_id))
                if len(self._by_received) > 2 * len(self._hosts) + 1024:
                    self._compact()
            self._view = None

    def _returned(self, host_id: str, tell: bool = True) -> None:
        """The host reports here again: no longer departed. Called with the lock held."""
        if host_id in self._departed:
            self._departed.discard(host_id)
            if tell and self._on_departed is not None:
                self._on_departed(host_id, None)

    def _depart(self, host_id: str) -> None:
        """Show a known host as departed and take it out of the rollups. Called with the lock held."""
        if host_id in self._hosts and host_id not in self._departed:
            if self._counted(host_id):
                self._rollups.add(self._hosts[host_id], -1)
            self._stale.discard(host_id)
            self._departed.add(host_id)

    def _count_again(self, host_id: str) -> None:
        """A host just taken off the departed: back in the rollups (unless its report is invalid). Lock held."""
        h = self._hosts.get(host_id)
        if h is not None and host_id not in self._invalid:
            self._count(h)

    def mark_departed(self, host_ids: Iterable[str]) -> None:
        """Hosts known to have departed (loaded from the store at start-up): shown as departed, not counted,
        until they report again. Not told to `on_departed`: they are durable already."""
        with self._lock:
            for h in host_ids:
                self._depart(h)
            self._view = None

    def stream_carries(self, host_id: str) -> None:
        with self._lock:
            n = self._streams.get(host_id, 0)
            self._streams[host_id] = n + 1
            if host_id in self._departed:
                self._returned(host_id)
                self._count_again(host_id)
                self._view = None
            if n == 0:
                self._first_stream(host_id)

    def stream_ended(self, host_ids: Iterable[str], clean: bool) -> None:
        with self._lock:
            for h in host_ids:
                n = self._streams.get(h, 0) - 1
                if n > 0:
                    self._streams[h] = n
                    continue
                self._streams.pop(h, None)
                if clean and h in self._hosts:
                    self._last_stream_closed(h)  # the agent closed its stream: it moves on or shuts down
            self._view = None

    def _first_stream(self, host_id: str) -> None:
        """A stream started carrying a host that no stream here carried. Lock held. (A shared store's
        fleet tells the store: SharedFleetState.)"""

    def _last_stream_closed(self, host_id: str) -> None:
        """The last stream carrying a known host here ended cleanly: it departed. Lock held."""
        if host_id not in self._departed:
            self._depart(host_id)
            if self._on_departed is not None:
                self._on_departed(host_id, self._clock())

    def hosts(self) -> dict[str, HostSummary]:
        with self._lock:
            return dict(self._hosts)

    def get(self, host_id: str) -> HostSummary | None:
        with self._lock:
            return self._hosts.get(host_id)

    def __len__(self) -> int:
        return len(self._hosts)

    def _judge_staleness(self, now: float) -> None:
        """Moves hosts silent for longer than the bound out of the sums. Called with the lock held."""
        bound = self.cfg.stale_after_seconds
        if self._last_now is not None and now < self._last_now:
            # The clock went back: hosts judged stale may be fresh again.
            for k in [k for k in self._stale if not now - self._hosts[k].received > bound]:
                self._stale.discard(k)
                self._count(self._hosts[k])
        self._last_now = now
        heap = self._by_received
        while heap and now - heap[0][0] > bound:
            received, host_id = heapq.heappop(heap)
            h = self._hosts.get(host_id)
            if h is not None and h.received == received and self._counted(host_id):
                self._rollups.add(h, -1)
                self._stale.add(host_id)

    def view(self) -> FleetView:
        with self._lock:
            now = self._clock()  # read under the lock: concurrent views see the clock in order
            v = self._view
            if v is not None and now - v.generated_at < self._max_view_age:
                return v
            self._judge_staleness(now)
            fresh = dict(self._hosts)
            stale = {k: fresh.pop(k) for k in self._stale}
            departed = {k: fresh.pop(k) for k in self._departed if k in fresh}
            invalid = {k: fresh.pop(k) for k in self._invalid if k in fresh}  # departed wins: the agent left
            snapshot = self._rollups.snapshot()
        # Outside the lock: the copies are this view's own.
        v = _finish_view(now, self.cfg, snapshot, fresh, stale, departed, invalid)
        with self._lock:
            self._view = v
        return v
