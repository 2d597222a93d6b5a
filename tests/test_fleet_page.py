"""The fleet page in a real headless Chromium: content checked in the rendered DOM, screenshot kept."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from eptwatch.server.simulate import SimulatedFleet, load_templates

from .conftest import FIXTURES
from .fleetfeed import feed
from .procs import Aggregator

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-quic"]


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (Debian package chromium)")
def test_fleet_page_in_headless_chromium(tmp_path: Path) -> None:
    mix = {"linux-6.6-pages2m": 1, "linux-5.10-hostwalk": 1, "linux-5.3-unfixed": 1, "linux-5.4-fixed": 1}
    fleet = SimulatedFleet(load_templates(FIXTURES, list(mix)), 12, mix=mix)
    agg = Aggregator(tmp_path / "agg", ["--insecure-plaintext", "--insecure-no-auth"]).start()
    try:
        feed(agg.target, fleet, fleet.hosts)
        url = agg.http + "/"
        base = [str(CHROMIUM), *FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
        dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
        assert 'id="loss-chart"' in dom
        assert 'class="bar regressed" data-kernel="6.6.15"' in dom
        assert 'class="bar known_bad" data-kernel="5.3.0"' in dom
        assert "Regressed kernel: <b>6.6.15</b>" in dom
        assert "Known-bad kernels still in the fleet" in dom and "5.3.0 (3 hosts)" in dom
        assert dom.count("<tr>") >= 5 and "sim-0000" in dom  # worst hosts listed
        assert "12</b> fresh hosts" in dom and "newest report" in dom
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "fleet-page.png"
        shot.unlink(missing_ok=True)
        subprocess.run([*base, f"--screenshot={shot}", "--window-size=1280,1000", url], capture_output=True, timeout=120)
        png = shot.read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = struct.unpack(">II", png[16:24])
        assert (width, height) == (1280, 1000) and len(png) > 20_000  # a rendered page, not a blank one
    finally:
        agg.proc.kill9()  # type: ignore[union-attr]
