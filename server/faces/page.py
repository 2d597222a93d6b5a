"""The fleet page at `/`: server-rendered HTML with an inline SVG chart; no JavaScript, no CDN.

Everything shown that came from an agent (host ids, kernel releases, labels) is outside input: it is
HTML-escaped wherever it is written, and URL-quoted where it becomes part of a link.
"""

from __future__ import annotations

import heapq
import html
import time
from collections.abc import Iterable, Mapping
from typing import cast
from urllib.parse import quote

from eptwatch.server.fleet.state import (
    CAUSE_NAMES,
    ERA_NAMES,
    STATUS_DEPARTED,
    STATUS_INVALID,
    STATUS_STALE,
    VERDICT_KNOWN_BAD,
    VERDICT_REGRESSED,
    FleetView,
    HostSummary,
    Rollup,
    worst_hosts,
)
from eptwatch.server.ingest.validate import EXPLAINED_CAUSES
from eptwatch.v1 import report_pb2 as pb

COLOURS = {VERDICT_REGRESSED: "#c62828", VERDICT_KNOWN_BAD: "#ef6c00"}
DEFAULT_COLOUR = "#2e7d32"
QUIET_COLOUR = "#90a4ae"
# Worst hosts are listed per kernel verdict in this order; every other verdict falls in the last group.
VERDICT_GROUPS: tuple[tuple[str, str], ...] = ((VERDICT_REGRESSED, "Regressed kernels"), (VERDICT_KNOWN_BAD, "Known-bad kernels"),
                                               ("", "Other kernels"))
# Host states outside the sums, listed by name and last report (a new state is one more name here).
ABSENT_STATES: tuple[str, ...] = (STATUS_STALE, STATUS_DEPARTED, STATUS_INVALID)
MAX_ABSENT_ROWS = 50  # the rest are in /api/v1/hosts?status=...
MAX_LABEL_ROWS = 200  # rollup labels are bounded by configuration; this only bounds the page

e = html.escape

STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; }
h1 { margin: 0 0 4px 0; font-size: 22px; overflow-wrap: anywhere; } h2 { font-size: 16px; margin-top: 28px; }
h3 { font-size: 14px; margin: 16px 0 6px 0; }
.summary span { display: inline-block; margin-right: 18px; }
.alert { padding: 8px 12px; margin: 10px 0; border-radius: 4px; overflow-wrap: anywhere; }
.alert.regressed { background: #ffebee; border-left: 5px solid #c62828; }
.alert.known_bad { background: #fff3e0; border-left: 5px solid #ef6c00; }
.tablewrap { max-width: 100%; overflow-x: auto; }
table { border-collapse: collapse; font-size: 13px; width: 100%; }
td, th { border-bottom: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; overflow-wrap: break-word; }
td.id { overflow-wrap: anywhere; min-width: 5em; }
tr.evidence td { padding-top: 0; } tr:has(+ tr.evidence) td { border-bottom: none; }
@media (max-width: 1000px) { td, th { padding: 3px 4px; } body { margin: 12px; } }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.regressed td.verdict { color: #c62828; font-weight: bold; } tr.known_bad td.verdict { color: #ef6c00; font-weight: bold; }
ul.causes { list-style: none; margin: 0; padding: 0; } ul.causes li { margin-bottom: 2px; }
.cause.unexplained b { color: #c62828; } .cause.explained b { color: #2e7d32; }
.state-error, .state-unavailable { color: #c62828; } .state-ok { color: #2e7d32; }
.muted { color: #666; font-size: 12px; }
svg { max-width: 100%; height: auto; }
"""


def _age(seconds: float | None, now: float) -> str:
    if seconds is None:
        return "never"
    d = max(0.0, now - seconds)
    return f"{d:.0f} s ago" if d < 120 else f"{d / 60:.0f} min ago" if d < 7200 else f"{d / 3600:.1f} h ago"


def _utc(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))
    except (OverflowError, OSError, ValueError):  # an agent's clock: any number must render
        return f"{seconds!r} (not a date)"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def breakable(name: str) -> str:
    """Escaped, with a line-break opportunity after each '_' (era, verdict and cause names are long words)."""
    return e(name).replace("_", "_<wbr>")


def host_href(host_id: str) -> str:
    """The host page's link, quoted for the URL (every character but unreserved ones) and for HTML."""
    return e("/hosts/" + quote(host_id, safe=""))


def cause_name(cause: int) -> str:
    return CAUSE_NAMES.get(cause, f"cause {cause}")


def causes_cell(lost_by_cause: Iterable[tuple[int, int]], capacity_2m: int) -> str:
    """Lost huge mappings per cause, largest first: the share of capacity and whether the model explains it."""
    items = sorted(lost_by_cause, key=lambda cn: (-cn[1], cn[0]))
    if not items:
        return '<span class="muted">none lost</span>'
    li = []
    for c, n in items:
        kind = "explained" if c in EXPLAINED_CAUSES else "unexplained" if c == pb.CAUSE_UNEXPLAINED else "other"
        share = _pct(n / capacity_2m) if capacity_2m else "n/a"
        note = "" if kind == "unexplained" else f", {kind}"
        li.append(f'<li class="cause {kind}" data-cause="{e(cause_name(c))}">{breakable(cause_name(c))} <b>{share}</b> '
                  f'<span class="muted">{n}&nbsp;&times;&nbsp;2M{note}</span></li>')
    return f'<ul class="causes">{"".join(li)}</ul>'


def main_cause(r: Rollup) -> str:
    """The cause of most of a rollup's loss, for the chart's label ("" when nothing is lost)."""
    if not r.lost_by_cause:
        return ""
    c, _ = min(r.lost_by_cause.items(), key=lambda cn: (-cn[1], cn[0]))
    return cause_name(c)


def worst_by_verdict(v: FleetView) -> list[tuple[str, str, list[HostSummary]]]:
    """Worst fresh hosts per kernel verdict group (regressed, known-bad, the rest), at most top_n each.
    Within a group kernels take turns (each kernel's worst host, then each one's second worst...), so
    one kernel with many identical hosts cannot fill the list; the chosen rows are shown worst first.
    Derived once per view."""
    key = ("page", "worst_by_verdict")
    cached = v.memo.get(key)
    if cached is not None:
        return cast("list[tuple[str, str, list[HostSummary]]]", cached)
    verdict = {(k.kernel_release, k.era): k.verdict for k in v.kernels}
    named = {g for g, _ in VERDICT_GROUPS if g}
    by_kernel: dict[tuple[str, int], list[HostSummary]] = {}
    for h in v.fresh.values():
        by_kernel.setdefault((h.kernel_release, h.era), []).append(h)
    out = []
    n = v.config.top_n
    for group, title in VERDICT_GROUPS:
        ranked = [worst_hosts(hosts, v.config) for k, hosts in by_kernel.items()
                  if (verdict.get(k, "") if verdict.get(k, "") in named else "") == group]
        turns = [(i, _rank_key(h), h) for hosts in ranked for i, h in enumerate(hosts)]
        chosen = [h for _, _, h in heapq.nsmallest(n, turns, key=lambda t: (t[0], t[1]))]
        out.append((group or "other", title, sorted(chosen, key=_rank_key)))
    v.memo[key] = out
    return out


def _rank_key(h: HostSummary) -> tuple[float, int, str]:
    return (-(h.lost_ratio or 0.0), -h.lost_2m, h.host_id)


def absent_hosts(v: FleetView) -> list[tuple[str, Mapping[str, HostSummary]]]:
    """(state, hosts) for each host state outside the sums (ABSENT_STATES)."""
    pools: dict[str, Mapping[str, HostSummary]] = {STATUS_STALE: v.stale, STATUS_DEPARTED: v.departed, STATUS_INVALID: v.invalid}
    return [(state, pools[state]) for state in ABSENT_STATES]


def page(title: str, body: str) -> str:
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{STYLE}</style></head>
<body>
{body}
</body></html>
"""


def table(table_id: str, header: Iterable[str], rows: list[str], empty: str) -> str:
    cols = list(header)
    head = f'<tr>{"".join(f"<th>{h}</th>" for h in cols)}</tr>' if any(cols) else ""  # no header row of blanks
    body = "".join(rows) or f'<tr><td colspan={len(cols)}>{empty}</td></tr>'
    return f'<div class="tablewrap"><table id="{table_id}">{head}\n{body}</table></div>'


def _host_row(h: HostSummary, verdict: str, now: float) -> str:
    return (f'<tr><td class=id><a href="{host_href(h.host_id)}">{e(h.host_id)}</a></td><td class=id>{e(h.kernel_release)}</td>'
            f"<td>{breakable(verdict)}</td>"
            f"<td class=num>{h.capacity_2m}</td><td class=num>{h.lost_2m}</td><td class=num>{_pct(h.lost_ratio)}</td>"
            f"<td>{causes_cell(h.lost_by_cause, h.capacity_2m)}</td><td>{_age(h.received, now)}</td></tr>")


def _rollup_cells(r: Rollup) -> str:
    return (f"<td class=num>{r.hosts}</td><td class=num>{r.vms}</td><td class=num>{r.capacity_2m}</td><td class=num>{r.lost_2m}</td>"
            f"<td class=num>{_pct(r.lost_ratio)}</td><td>{causes_cell(r.lost_by_cause.items(), r.capacity_2m)}</td>")


def render_fleet_page(v: FleetView, now: float | None = None, title: str = "eptwatch fleet") -> str:
    now = time.time() if now is None else now
    rows = v.kernels
    bar_w, row_h, label_w, text_w = 440, 26, 230, 300
    max_ratio = max([k.lost_ratio or 0.0 for k in rows] + [0.05])
    width, height = label_w + bar_w + text_w, row_h * max(len(rows), 1) + 10
    svg = [f'<svg id="loss-chart" role="img" aria-label="Loss ratio per kernel release" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">']
    for i, k in enumerate(rows):
        y = 5 + i * row_h
        ratio = k.lost_ratio or 0.0
        colour = COLOURS.get(k.verdict, DEFAULT_COLOUR if k.hosts >= v.config.min_hosts else QUIET_COLOUR)
        w = int(bar_w * ratio / max_ratio)
        cause = main_cause(k)
        label = f"{_pct(k.lost_ratio)} {cause}" if cause else _pct(k.lost_ratio)
        svg.append(f'<text x="{label_w - 6}" y="{y + 17}" text-anchor="end" font-size="13">{e(k.kernel_release[:40])}</text>')
        svg.append(f'<rect class="bar {e(k.verdict)}" data-kernel="{e(k.kernel_release)}" x="{label_w}" y="{y + 3}" '
                   f'width="{max(w, 1)}" height="{row_h - 8}" fill="{colour}"><title>{e(k.kernel_release)}: {e(label)}</title></rect>')
        svg.append(f'<text x="{label_w + max(w, 1) + 6}" y="{y + 17}" font-size="12">{e(label)}</text>')
    if not rows:
        svg.append('<text x="10" y="20" font-size="13">No fresh hosts yet.</text>')
    svg.append("</svg>")

    krows = []
    for k in rows:
        cls = f' class="{e(k.verdict)}"' if k.verdict in COLOURS else ""
        krows.append(
            f"<tr{cls}><td class=id>{e(k.kernel_release)}</td><td>{breakable(ERA_NAMES.get(k.era, str(k.era)))}</td>"
            f"<td class=verdict>{breakable(k.verdict)}</td>"
            f"{_rollup_cells(k)}</tr>"
            # The evidence is a sentence: a row of its own under the numbers, not a narrow column.
            f'<tr class="evidence"><td></td><td colspan=8 class=muted>{e(k.evidence)}</td></tr>'
        )
    rollup_head = ["hosts", "VMs", "capacity 2M", "lost 2M", "loss", "loss by cause"]
    verdict_of = {(k.kernel_release, k.era): k.verdict for k in rows}
    worst = []
    for group, heading, hosts in worst_by_verdict(v):
        if not hosts:
            continue
        worst.append(f"<h3>{e(heading)}</h3>" + table(
            f"worst-{group}", ["host", "kernel", "verdict", "capacity 2M", "lost 2M", "loss", "loss by cause", "last report"],
            [_host_row(h, verdict_of.get((h.kernel_release, h.era), ""), now) for h in hosts], ""))
    absent = []
    for state, pool in absent_hosts(v):
        if not pool:
            continue
        latest = heapq.nlargest(MAX_ABSENT_ROWS, pool.values(), key=lambda h: (h.received, h.host_id))
        more = (f'<p class="muted">{len(latest)} most recently heard of {len(pool)}; all: '
                f'<a href="/api/v1/hosts?status={e(quote(state))}">/api/v1/hosts?status={e(state)}</a></p>'
                if len(pool) > len(latest) else "")
        # An invalid host's problem says why it is not counted; the others' labels say where they were.
        note = "problem" if state == STATUS_INVALID else "labels"
        absent.append(f'<h3>{e(state.capitalize())} hosts ({len(pool)})</h3>' + table(
            f"{state}-hosts", ["host", "state", "kernel", "VMs", "last report", "received at", note],
            [f'<tr class="{e(state)}"><td class=id><a href="{host_href(h.host_id)}">{e(h.host_id)}</a></td><td>{e(state)}</td>'
             f"<td class=id>{e(h.kernel_release)}</td><td class=num>{h.vms}</td><td>{_age(h.received, now)}</td><td>{_utc(h.received)}</td>"
             f"<td class=id>{e(h.problem if state == STATUS_INVALID else ', '.join(f'{a}={b}' for a, b in h.labels))}</td></tr>"
             for h in latest], "") + more)
    labels = sorted(v.labels.items())
    lrows = [f"<tr><td class=id>{e(lk)}</td><td class=id>{e(lv)}</td>{_rollup_cells(r)}</tr>" for (lk, lv), r in labels[:MAX_LABEL_ROWS]]
    labels_note = "" if v.config.rollup_labels else '<p class="muted">No rollup labels configured (rollup_labels in the server config).</p>'
    regressed = [k.kernel_release for k in rows if k.regressed]
    known_bad = [f"{k.kernel_release} ({k.hosts} hosts)" for k in rows if k.known_bad]
    t = v.total
    body = f"""<h1>{e(title)}</h1>
<div class="summary" id="summary"><span><b>{t.hosts}</b> fresh hosts</span><span><b>{t.vms}</b> VMs</span>
<span>lost huge mappings <b>{t.lost_2m}</b> of <b>{t.capacity_2m}</b> ({_pct(t.lost_ratio)})</span>
<span>unexplained <b>{t.lost_unexplained_2m}</b></span></div>
<div class="muted" id="freshness">newest report {_age(v.newest_received, now)}; oldest fresh report {_age(v.oldest_fresh_received, now)};
{v.hosts_stale} stale host(s) (silent for more than {v.config.stale_after_seconds:.0f} s); <span id="departed">{v.hosts_departed} departed (agent stopped or moved away)</span>;
<span id="invalid">{len(v.invalid)} invalid (report cannot be evaluated)</span>; page built {_utc(v.generated_at)}</div>
{''.join(f'<div class="alert regressed" id="regressed">Regressed kernel: <b>{e(r)}</b></div>' for r in regressed)}
{f'<div class="alert known_bad" id="known-bad">Known-bad kernels still in the fleet (no 169226f7e0): <b>{e(", ".join(known_bad))}</b></div>' if known_bad else ''}
<h2>Loss ratio per kernel release</h2>
{''.join(svg)}
<h2>Kernels</h2>
{table("kernels", ["kernel", "era", "verdict", *rollup_head], krows, "No fresh hosts yet.")}
<h2>Worst hosts</h2>
<div id="worst-hosts">{''.join(worst) or '<p>No host is losing huge mappings.</p>'}</div>
<h2>Hosts not counted</h2>
<div id="absent-hosts">{''.join(absent) or '<p>None: every host is fresh.</p>'}</div>
<h2>Label rollups</h2>
{table("labels", ["label", "value", *rollup_head], lrows, "No labelled hosts.")}{labels_note}
<p class="muted">Machine-readable: <a href="/api/v1/fleet">/api/v1/fleet</a>, <a href="/api/v1/kernels">/api/v1/kernels</a>,
<a href="/api/v1/hosts">/api/v1/hosts</a> (<a href="/api/v1/hosts?status=all">all states</a>), <a href="/metrics">/metrics</a>.</p>"""
    return page(title, body)
