"""The one-shot CLI on every fixture tree, diffed against golden JSON.

Regenerate after an intended change with: EPTWATCH_UPDATE_GOLDEN=1 make test (then review the diff).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from eptwatch.agent.faces.cli import main

from .conftest import GOLDEN, fixture_roots

VOLATILE = {"sample_time", "agent_version", "smaps_read_cost_seconds"}


def normalise(obj: Any, root: str) -> Any:
    if isinstance(obj, dict):
        return {k: normalise(v, root) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [normalise(v, root) for v in obj]
    if isinstance(obj, str):
        return obj.replace(root, "$ROOT")
    return obj


def run_json(root: Path, capsys: pytest.CaptureFixture[str]) -> Any:
    assert main(["sample", "--root", str(root), "--format", "json", "--smaps-mode", "full"]) == 0
    return normalise(json.loads(capsys.readouterr().out), str(root))


@pytest.mark.parametrize("root", fixture_roots(), ids=lambda p: p.name)
def test_fixture_matches_golden(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    got = run_json(root, capsys)
    golden = GOLDEN / f"{root.name}.json"
    if os.environ.get("EPTWATCH_UPDATE_GOLDEN") == "1":
        golden.write_text(json.dumps(got, indent=2, sort_keys=True) + "\n")
    assert golden.exists(), f"no golden file {golden}: run with EPTWATCH_UPDATE_GOLDEN=1"
    assert got == json.loads(golden.read_text())


EXPECTED_CAUSES = {
    "linux-5.3-unfixed": ["CAUSE_KNOWN_PAGE_CACHE_THP_BUG"],
    "linux-5.4-fixed": ["CAUSE_HEALTHY"],
    "linux-5.4-vhost-user": ["CAUSE_EXPECTED_FALSE_NEGATIVE"],
    "linux-4.19.84-backport": ["CAUSE_HEALTHY"],
    "linux-5.10-hostwalk": ["CAUSE_HEALTHY"],
    "linux-5.14-lpages": ["CAUSE_HEALTHY"],
    "linux-6.6-pages2m": ["CAUSE_HEALTHY", "CAUSE_UNEXPLAINED"],
    "hugetlbfs-1g": ["CAUSE_HEALTHY"],
    "anon-thp": ["CAUSE_HEALTHY"],
    "nx-splits": ["CAUSE_NX_SPLIT"],
    "thp-off": ["CAUSE_THP_DISABLED"],
    "debugfs-missing": ["CAUSE_UNKNOWN"],
    "global-only-two-vms": ["CAUSE_UNKNOWN", "CAUSE_UNKNOWN"],
    # Built from real VMs' captured smaps (tests/fixtures/captured/): ram-thp, ram-shared (/dev/zero), memfd,
    # memfd-hugetlb-2m, tmpfs-always, tmpfs-never, hugetlbfs-2m, hugetlbfs-1g, file-ext4, mem-path-tmpfs.
    "linux-6.18-backends": ["CAUSE_HEALTHY", "CAUSE_THP_DISABLED", "CAUSE_THP_DISABLED", "CAUSE_HEALTHY", "CAUSE_HEALTHY",
                            "CAUSE_HOST_MAPPING_NOT_HUGE", "CAUSE_HEALTHY", "CAUSE_HEALTHY", "CAUSE_HEALTHY",
                            "CAUSE_HOST_MAPPING_NOT_HUGE"],
}


def test_every_fixture_has_an_expected_verdict() -> None:
    assert {r.name for r in fixture_roots()} == set(EXPECTED_CAUSES)


@pytest.mark.parametrize("root", fixture_roots(), ids=lambda p: p.name)
def test_fixture_verdicts(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Independent of the golden files: the verdict each fixture was built to show."""
    got = run_json(root, capsys)
    assert [e["cause"] for e in got.get("estimates", [])] == EXPECTED_CAUSES[root.name]


def test_seed_numbers_in_json(capsys: pytest.CaptureFixture[str], fixtures_dir: Path) -> None:
    before = run_json(fixtures_dir / "linux-5.3-unfixed", capsys)["estimates"][0]
    assert (before["host_huge_capacity_2m"], before["observed_huge_2m"], before["lost_huge_2m"]) == ("283", "12", "271")
    after = run_json(fixtures_dir / "linux-5.4-fixed", capsys)["estimates"][0]
    assert (after["host_huge_capacity_2m"], after["observed_huge_2m"], after["lost_huge_2m"]) == ("272", "271", "1")
    assert after["lost_ratio"] < 0.01


def test_global_only_host_estimate(capsys: pytest.CaptureFixture[str], fixtures_dir: Path) -> None:
    got = run_json(fixtures_dir / "global-only-two-vms", capsys)
    h = got["host_estimate"]
    assert (h["host_huge_capacity_2m"], h["observed_huge_2m"], h["cause"]) == ("1536", "1530", "CAUSE_HEALTHY")
    assert all("observed_huge_2m" not in e for e in got["estimates"])  # unknown per VM, not 0
