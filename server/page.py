"""The fleet page at `/`: server-rendered HTML with an inline SVG chart; no JavaScript, no CDN."""

from __future__ import annotations

import html
import time

from .fleet import ERA_NAMES, VERDICT_KNOWN_BAD, VERDICT_REGRESSED, FleetView

COLOURS = {VERDICT_REGRESSED: "#c62828", VERDICT_KNOWN_BAD: "#ef6c00"}
DEFAULT_COLOUR = "#2e7d32"
QUIET_COLOUR = "#90a4ae"
MAX_LISTED = 50  # departed and invalid hosts listed by name on the page; the API pages through all


def _age(seconds: float | None, now: float) -> str:
    if seconds is None:
        return "never"
    d = max(0.0, now - seconds)
    return f"{d:.0f} s ago" if d < 120 else f"{d / 60:.0f} min ago" if d < 7200 else f"{d / 3600:.1f} h ago"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def render_fleet_page(v: FleetView, now: float | None = None, title: str = "eptwatch fleet") -> str:
    now = time.time() if now is None else now
    e = html.escape
    rows = v.kernels
    bar_w, row_h, label_w = 520, 26, 230
    max_ratio = max([k.lost_ratio or 0.0 for k in rows] + [0.05])
    svg = [f'<svg id="loss-chart" role="img" aria-label="Loss ratio per kernel release" width="{label_w + bar_w + 90}" '
           f'height="{row_h * max(len(rows), 1) + 10}" xmlns="http://www.w3.org/2000/svg">']
    for i, k in enumerate(rows):
        y = 5 + i * row_h
        ratio = k.lost_ratio or 0.0
        colour = COLOURS.get(k.verdict, DEFAULT_COLOUR if k.hosts >= v.config.min_hosts else QUIET_COLOUR)
        w = int(bar_w * ratio / max_ratio)
        svg.append(f'<text x="{label_w - 6}" y="{y + 17}" text-anchor="end" font-size="13">{e(k.kernel_release)}</text>')
        svg.append(f'<rect class="bar {e(k.verdict)}" data-kernel="{e(k.kernel_release)}" x="{label_w}" y="{y + 3}" '
                   f'width="{max(w, 1)}" height="{row_h - 8}" fill="{colour}"><title>{e(k.kernel_release)}: {_pct(k.lost_ratio)}</title></rect>')
        svg.append(f'<text x="{label_w + max(w, 1) + 6}" y="{y + 17}" font-size="12">{_pct(k.lost_ratio)}</text>')
    if not rows:
        svg.append('<text x="10" y="20" font-size="13">No fresh hosts yet.</text>')
    svg.append("</svg>")

    krows = []
    for k in rows:
        cls = f' class="{e(k.verdict)}"' if k.verdict in COLOURS else ""
        krows.append(
            f"<tr{cls}><td>{e(k.kernel_release)}</td><td>{e(ERA_NAMES.get(k.era, str(k.era)))}</td><td class=verdict>{e(k.verdict)}</td>"
            f"<td class=num>{k.hosts}</td><td class=num>{k.vms}</td><td class=num>{k.capacity_2m}</td><td class=num>{k.lost_2m}</td>"
            f"<td class=num>{k.lost_unexplained_2m}</td><td class=num>{_pct(k.lost_ratio)}</td><td>{e(k.evidence)}</td></tr>"
        )
    hrows = [
        f"<tr><td>{e(h.host_id)}</td><td>{e(h.kernel_release)}</td><td class=num>{h.capacity_2m}</td><td class=num>{h.lost_2m}</td>"
        f"<td class=num>{_pct(h.lost_ratio)}</td><td>{_age(h.received, now)}</td></tr>"
        for h in v.worst_hosts
    ]
    # Hosts outside the sums, by name: an invalid host with its problem, a departed one with its last report.
    orows = [
        f'<tr class="{status}"><td>{e(h.host_id)}</td><td>{status}</td><td>{_age(h.received, now)}</td><td>{e(h.problem)}</td></tr>'
        for status, pool in (("invalid", v.invalid), ("departed", v.departed))
        for h in sorted(pool.values(), key=lambda h: h.host_id)[:MAX_LISTED]
    ]
    regressed = [k.kernel_release for k in rows if k.regressed]
    known_bad = [f"{k.kernel_release} ({k.hosts} hosts)" for k in rows if k.known_bad]
    t = v.total
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font-family: system-ui, sans-serif; margin: 24px; color: #222; }}
h1 {{ margin: 0 0 4px 0; font-size: 22px; }} h2 {{ font-size: 16px; margin-top: 28px; }}
.summary span {{ display: inline-block; margin-right: 18px; }}
.alert {{ padding: 8px 12px; margin: 10px 0; border-radius: 4px; }}
.alert.regressed {{ background: #ffebee; border-left: 5px solid #c62828; }}
.alert.known_bad {{ background: #fff3e0; border-left: 5px solid #ef6c00; }}
table {{ border-collapse: collapse; font-size: 13px; }} td, th {{ border-bottom: 1px solid #ddd; padding: 4px 8px; text-align: left; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
tr.regressed td.verdict {{ color: #c62828; font-weight: bold; }} tr.known_bad td.verdict {{ color: #ef6c00; font-weight: bold; }}
.muted {{ color: #666; font-size: 12px; }}
</style></head>
<body>
<h1>{e(title)}</h1>
<div class="summary" id="summary"><span><b>{t.hosts}</b> fresh hosts</span><span><b>{t.vms}</b> VMs</span>
<span>lost huge mappings <b>{t.lost_2m}</b> of <b>{t.capacity_2m}</b> ({_pct(t.lost_ratio)})</span>
<span>unexplained <b>{t.lost_unexplained_2m}</b></span></div>
<div class="muted" id="freshness">newest report {_age(v.newest_received, now)}; oldest fresh report {_age(v.oldest_fresh_received, now)};
{v.hosts_stale} stale host(s) (silent for more than {v.config.stale_after_seconds:.0f} s); <span id="departed">{v.hosts_departed} departed (agent stopped or moved away)</span>;
<span id="invalid">{len(v.invalid)} invalid (report cannot be evaluated)</span>; page built {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(v.generated_at))}</div>
{''.join(f'<div class="alert regressed" id="regressed">Regressed kernel: <b>{e(r)}</b></div>' for r in regressed)}
{f'<div class="alert known_bad" id="known-bad">Known-bad kernels still in the fleet (no 169226f7e0): <b>{e(", ".join(known_bad))}</b></div>' if known_bad else ''}
<h2>Loss ratio per kernel release</h2>
{''.join(svg)}
<h2>Kernels</h2>
<table id="kernels"><tr><th>kernel</th><th>era</th><th>verdict</th><th>hosts</th><th>VMs</th><th>capacity 2M</th><th>lost 2M</th><th>unexplained 2M</th><th>loss</th><th>evidence</th></tr>
{''.join(krows)}</table>
<h2>Worst hosts</h2>
<table id="worst-hosts"><tr><th>host</th><th>kernel</th><th>capacity 2M</th><th>lost 2M</th><th>loss</th><th>last report</th></tr>
{''.join(hrows) or '<tr><td colspan=6>No host is losing huge mappings.</td></tr>'}</table>
<h2>Hosts not counted</h2>
<table id="other-hosts"><tr><th>host</th><th>state</th><th>last report</th><th>problem</th></tr>
{''.join(orows) or '<tr><td colspan=4>None: every host is fresh or stale.</td></tr>'}</table>
<p class="muted">Machine-readable: <a href="/api/v1/fleet">/api/v1/fleet</a>, <a href="/api/v1/kernels">/api/v1/kernels</a>,
<a href="/api/v1/hosts">/api/v1/hosts</a> (<a href="/api/v1/hosts?status=all">all states</a>), <a href="/metrics">/metrics</a>.</p>
</body></html>
"""
