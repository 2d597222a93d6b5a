"""Fleet state and the fleet view: latest state per host, staleness, rollups, verdicts. Domain only.

Memory: a host is kept as one compact summary with its per-host totals precomputed at ingest, so a
rollup walks hosts, not VMs (100,000 hosts x 20 VMs must fit well under a GiB and scrape in under a
second). Per-VM detail lives in the durable store and on the agents' own /metrics.

Counting a host exactly once across replicas: a host counts on the replica that holds its live stream.
When its stream ends cleanly (the agent rotating to another replica, or shutting down) it leaves the
rollups at once; when the stream breaks it stays until it has been silent for the staleness bound,
because the agent is most likely coming back here.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from eptwatch.v1 import report_pb2 as pb

EXPLAINED_CAUSES = frozenset({pb.CAUSE_KNOWN_PAGE_CACHE_THP_BUG, pb.CAUSE_EXPECTED_FALSE_NEGATIVE, pb.CAUSE_NX_SPLIT})
CAUSE_NAMES = {v: pb.Cause.Name(v).removeprefix("CAUSE_").lower() for v in pb.Cause.values()}
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
    vms_estimated: int  # VMs with a loss estimate (capacity and observation both known)
    capacity_2m: int  # sums over estimated VMs
    observed_2m: int
    lost_2m: int
    lost_explained_2m: int
    lost_unexplained_2m: int
    known_bug_vms: int
    causes: tuple[tuple[int, int], ...]  # (pb.Cause, VMs)
    spool_dropped_total: int = 0

    @property
    def lost_ratio(self) -> float | None:
        return self.lost_2m / self.capacity_2m if self.capacity_2m else None

    def label(self, key: str) -> str | None:
        for k, v in self.labels:
            if k == key:
                return v
        return None


def summarise(r: pb.HostReport, received: float, spool_dropped_total: int = 0) -> HostSummary:
    estimates = list(r.estimates)
    # Several VMs sharing only a host-wide counter: the host-level estimate carries the loss.
    loss_rows = [r.host_estimate] if r.HasField("host_estimate") and r.host_estimate.HasField("lost_huge_2m") else estimates
    cap = obs = lost = explained = unexplained = estimated = 0
    for e in loss_rows:
        if not e.HasField("lost_huge_2m"):
            continue
        estimated += 1
        cap += e.host_huge_capacity_2m
        obs += e.observed_huge_2m
        lost += e.lost_huge_2m
        for s in e.breakdown:
            if s.cause in EXPLAINED_CAUSES:
                explained += s.lost_huge_2m
            elif s.cause == pb.CAUSE_UNEXPLAINED:
                unexplained += s.lost_huge_2m
    causes = Counter(int(e.cause) for e in estimates)
    return HostSummary(
        host_id=r.host_id, agent_instance=r.agent_instance, sequence=r.sequence,
        sample_time=r.sample_time.seconds + r.sample_time.nanos / 1e9, received=received,
        kernel_release=r.kernel.release or "unknown", era=int(r.kernel.era), labels=tuple(sorted(r.labels.items())),
        agent_version=r.agent_version, vms=len(estimates), vms_estimated=estimated if loss_rows is estimates else len(estimates),
        capacity_2m=cap, observed_2m=obs, lost_2m=lost, lost_explained_2m=explained, lost_unexplained_2m=unexplained,
        known_bug_vms=causes.get(pb.CAUSE_KNOWN_PAGE_CACHE_THP_BUG, 0), causes=tuple(sorted(causes.items())),
        spool_dropped_total=spool_dropped_total,
    )


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

    def add(self, h: HostSummary) -> None:
        self.hosts += 1
        self.vms += h.vms
        self.capacity_2m += h.capacity_2m
        self.observed_2m += h.observed_2m
        self.lost_2m += h.lost_2m
        self.lost_explained_2m += h.lost_explained_2m
        self.lost_unexplained_2m += h.lost_unexplained_2m
        self.known_bug_vms += h.known_bug_vms
        self.spool_dropped += h.spool_dropped_total
        for c, n in h.causes:
            self.causes[c] += n

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
    regressed: bool = False
    known_bad: bool = False
    compared_to: str = ""  # the best comparable kernel, when that comparison decided
    compared_ratio: float | None = None
    evidence: str = ""


@dataclass
class FleetView:
    generated_at: float
    config: FleetConfig
    total: Rollup
    hosts_stale: int
    hosts_departed: int
    kernels: list[KernelRollup]
    eras: dict[int, Rollup]
    labels: dict[tuple[str, str], Rollup]
    worst_hosts: list[HostSummary]
    fresh: dict[str, HostSummary]
    stale: dict[str, HostSummary]
    newest_received: float | None
    oldest_fresh_received: float | None

    def kernel(self, release: str) -> KernelRollup | None:
        return next((k for k in self.kernels if k.kernel_release == release), None)


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
        k.regressed = bool(reasons)
        if k.regressed:
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
            explained = f", explained {k.lost_explained_2m / k.capacity_2m:.1%}" if k.capacity_2m and k.lost_explained_2m else ""
            reasons.append(f"{k.hosts} host(s), loss ratio {ratio}{explained}, unexplained {(k.unexplained_ratio or 0.0):.1%}")
        k.evidence = "; ".join(reasons)


def build_view(hosts: Iterable[HostSummary], departed: set[str], now: float, cfg: FleetConfig) -> FleetView:
    fresh: dict[str, HostSummary] = {}
    stale: dict[str, HostSummary] = {}
    n_departed = 0
    for h in hosts:
        if h.host_id in departed:
            n_departed += 1
        elif now - h.received > cfg.stale_after_seconds:
            stale[h.host_id] = h
        else:
            fresh[h.host_id] = h
    total = Rollup()
    kernels: dict[tuple[str, int], KernelRollup] = {}
    eras: dict[int, Rollup] = {}
    labels: dict[tuple[str, str], Rollup] = {}
    for h in fresh.values():
        total.add(h)
        key = (h.kernel_release, h.era)
        k = kernels.get(key)
        if k is None:
            k = kernels[key] = KernelRollup(kernel_release=h.kernel_release, era=h.era)
        k.add(h)
        eras.setdefault(h.era, Rollup()).add(h)
        for lk in cfg.rollup_labels:
            v = h.label(lk)
            if v is not None:
                labels.setdefault((lk, v), Rollup()).add(h)
    klist = sorted(kernels.values(), key=lambda k: (k.kernel_release, k.era))
    judge_kernels(klist, cfg)
    ranked = [h for h in fresh.values() if h.capacity_2m >= cfg.min_capacity_2m and h.lost_2m > 0]
    ranked.sort(key=lambda h: (-(h.lost_ratio or 0.0), -h.lost_2m, h.host_id))
    received = [h.received for h in fresh.values()]
    return FleetView(now, cfg, total, len(stale), n_departed, klist, eras, labels, ranked[: cfg.top_n], fresh, stale,
                     max(received, default=None), min(received, default=None))


class FleetState:
    """Latest summary per host plus which hosts hold a live stream. Written from the event loop, read
    from HTTP threads: readers get immutable summaries and a view that is rebuilt at most every
    `max_view_age` seconds."""

    def __init__(self, cfg: FleetConfig = FleetConfig(), clock: Callable[[], float] = time.time, max_view_age: float = 1.0) -> None:
        self.cfg = cfg
        self._clock = clock
        self._hosts: dict[str, HostSummary] = {}
        self._departed: set[str] = set()
        self._streams: dict[str, int] = {}  # host -> live streams carrying it
        self._lock = threading.Lock()
        self._view: FleetView | None = None
        self._max_view_age = max_view_age

    def put(self, summary: HostSummary) -> None:
        with self._lock:
            current = self._hosts.get(summary.host_id)
            if current is None or summary.sample_time >= current.sample_time:
                self._hosts[summary.host_id] = summary
            self._departed.discard(summary.host_id)
            self._view = None

    def stream_carries(self, host_id: str) -> None:
        with self._lock:
            self._streams[host_id] = self._streams.get(host_id, 0) + 1
            self._departed.discard(host_id)

    def stream_ended(self, host_ids: Iterable[str], clean: bool) -> None:
        with self._lock:
            for h in host_ids:
                n = self._streams.get(h, 0) - 1
                if n > 0:
                    self._streams[h] = n
                    continue
                self._streams.pop(h, None)
                if clean and h in self._hosts:
                    self._departed.add(h)  # the agent closed its stream: it moves on or shuts down
            self._view = None

    def hosts(self) -> dict[str, HostSummary]:
        with self._lock:
            return dict(self._hosts)

    def get(self, host_id: str) -> HostSummary | None:
        with self._lock:
            return self._hosts.get(host_id)

    def __len__(self) -> int:
        return len(self._hosts)

    def view(self) -> FleetView:
        now = self._clock()
        with self._lock:
            v = self._view
            if v is not None and now - v.generated_at < self._max_view_age:
                return v
            hosts = list(self._hosts.values())
            departed = set(self._departed)
        v = build_view(hosts, departed, now, self.cfg)
        with self._lock:
            self._view = v
        return v
