"""The host page at `/hosts/{host_id}`: one host's VMs, estimates, causes and source statuses, from the
same data as `/api/v1/hosts/{id}` (the fleet view's summary and the stored latest report), rendered
server-side. Every string here came from an agent: all of it is escaped."""

from __future__ import annotations

import time
from collections.abc import Iterable
from urllib.parse import quote, unquote

from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

from eptwatch.server.faces.page import _age, _pct, _utc, cause_name, causes_cell, e, page, table
from eptwatch.server.faces.query import host_detail
from eptwatch.server.fleet.state import ERA_NAMES, FleetView, HostSummary, host_status
from eptwatch.server.store.base import LatestReports
from eptwatch.v1 import query_pb2 as q
from eptwatch.v1 import report_pb2 as pb

MIB = 1 << 20
MAX_ID_SHOWN = 200  # characters of an unknown host id echoed on the 404 page


def _enum(enum: EnumTypeWrapper, value: int, prefix: str) -> str:
    """An enum value's short name; a value this aggregator does not know (a newer agent) by number."""
    try:
        return str(enum.Name(value)).removeprefix(prefix).lower()
    except ValueError:
        return f"unknown ({value})"


def _opt(msg: object, name: str) -> str:
    """An optional number, or "unset" (never a 0 that was not sent)."""
    return str(getattr(msg, name)) if msg.HasField(name) else '<span class="muted">unset</span>'  # type: ignore[attr-defined]


def _sources_rows(owner: str, sources: Iterable[pb.SourceStatus]) -> list[str]:
    rows = []
    for s in sources:
        state = _enum(pb.SourceState, s.state, "SOURCE_STATE_")
        rows.append(f'<tr><td>{e(owner)}</td><td>{e(s.source)}</td><td class="state-{e(state)}">{e(state)}</td>'
                    f"<td>{e(s.reason)}</td><td>{e(s.path)}</td></tr>")
    return rows


def _estimate_row(est: pb.VmEstimate, vm_id: str) -> str:
    breakdown = [(share.cause, share.lost_huge_2m) for share in est.breakdown if share.lost_huge_2m]
    cap = est.host_huge_capacity_2m if est.HasField("host_huge_capacity_2m") else 0
    ratio = _pct(est.lost_ratio) if est.HasField("lost_ratio") else "n/a"
    uncertainty = "".join(f"<li>{e(u)}</li>" for u in est.uncertainty)
    return (f"<tr><td>{e(vm_id)}</td><td>{e(cause_name(est.cause))}</td><td class=num>{_opt(est, 'host_huge_capacity_2m')}</td>"
            f"<td class=num>{_opt(est, 'observed_huge_2m')}</td><td class=num>{_opt(est, 'allowed_huge_2m')}</td>"
            f"<td class=num>{_opt(est, 'lost_huge_2m')}</td><td class=num>{ratio}</td><td>{causes_cell(breakdown, cap)}</td>"
            f"<td>{e(est.explanation)}{f'<ul class=muted>{uncertainty}</ul>' if uncertainty else ''}</td></tr>")


def _vm_row(vm: pb.VmSample) -> str:
    kvm = vm.kvm
    counters = ", ".join(f"{n}={getattr(kvm, n)}" for n in ("pages_4k", "pages_2m", "pages_1g", "large_pages", "nx_lpage_splits")
                         if kvm.HasField(n))
    scope = _enum(pb.CounterScope, kvm.scope, "COUNTER_SCOPE_") if vm.HasField("kvm") else "none"
    thp = ("unknown" if not vm.HasField("thp_enabled_for_process") else "yes" if vm.thp_enabled_for_process else "no")
    huge_bytes = sum(m.anon_huge_bytes + m.shmem_pmd_mapped_bytes + m.file_pmd_mapped_bytes + m.hugetlb_bytes for m in vm.guest_ram)
    return (f"<tr><td>{e(vm.vm_id)}</td><td>{e(vm.name)}</td><td class=num>{vm.pid}</td><td class=num>{vm.guest_ram_bytes // MIB}</td>"
            f"<td class=num>{huge_bytes // MIB}</td><td>{e(_enum(pb.SmapsMode, vm.smaps_mode, 'SMAPS_MODE_'))}</td>"
            f"<td>{e(', '.join(vm.discovered_by))}</td><td>{e(thp)}</td><td>{e(scope)} {e(kvm.naming)}<br>"
            f'<span class="muted">{e(counters)}</span></td></tr>')


def render_host_page(detail: q.HostDetail, summary: HostSummary | None, now: float | None = None,
                     title: str = "eptwatch fleet") -> str:
    """`summary` is the fleet view's summary of the host (for the loss per cause), when it has one."""
    now = time.time() if now is None else now
    s = detail.summary
    r = detail.latest_report
    host_id = s.host_id
    state = s.status or ("stale" if s.stale else "fresh")
    received = s.received.seconds + s.received.nanos / 1e9
    sample_time = s.sample_time.seconds + s.sample_time.nanos / 1e9
    labels = ", ".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
    facts = [
        ("state", state), ("kernel", s.kernel_release), ("era", ERA_NAMES.get(s.era, str(s.era))),
        ("era basis", r.kernel.era_basis), ("kernel version", r.kernel.version), ("machine", r.kernel.machine),
        ("labels", labels), ("agent", f"{s.agent_version} (instance {s.agent_instance}, report {s.sequence})"),
        ("last report", f"{_age(received, now)} (received {_utc(received)}, sampled {_utc(sample_time)})"),
        ("THP", f"enabled {r.thp.enabled or '?'}, shmem {r.thp.shmem_enabled or '?'}, defrag {r.thp.defrag or '?'}, "
                f"nx_huge_pages {r.thp.nx_huge_pages or '?'}, itlb_multihit {r.thp.itlb_multihit or '?'}"),
    ]
    fact_rows = [f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in facts]
    by_cause = ", ".join(f"{c} {n}" for c, n in sorted(s.vms_by_cause.items()))  # cause names already
    ratio = _pct(s.lost_ratio) if s.HasField("lost_ratio") else "n/a"
    est_rows = [_estimate_row(est, est.vm_id) for est in r.estimates]
    if r.HasField("host_estimate"):
        est_rows.append(_estimate_row(r.host_estimate, "(host: VMs sharing the global counter)"))
    source_rows = _sources_rows("host", r.sources)
    for vm in r.vms:
        source_rows += _sources_rows(vm.vm_id, vm.sources)
    missing = "" if detail.HasField("latest_report") else \
        '<p class="alert known_bad">The latest report of this host is not in the store: only its summary is shown.</p>'
    if s.problem:  # an invalid host, or a stored report that does not decode: named, never shown as healthy
        missing += f'<p class="alert regressed" id="problem">Not counted: {e(s.problem)}</p>'
    body = f"""<p class="muted"><a href="/">&larr; fleet</a></p>
<h1 id="host-id">Host {e(host_id)}</h1>
{missing}
<div class="summary" id="summary"><span><b>{s.vms}</b> VMs</span>
<span>lost huge mappings <b>{s.lost_huge_2m}</b> of <b>{s.host_huge_capacity_2m}</b> ({ratio})</span>
<span>unexplained <b>{s.lost_unexplained_2m}</b></span><span>VMs by cause: {e(by_cause) or 'none'}</span></div>
{table("host-facts", ["", ""], fact_rows, "")}
<h2>Loss by cause</h2>
<div id="host-causes">{causes_cell(summary.lost_by_cause, s.host_huge_capacity_2m) if summary is not None else
                         '<span class="muted">not known: the fleet view holds no summary of this host</span>'}</div>
<h2>Estimates</h2>
{table("estimates", ["VM", "cause", "capacity 2M", "observed 2M", "allowed 2M", "lost 2M", "loss", "loss by cause", "explanation"],
       est_rows, "No estimates in the latest report.")}
<h2>VMs</h2>
{table("vms", ["VM", "name", "pid", "guest RAM MiB", "huge MiB", "smaps", "found by", "THP", "KVM counters"],
       [_vm_row(vm) for vm in r.vms], "No VMs in the latest report.")}
<h2>Sources</h2>
{table("sources", ["of", "source", "state", "reason", "path"], source_rows, "No source statuses in the latest report.")}
<p class="muted">Machine-readable:
<a href="/api/v1/hosts/{e(quote(host_id, safe=''))}">/api/v1/hosts/{e(host_id)}</a></p>"""
    return page(f"{host_id} - {title}", body)


def render_host_not_found(host_id: str, title: str = "eptwatch fleet") -> str:
    shown = host_id[:MAX_ID_SHOWN] + ("..." if len(host_id) > MAX_ID_SHOWN else "")
    body = f"""<p class="muted"><a href="/">&larr; fleet</a></p>
<h1>No such host</h1>
<p id="not-found">This aggregator holds no fresh or stale host <code>{e(shown)}</code>.
Hosts it knows: <a href="/api/v1/hosts?status=all">/api/v1/hosts?status=all</a>.</p>"""
    return page(f"no such host - {title}", body)


HTML = "text/html; charset=utf-8"


def host_page_response(v: FleetView, reader: LatestReports, raw_id: str, title: str = "eptwatch fleet") -> tuple[int, str, bytes]:
    """GET /hosts/{raw_id}: the id arrives URL-quoted (the fleet page quotes every link it makes)."""
    host_id = unquote(raw_id)
    d = host_detail(v, reader, host_id)
    if d is None:
        return 404, HTML, render_host_not_found(host_id, title).encode()
    found = host_status(v, host_id)
    summary = found[0] if found is not None else None
    return 200, HTML, render_host_page(d, summary, title=title).encode()
