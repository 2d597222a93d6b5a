"""The fleet page and the host page: rendered HTML checked directly, and in a real headless Chromium
(content in the rendered DOM, screenshots kept, tables measured for overflow at 1400 and 800 px)."""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from eptwatch.server.faces.page import render_fleet_page
from eptwatch.server.fleet.state import FleetConfig, HostSummary, Rollup, build_view, summarise
from eptwatch.server.simulate import SimHost, SimulatedFleet, load_templates
from eptwatch.v1 import report_pb2 as pb

from .conftest import FIXTURES
from .fleetfeed import feed
from .procs import Aggregator, http_fetch, http_get

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-quic"]
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (Debian package chromium)")
MIX = {"linux-6.6-pages2m": 1, "linux-5.10-hostwalk": 1, "linux-5.3-unfixed": 1, "linux-5.4-fixed": 1, "nx-splits": 1}
TEMPLATES = [*MIX, "global-only-two-vms", "anon-thp"]
HOSTILE = '<script>alert("x")</script>'


@pytest.fixture(scope="module")
def templates() -> dict[str, pb.HostReport]:
    return load_templates(FIXTURES, TEMPLATES)


def _summaries(templates: dict[str, pb.HostReport], plan: list[tuple[str, str, float]],
               labels: tuple[tuple[str, str], ...] = (("cluster", "prod-a"), ("zone", "z1"))) -> list[HostSummary]:
    """One summary per (host id, template, received)."""
    fleet = SimulatedFleet(templates, 0)
    out = []
    for host_id, name, received in plan:
        h = SimHost(host_id, name, labels, f"i-{host_id[:20]}")
        out.append(summarise(fleet.report(h, received), received=received))
    return out


# --- loss per cause: the summaries and rollups behind the page ---------------------------------------

def test_lost_by_cause_sums_to_the_loss_and_names_the_cause(templates: dict[str, pb.HostReport]) -> None:
    for name, r in templates.items():
        h = summarise(r, received=1000.0)
        assert sum(n for _, n in h.lost_by_cause) == h.lost_2m, name
    nx, = _summaries(templates, [("nx", "nx-splits", 1000.0)])
    assert nx.lost_by_cause == ((pb.CAUSE_NX_SPLIT, 300),) and nx.lost_explained_2m == 300
    bug, = _summaries(templates, [("bug", "linux-5.3-unfixed", 1000.0)])
    assert bug.lost_by_cause == ((pb.CAUSE_KNOWN_PAGE_CACHE_THP_BUG, 271),)
    # VMs sharing only the host-wide counter: the host-level estimate carries the loss, as in the totals.
    shared, = _summaries(templates, [("g", "global-only-two-vms", 1000.0)])
    assert shared.lost_by_cause == ((pb.CAUSE_UNEXPLAINED, shared.lost_2m),) and shared.lost_2m == 6


def test_lost_by_cause_of_a_mixed_breakdown_is_walked() -> None:
    r = pb.HostReport(host_id="m")
    e1 = r.estimates.add(vm_id="a", host_huge_capacity_2m=100, observed_huge_2m=60, lost_huge_2m=40, cause=pb.CAUSE_NX_SPLIT)
    e1.breakdown.add(cause=pb.CAUSE_NX_SPLIT, lost_huge_2m=30)
    e1.breakdown.add(cause=pb.CAUSE_UNEXPLAINED, lost_huge_2m=10)
    e2 = r.estimates.add(vm_id="b", host_huge_capacity_2m=50, observed_huge_2m=45, lost_huge_2m=5, cause=pb.CAUSE_EXPECTED_FALSE_NEGATIVE)
    e2.breakdown.add(cause=pb.CAUSE_EXPECTED_FALSE_NEGATIVE, lost_huge_2m=5)
    # No loss figure: its breakdown is not part of the totals, so not of the causes either.
    r.estimates.add(vm_id="c", cause=pb.CAUSE_UNKNOWN).breakdown.add(cause=pb.CAUSE_NX_SPLIT, lost_huge_2m=99)
    h = summarise(r, received=1000.0)
    assert h.lost_2m == 45
    assert h.lost_by_cause == ((pb.CAUSE_EXPECTED_FALSE_NEGATIVE, 5), (pb.CAUSE_NX_SPLIT, 30), (pb.CAUSE_UNEXPLAINED, 10))


def test_rollup_lost_by_cause_is_added_and_taken_away(templates: dict[str, pb.HostReport]) -> None:
    a, b = _summaries(templates, [("a", "nx-splits", 1000.0), ("b", "linux-6.6-pages2m", 1000.0)])
    r = Rollup()
    r.add(a)
    r.add(b)
    assert dict(r.lost_by_cause) == {pb.CAUSE_NX_SPLIT: 300, pb.CAUSE_UNEXPLAINED: 1026}
    r.add(a, -1)
    assert dict(r.lost_by_cause) == {pb.CAUSE_UNEXPLAINED: 1026}
    r.add(b, -1)
    assert not r.lost_by_cause  # nothing left over, not a zero entry


# --- the fleet page, rendered --------------------------------------------------------------------------

def _fleet_view(templates: dict[str, pb.HostReport]):  # type: ignore[no-untyped-def]
    plan = []
    for i in range(10):
        plan.append((f"bug-{i:02d}", "linux-5.3-unfixed", 1000.0))
    for i in range(3):
        plan += [(f"reg-{i}", "linux-6.6-pages2m", 1000.0), (f"walk-{i}", "linux-5.10-hostwalk", 1000.0),
                 (f"nx-{i}", "nx-splits", 1000.0), (f"fix-{i}", "linux-5.4-fixed", 1000.0)]
    plan += [("gone-old", "linux-5.4-fixed", 100.0), ("gone-new", "linux-5.3-unfixed", 700.0)]
    hosts = _summaries(templates, plan)
    # A second known-bad kernel with fewer hosts: it must still get rows among the worst.
    other = pb.HostReport()
    other.CopyFrom(templates["linux-5.3-unfixed"])
    other.kernel.release = "5.3.18"
    hosts += _summaries({"other": other}, [("bug-other-0", "other", 1000.0), ("bug-other-1", "other", 1000.0)])
    # Outside input in every field the page shows: a host id, a kernel release and labels.
    evil = pb.HostReport()
    evil.CopyFrom(templates["anon-thp"])
    evil.kernel.release = HOSTILE
    hosts += _summaries({"evil": evil}, [(f'h"><img src=x>{HOSTILE}', "evil", 1000.0)], labels=(("zone", HOSTILE),))
    # A host whose agent left, and one whose report cannot be evaluated (a long problem to wrap).
    hosts += _summaries(templates, [("left-0", "linux-5.4-fixed", 1000.0)])
    absurd = pb.HostReport()
    absurd.CopyFrom(templates["linux-5.3-unfixed"])
    absurd.estimates[0].host_huge_capacity_2m = absurd.estimates[0].observed_huge_2m = (1 << 64) - 1
    absurd.estimates[0].lost_huge_2m = 0
    del absurd.estimates[0].breakdown[:]
    hosts += _summaries({"absurd": absurd}, [("absurd-0", "absurd", 1000.0)])
    cfg = FleetConfig(stale_after_seconds=120, rollup_labels=("cluster", "zone"), top_n=4)
    v = build_view(hosts, {"left-0"}, 1010.0, cfg)
    assert set(v.departed) == {"left-0"} and set(v.invalid) == {"absurd-0"}
    return v


def test_page_shows_loss_per_cause_for_each_kernel(templates: dict[str, pb.HostReport]) -> None:
    page = render_fleet_page(_fleet_view(templates), now=1010.0)
    kernels = page[page.index('id="kernels"'):page.index("</table>", page.index('id="kernels"'))]
    row = kernels[kernels.index("5.4.0-150-generic"):]
    row = row[:row.index('<tr class="evidence">')]
    assert 'data-cause="nx_split"' in row and "<b>14.6%</b>" in row and "explained" in row
    bug = kernels[kernels.index(">5.3.0<"):]
    assert 'data-cause="known_page_cache_thp_bug"' in bug[:bug.index('<tr class="evidence">')]
    assert re.search(r'<text [^>]*>14\.6% nx_split</text>', page)  # the chart names the cause too


def test_worst_hosts_per_verdict_regressed_first_each_a_link(templates: dict[str, pb.HostReport]) -> None:
    page = render_fleet_page(_fleet_view(templates), now=1010.0)
    reg, bad, other = page.index('id="worst-regressed"'), page.index('id="worst-known_bad"'), page.index('id="worst-other"')
    assert reg < bad < other
    regressed = page[reg:bad]
    assert set(re.findall(r'href="/hosts/(reg-\d)"', regressed)) == {"reg-0", "reg-1", "reg-2"}
    known_bad = page[bad:other]
    linked = re.findall(r'href="/hosts/([^"]+)"', known_bad)
    assert len(linked) == 4  # top_n per verdict
    # Ten identical 5.3.0 hosts do not crowd out the other known-bad kernel.
    assert "bug-other-0" in linked and any(h.startswith("bug-0") for h in linked)
    assert "nx-0" in page[other:]


def test_stale_hosts_listed_with_last_report_and_label_rollups(templates: dict[str, pb.HostReport]) -> None:
    page = render_fleet_page(_fleet_view(templates), now=1010.0)
    stale = page[page.index('id="stale-hosts"'):]
    stale = stale[:stale.index("</table>")]
    rows = re.findall(r'href="/hosts/([^"]+)"', stale)
    assert rows == ["gone-new", "gone-old"]  # most recently heard of first
    assert "5 min ago" in stale and "15 min ago" in stale and "1970-01-01 00:11:40 UTC" in stale
    labels = page[page.index('id="labels"'):]
    labels = labels[:labels.index("</table>")]
    assert ">cluster</td><td class=id>prod-a</td>" in labels and ">zone</td><td class=id>z1</td>" in labels


def test_page_escapes_and_quotes_outside_input(templates: dict[str, pb.HostReport]) -> None:
    page = render_fleet_page(_fleet_view(templates), now=1010.0)
    assert "<script" not in page and "<img" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page  # kernel release and label, shown as text
    assert 'href="/hosts/h%22%3E%3Cimg%20src%3Dx%3E%3Cscript%3Ealert%28%22x%22%29%3C%2Fscript%3E"' in page


def test_departed_hosts_are_one_more_listed_state(templates: dict[str, pb.HostReport]) -> None:
    """A view that has a {host_id: summary} for departed hosts gets them listed like the stale ones."""
    v = _fleet_view(templates)
    gone, = _summaries(templates, [("left-cleanly", "linux-5.4-fixed", 900.0)])
    v.departed = {gone.host_id: gone}  # type: ignore[attr-defined]
    page = render_fleet_page(v, now=1010.0)
    listed = page[page.index('id="departed-hosts"'):]
    assert re.findall(r'href="/hosts/([^"]+)"', listed[:listed.index("</table>")]) == ["left-cleanly"]


# --- the real aggregator: fleet page, host page, in Chromium ----------------------------------------

@pytest.fixture(scope="module")
def agg(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    d = tmp_path_factory.mktemp("agg")
    (d / "server.yaml").write_text("rollup_labels: [cluster, zone]\n")
    fleet = SimulatedFleet(load_templates(FIXTURES, list(MIX)), 15, mix=MIX)
    evil = SimHost("evil-host", "linux-5.3-unfixed", (("zone", HOSTILE),), "evil")
    a = Aggregator(d, ["--insecure-plaintext", "--insecure-no-auth", "--config", str(d / "server.yaml")]).start()
    try:
        assert feed(a.target, fleet, [*fleet.hosts, evil]) == 16
        yield a
    finally:
        a.proc.kill9()  # type: ignore[union-attr]


def test_host_page_shows_vms_estimates_causes_and_sources(agg: Aggregator) -> None:
    status, body = http_fetch(agg.http + "/hosts/sim-00002")  # a 5.3.0 host: the known bug
    page = body.decode()
    assert status == 200
    assert 'id="host-id">Host sim-00002</h1>' in page and "state</th><td>fresh" in page and "5.3.0" in page
    for table_id in ("estimates", "vms", "sources", "host-facts"):
        assert f'<table id="{table_id}">' in page
    assert re.search(r'data-cause="known_page_cache_thp_bug">known_<wbr>page_<wbr>cache_<wbr>thp_<wbr>bug <b>95\.8%</b>', page)
    detail = json.loads(http_get(agg.http + "/api/v1/hosts/sim-00002"))
    report = detail["latest_report"]
    for vm in report["vms"]:
        assert f"<td>{vm['vm_id']}</td>" in page
    for s in report["sources"]:
        assert f"<td>{s['source']}</td>" in page
    assert page.count('class="state-') == len(report["sources"]) + sum(len(vm.get("sources", [])) for vm in report["vms"])


def test_host_page_escapes_outside_input_and_answers_404(agg: Aggregator) -> None:
    status, body = http_fetch(agg.http + "/hosts/evil-host")
    assert status == 200 and b"<script" not in body and b"zone=&lt;script&gt;" in body
    quoted = "%3Cscript%3Ealert(1)%3C%2Fscript%3E"
    status, body = http_fetch(agg.http + "/hosts/" + quoted)
    assert status == 404 and body.startswith(b"<!doctype html>")
    assert b"<script" not in body and b"&lt;script&gt;alert(1)&lt;/script&gt;" in body
    status, body = http_fetch(agg.http + "/hosts/no-such-host")
    assert status == 404 and b"no-such-host" in body


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    base = [str(CHROMIUM), *FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    return subprocess.run([*base, *args], capture_output=True, text=True, timeout=120)


@needs_chromium
def test_fleet_page_in_headless_chromium(agg: Aggregator, tmp_path: Path) -> None:
    url = agg.http + "/"
    dom = _chromium(tmp_path, "--dump-dom", url).stdout
    assert 'id="loss-chart"' in dom
    assert 'class="bar regressed" data-kernel="6.6.15"' in dom
    assert 'class="bar known_bad" data-kernel="5.3.0"' in dom
    assert "Regressed kernel: <b>6.6.15</b>" in dom
    assert "Known-bad kernels still in the fleet" in dom and "5.3.0 (4 hosts)" in dom
    assert "16</b> fresh hosts" in dom and "newest report" in dom
    # The regressed kernel's hosts lead the worst hosts, each a link to its host page.
    assert dom.index('id="worst-regressed"') < dom.index('id="worst-known_bad"')
    assert re.search(r'<a href="/hosts/sim-\d+">sim-\d+</a></td><td class="id">6\.6\.15</td>', dom)
    assert 'data-cause="nx_split"' in dom and '<table id="labels">' in dom and "&lt;script&gt;" in dom
    host = _chromium(tmp_path, "--dump-dom", agg.http + "/hosts/sim-00000").stdout
    assert '<table id="estimates">' in host and '<table id="vms">' in host and '<table id="sources">' in host
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "fleet-page.png"
    shot.unlink(missing_ok=True)
    _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,1000", url)
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert (width, height) == (1280, 1000) and len(png) > 20_000  # a rendered page, not a blank one


# Measures, in the browser, each table against its container and the page against the window. Only the
# test's copy of a page carries it: the pages themselves have no JavaScript.
MEASURE = """<script>
(() => {
  const over = [];
  const doc = document.documentElement;
  if (doc.scrollWidth > doc.clientWidth) over.push(`page ${doc.scrollWidth} > ${doc.clientWidth}`);
  const tables = document.querySelectorAll("table");
  for (const t of tables) {
    const c = t.parentElement;
    const tr = t.getBoundingClientRect().right, cr = c.getBoundingClientRect().right;
    if (c.scrollWidth > c.clientWidth || t.scrollWidth > t.clientWidth || tr > cr + 0.5)
      over.push(`${t.id}: table ${t.scrollWidth}/${Math.round(tr)} in container ${c.clientWidth}/${Math.round(cr)}`);
  }
  const pre = document.createElement("pre");
  pre.id = "measured";
  pre.textContent = JSON.stringify({width: window.innerWidth, tables: tables.length, overflow: over});
  document.body.appendChild(pre);
})();
</script>"""


def _measure(tmp_path: Path, name: str, page: str, width: int) -> dict:  # type: ignore[type-arg]
    f = tmp_path / f"{name}-{width}.html"
    f.write_text(page.replace("</body>", MEASURE + "</body>"))
    dom = _chromium(tmp_path, "--dump-dom", f"--window-size={width},900", f.as_uri()).stdout
    m = re.search(r'<pre id="measured">(.*?)</pre>', dom)
    assert m is not None, dom[-500:]
    return json.loads(m.group(1).replace("&gt;", ">").replace("&lt;", "<").replace("&amp;", "&"))  # type: ignore[no-any-return]


@needs_chromium
def test_no_table_overflows_at_1400_and_800_px(agg: Aggregator, templates: dict[str, pb.HostReport], tmp_path: Path) -> None:
    pages = {
        "fleet": http_get(agg.http + "/"),
        "host": http_get(agg.http + "/hosts/sim-00000"),
        # Every section filled: stale hosts, two known-bad kernels, long hostile ids and labels.
        "rich": render_fleet_page(_fleet_view(templates), now=1010.0),
    }
    # The measurement can fail: a table that cannot shrink below 1200 px is caught at 800 px.
    control = pages["fleet"].replace("</body>", '<div><table id="control"><tr><td style="white-space:nowrap">'
                                     + "x" * 200 + "</td></tr></table></div></body>")
    caught = _measure(tmp_path, "control", control, 800)
    assert caught["width"] == 800 and any(o.startswith("control:") for o in caught["overflow"])
    for width in (1400, 800):
        for name, page in pages.items():
            m = _measure(tmp_path, name, page, width)
            assert m["width"] == width and m["tables"] >= 3, (name, m)
            assert m["overflow"] == [], (name, width, m["overflow"])
        shot = tmp_path / f"fleet-page-{width}.png"
        _chromium(tmp_path, f"--screenshot={shot}", f"--window-size={width},1600", agg.http + "/")
        png = shot.read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == (width, 1600)


def test_host_page_without_stored_report_or_summary_says_so() -> None:
    from eptwatch.server.faces.hostpage import render_host_page
    from eptwatch.v1 import query_pb2 as q

    detail = q.HostDetail(summary=q.HostSummary(host_id="h1", kernel_release="6.6.15", vms=2, host_huge_capacity_2m=10,
                                                lost_huge_2m=4, lost_ratio=0.4))
    page = render_host_page(detail, None, now=1000.0)
    assert "not in the store" in page and "holds no summary of this host" in page
    assert "No estimates in the latest report." in page and "4</b> of <b>10</b> (40.0%)" in page
    assert "none lost" not in page  # an absent summary is never shown as no loss


def test_invalid_hosts_listed_with_their_problem_and_host_page_names_it(templates: dict[str, pb.HostReport]) -> None:
    from eptwatch.server.faces.hostpage import render_host_page
    from eptwatch.server.faces.query import host_pb
    from eptwatch.v1 import query_pb2 as q

    v = _fleet_view(templates)
    bad = pb.HostReport()
    bad.CopyFrom(templates["linux-5.4-fixed"])
    bad.host_id = "hv-bad"
    bad.estimates[0].host_huge_capacity_2m = (1 << 64) - 1  # absurd: the summary names it, the sums skip it
    h = summarise(bad, received=1000.0)
    assert h.problem and h.lost_by_cause == ()
    v.invalid[h.host_id] = h
    page = render_fleet_page(v, now=1010.0)
    listed = page[page.index('id="invalid-hosts"'):]
    listed = listed[:listed.index("</table>")]
    assert 'href="/hosts/hv-bad"' in listed and e_html(h.problem) in listed
    host = render_host_page(q.HostDetail(summary=host_pb(h, "invalid"), latest_report=bad), h, now=1010.0)
    assert "state</th><td>invalid" in host and 'id="problem">Not counted: ' in host


def e_html(s: str) -> str:
    import html
    return html.escape(s)
