"""The read side: FleetView -> query messages, filters, and the gRPC Query servicer.

HTTP JSON and gRPC answer from the same functions, so the two can never disagree.
"""

from __future__ import annotations

import asyncio
import operator
from collections.abc import Callable
from typing import cast

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from eptwatch.server.fleet.state import (
    CAUSE_NAMES,
    ERA_NAMES,
    STATUS_DEPARTED,
    STATUS_FRESH,
    STATUS_INVALID,
    STATUS_STALE,
    STATUSES,
    FleetView,
    HostSummary,
    KernelRollup,
    Rollup,
    host_status,
)
from eptwatch.server.store.base import LatestReports
from eptwatch.v1 import query_pb2 as q
from eptwatch.v1 import query_pb2_grpc

VERDICTS = {"ok": q.KERNEL_VERDICT_OK, "regressed": q.KERNEL_VERDICT_REGRESSED, "known_bad": q.KERNEL_VERDICT_KNOWN_BAD,
            "insufficient_hosts": q.KERNEL_VERDICT_INSUFFICIENT_HOSTS}
ERA_BY_NAME = {v: k for k, v in ERA_NAMES.items() if v != "unspecified"}
CAUSE_BY_NAME = {v: k for k, v in CAUSE_NAMES.items() if v != "unspecified"}
MAX_LIMIT = 10000
MAX_OFFSET = (1 << 32) - 1  # ListHostsRequest.offset is a uint32
MAX_FILTER_CHARS = 256  # kernel release, label and cause filters: longer cannot match anything stored
MAX_LABEL_FILTERS = 64  # as many as a host may carry (validate.MAX_LABELS)
_UINT64_MAX = (1 << 64) - 1
MAX_MEMO = 64  # derived host lists kept per view


class QueryError(ValueError):
    """A bad filter: answered with 400 / INVALID_ARGUMENT, naming the parameter."""


def _ts(seconds: float | None) -> Timestamp:
    t = Timestamp()
    if seconds is not None:
        t.FromNanoseconds(int(seconds * 1e9))
    return t


def _u64(n: int) -> int:
    """A count as the wire's uint64 can carry it. Counted hosts are bounded (fleet.MAX_HOST_HUGE_2M), so
    this never bites in practice; it is why a sum can never make a view unanswerable."""
    return 0 if n < 0 else n if n <= _UINT64_MAX else _UINT64_MAX


def rollup_pb(r: Rollup) -> q.Rollup:
    msg = q.Rollup(hosts=_u64(r.hosts), vms=_u64(r.vms), host_huge_capacity_2m=_u64(r.capacity_2m), observed_huge_2m=_u64(r.observed_2m),
                   lost_huge_2m=_u64(r.lost_2m), lost_explained_2m=_u64(r.lost_explained_2m),
                   lost_unexplained_2m=_u64(r.lost_unexplained_2m), known_bug_vms=_u64(r.known_bug_vms),
                   vms_by_cause={CAUSE_NAMES[c]: _u64(n) for c, n in r.causes.items() if c in CAUSE_NAMES},
                   lost_by_cause_2m={CAUSE_NAMES[c]: _u64(n) for c, n in r.lost_by_cause.items() if c in CAUSE_NAMES and n})
    if r.lost_ratio is not None:
        msg.lost_ratio = r.lost_ratio
    return msg


def kernel_pb(k: KernelRollup) -> q.KernelRollup:
    msg = q.KernelRollup(kernel_release=k.kernel_release, era=k.era, rollup=rollup_pb(k), verdict=VERDICTS[k.verdict],  # type: ignore[arg-type]
                         regressed=k.regressed, known_bad=k.known_bad, compared_to=k.compared_to, evidence=k.evidence)
    if k.compared_ratio is not None:
        msg.compared_lost_ratio = k.compared_ratio
    return msg


def host_pb(h: HostSummary, status: str) -> q.HostSummary:
    msg = q.HostSummary(
        host_id=h.host_id, kernel_release=h.kernel_release, era=h.era, labels=dict(h.labels),  # type: ignore[arg-type]
        stale=status == STATUS_STALE, status=status, problem=h.problem,
        sample_time=_ts(h.sample_time), received=_ts(h.received), vms=_u64(h.vms), host_huge_capacity_2m=_u64(h.capacity_2m),
        observed_huge_2m=_u64(h.observed_2m), lost_huge_2m=_u64(h.lost_2m), lost_unexplained_2m=_u64(h.lost_unexplained_2m),
        vms_by_cause={CAUSE_NAMES[c]: _u64(n) for c, n in h.causes if c in CAUSE_NAMES}, agent_version=h.agent_version,
        agent_instance=h.agent_instance, sequence=_u64(h.sequence),
        lost_by_cause_2m={CAUSE_NAMES[c]: _u64(n) for c, n in h.lost_by_cause if c in CAUSE_NAMES and n},
    )
    if h.lost_ratio is not None:
        msg.lost_ratio = h.lost_ratio
    return msg


def fleet_pb(v: FleetView) -> q.FleetSummary:
    return q.FleetSummary(
        generated_at=_ts(v.generated_at), total=rollup_pb(v.total), hosts_stale=v.hosts_stale, hosts_departed=v.hosts_departed,
        hosts_invalid=len(v.invalid),
        kernels=[kernel_pb(k) for k in v.kernels],
        labels=[q.LabelRollup(label=k, value=val, rollup=rollup_pb(r)) for (k, val), r in sorted(v.labels.items())],
        worst_hosts=[host_pb(h, STATUS_FRESH) for h in v.worst_hosts], newest_report=_ts(v.newest_received),
        oldest_fresh_report=_ts(v.oldest_fresh_received), stale_after_seconds=v.config.stale_after_seconds,
    )


def _bounded_filter(name: str, value: str) -> None:
    if len(value) > MAX_FILTER_CHARS:
        raise QueryError(f"{name}: at most {MAX_FILTER_CHARS} characters, got {len(value)}")


def list_kernels(v: FleetView, req: q.ListKernelsRequest) -> q.ListKernelsResponse:
    _bounded_filter("era", req.era)
    _bounded_filter("verdict", req.verdict)
    if req.era and req.era not in ERA_BY_NAME:
        raise QueryError(f"era: expected one of {', '.join(sorted(ERA_BY_NAME))}, got {req.era!r}")
    if req.verdict and req.verdict not in VERDICTS:
        raise QueryError(f"verdict: expected one of {', '.join(sorted(VERDICTS))}, got {req.verdict!r}")
    out = [k for k in v.kernels if (not req.era or k.era == ERA_BY_NAME[req.era]) and (not req.verdict or k.verdict == req.verdict)]
    return q.ListKernelsResponse(kernels=[kernel_pb(k) for k in out])


def list_hosts(v: FleetView, req: q.ListHostsRequest) -> q.ListHostsResponse:
    _bounded_filter("status", req.status)
    _bounded_filter("kernel", req.kernel_release)
    _bounded_filter("cause", req.cause)
    status = req.status or STATUS_FRESH
    if status not in STATUSES and status != "all":
        raise QueryError(f"status: expected {', '.join(STATUSES)} or all, got {status!r}")
    if len(req.labels) > MAX_LABEL_FILTERS:
        raise QueryError(f"label: at most {MAX_LABEL_FILTERS} label filters, got {len(req.labels)}")
    wanted_labels: list[tuple[str, str]] = []
    for raw in req.labels:
        _bounded_filter("label", raw)
        key, sep, value = raw.partition("=")
        if not sep or not key:
            raise QueryError(f"label: expected key=value, got {raw!r}")
        wanted_labels.append((key, value))
    cause = None
    if req.cause:
        if req.cause not in CAUSE_BY_NAME:
            raise QueryError(f"cause: expected one of {', '.join(sorted(CAUSE_BY_NAME))}, got {req.cause!r}")
        cause = CAUSE_BY_NAME[req.cause]
    limit = req.limit or 100
    if not 0 < limit <= MAX_LIMIT:
        raise QueryError(f"limit: expected 1 to {MAX_LIMIT}, got {limit}")
    if not 0 <= req.offset <= MAX_OFFSET:
        raise QueryError(f"offset: expected 0 to {MAX_OFFSET}, got {req.offset}")
    rows = _sorted_rows(v, status, req.kernel_release)
    if wanted_labels or cause is not None:
        key = ("filtered", status, req.kernel_release, tuple(wanted_labels), cause)
        filtered = cast("list[HostSummary] | None", v.memo.get(key))
        if filtered is None:
            filtered = [h for h in rows
                        if all(h.label(k) == val for k, val in wanted_labels)
                        and (cause is None or any(c == cause and n for c, n in h.causes))]
            if len(v.memo) < MAX_MEMO:  # paging through one filter is cheap; arbitrary filters do not pile up
                v.memo[key] = filtered
        rows = filtered
    page = rows[req.offset: req.offset + limit]
    return q.ListHostsResponse(hosts=[host_pb(h, status if status != "all" else _status_in(v, h.host_id)) for h in page],
                               total=len(rows))


def _status_in(v: FleetView, host_id: str) -> str:
    found = host_status(v, host_id)
    return found[1] if found is not None else STATUS_FRESH


_HOST_ID = operator.attrgetter("host_id")


def _sorted_rows(v: FleetView, status: str, kernel_release: str) -> list[HostSummary]:
    """The hosts of a status, of one kernel release if given, sorted by host id. Derived at most once per
    view and shared by every request answered from it: grouping the fleet by kernel is one pass, and a
    kernel's hosts are sorted when first asked for. Lists of summaries only, no tuple per host: 100,000
    new long-lived containers would cost full garbage-collector passes."""
    key = ("hosts", status, kernel_release)
    rows = cast("list[HostSummary] | None", v.memo.get(key))
    if rows is not None:
        return rows
    if kernel_release:
        groups = cast("dict[str, list[HostSummary]] | None", v.memo.get(("by_kernel", status)))
        if groups is None:
            groups = {}
            for pool in _pools(v, status):
                for h in pool.values():
                    g = groups.get(h.kernel_release)
                    if g is None:
                        g = groups[h.kernel_release] = []
                    g.append(h)
            v.memo[("by_kernel", status)] = groups
        rows = sorted(groups.get(kernel_release, ()), key=_HOST_ID)
    else:
        rows = sorted((h for pool in _pools(v, status) for h in pool.values()), key=_HOST_ID)
    v.memo[key] = rows
    return rows


def _pools(v: FleetView, status: str) -> list[dict[str, HostSummary]]:
    # Host ids are unique across the states: one sort by id orders them all.
    by_status = {STATUS_FRESH: v.fresh, STATUS_STALE: v.stale, STATUS_DEPARTED: v.departed, STATUS_INVALID: v.invalid}
    if status == "all":
        return list(by_status.values())
    return [by_status[status]]


def host_detail(v: FleetView, reader: LatestReports, host_id: str) -> q.HostDetail | None:
    found = host_status(v, host_id)
    if found is None:
        return None
    h, status = found
    detail = q.HostDetail(summary=host_pb(h, status))
    try:
        report = reader.latest(host_id)
    except Exception as exc:  # noqa: BLE001 - a stored report that does not decode costs only its own detail
        detail.summary.problem = detail.summary.problem or f"stored report unreadable: {str(exc)[:200]}"
        return detail
    if report is not None:
        detail.latest_report.CopyFrom(report)
    return detail


class QueryServicer(query_pb2_grpc.QueryServicer):
    def __init__(self, view: Callable[[], FleetView], reader: LatestReports) -> None:
        self._view = view
        self._reader = reader

    async def _view_off_loop(self) -> FleetView:
        """The fleet view, rebuilt at most once a second, in a worker thread: at 100,000 hosts a rebuild
        takes ~100 ms, which the ingest streams sharing this event loop should not wait for."""
        return await asyncio.to_thread(self._view)

    async def GetFleet(self, request: q.GetFleetRequest, context: grpc.aio.ServicerContext) -> q.FleetSummary:
        return fleet_pb(await self._view_off_loop())

    async def ListKernels(self, request: q.ListKernelsRequest, context: grpc.aio.ServicerContext) -> q.ListKernelsResponse:
        try:
            return list_kernels(await self._view_off_loop(), request)
        except QueryError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise  # unreachable: abort raises

    async def ListHosts(self, request: q.ListHostsRequest, context: grpc.aio.ServicerContext) -> q.ListHostsResponse:
        try:
            return list_hosts(await self._view_off_loop(), request)
        except QueryError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise

    async def GetHost(self, request: q.GetHostRequest, context: grpc.aio.ServicerContext) -> q.HostDetail:
        # The latest report comes from SQLite: never on the event loop that also carries ingest.
        d = await asyncio.to_thread(host_detail, await self._view_off_loop(), self._reader, request.host_id)
        if d is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no host {request.host_id[:80]!r}")
        assert d is not None
        return d
