"""The shipped rules under promtool, and a real Prometheus scraping two aggregator replicas."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
from pathlib import Path

import pytest

from eptwatch.server.simulate import SimulatedFleet, load_templates

from .conftest import FIXTURES
from .fleetfeed import feed
from .procs import Aggregator, Proc, free_port, http_get, wait_http

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "deploy" / "prometheus" / "eptwatch-rules.yaml"
needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian package prometheus)")
needs_prometheus = pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus not installed (Debian package prometheus)")


@needs_promtool
def test_promtool_check_rules() -> None:
    out = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


@needs_promtool
def test_promtool_unit_tests() -> None:
    out = subprocess.run(["promtool", "test", "rules", "eptwatch-rules.test.yaml"], cwd=REPO / "tests" / "prometheus",
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_rules_reference_only_exported_metrics() -> None:
    from eptwatch.server.faces.metrics import METRICS

    text = RULES.read_text()
    used = set(re.findall(r"\beptwatch_[a-z0-9_]+", text))
    assert used and used <= set(METRICS), used - set(METRICS)


def prom_query(base: str, expr: str) -> list[dict]:  # type: ignore[type-arg]
    doc = json.loads(http_get(f"{base}/api/v1/query?query={urllib.parse.quote(expr)}"))
    assert doc["status"] == "success", doc
    return doc["data"]["result"]  # type: ignore[no-any-return]


@needs_prometheus
def test_real_prometheus_alerts_and_sums_replicas(tmp_path: Path) -> None:
    templates = load_templates(FIXTURES, ["linux-6.6-pages2m", "linux-5.10-hostwalk", "linux-5.3-unfixed", "linux-5.4-fixed"])
    fleet = SimulatedFleet(templates, 24, mix={"linux-6.6-pages2m": 1, "linux-5.10-hostwalk": 1, "linux-5.3-unfixed": 1, "linux-5.4-fixed": 1})
    a = Aggregator(tmp_path / "a", ["--insecure-plaintext", "--insecure-no-auth"]).start()
    b = Aggregator(tmp_path / "b", ["--insecure-plaintext", "--insecure-no-auth"]).start()
    prom: Proc | None = None
    try:
        assert feed(a.target, fleet, fleet.hosts[:12]) == 12
        assert feed(b.target, fleet, fleet.hosts[12:]) == 12
        # The same rules, with `for:` shortened so the test need not wait 15 minutes.
        rules = tmp_path / "rules.yaml"
        rules.write_text(re.sub(r"for: \S+", "for: 0s", RULES.read_text()))
        port = free_port()
        cfg = tmp_path / "prometheus.yml"
        cfg.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            f"rule_files: [{rules}]\n"
            "scrape_configs:\n  - job_name: eptwatch\n    static_configs:\n"
            f"      - targets: ['127.0.0.1:{a.http_port}', '127.0.0.1:{b.http_port}']\n"
        )
        prom = Proc(["prometheus", f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                     f"--web.listen-address=127.0.0.1:{port}"], tmp_path / "prometheus.log").start()
        base = f"http://127.0.0.1:{port}"
        wait_http(base + "/-/ready", timeout=60)
        fa = json.loads(http_get(a.http + "/api/v1/fleet"))["total"]
        fb = json.loads(http_get(b.http + "/api/v1/fleet"))["total"]
        expected_ratio = (int(fa["lost_huge_2m"]) + int(fb["lost_huge_2m"])) / (int(fa["host_huge_capacity_2m"]) + int(fb["host_huge_capacity_2m"]))
        deadline = time.monotonic() + 60
        firing: list = []  # type: ignore[type-arg]
        while time.monotonic() < deadline:
            alerts = json.loads(http_get(base + "/api/v1/alerts"))["data"]["alerts"]
            firing = [x for x in alerts if x["state"] == "firing"]
            names = {(x["labels"]["alertname"], x["labels"].get("kernel_release")) for x in firing}
            if ("EptwatchKernelRegressed", "6.6.15") in names and ("EptwatchKnownBadKernelInFleet", "5.3.0") in names:
                break
            time.sleep(1)
        names = {(x["labels"]["alertname"], x["labels"].get("kernel_release")) for x in firing}
        assert ("EptwatchKernelRegressed", "6.6.15") in names, prom.output()[-2000:]
        assert ("EptwatchKnownBadKernelInFleet", "5.3.0") in names
        assert not any(n == "EptwatchKernelRegressed" and k != "6.6.15" for n, k in names)
        # Both replicas scraped (the alerts above can fire from either one alone).
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(prom_query(base, 'up{job="eptwatch"} == 1')) < 2:
            time.sleep(0.5)
        time.sleep(2.5)  # a rule evaluation after both scrapes
        (ratio,) = prom_query(base, "eptwatch:fleet_lost_ratio")
        assert float(ratio["value"][1]) == pytest.approx(expected_ratio, rel=1e-9)
        (hosts,) = prom_query(base, "eptwatch:fleet_hosts")
        assert float(hosts["value"][1]) == 24  # each replica exports its share; PromQL sums them
    finally:
        if prom is not None:
            prom.kill9()
        a.proc.kill9()  # type: ignore[union-attr]
        b.proc.kill9()  # type: ignore[union-attr]
