from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from eptwatch.agent.cli import main


def test_live_host_json(capsys: pytest.CaptureFixture[str]) -> None:
    """This machine's real /proc, as it is: kernel and THP facts, whatever VMs exist (maybe none)."""
    assert main(["sample", "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["kernel"]["release"] == Path("/proc/sys/kernel/osrelease").read_text().strip()
    assert doc["kernel"]["era"].startswith("PREDICATE_ERA_")
    assert doc["thp"]["enabled"] in ("always", "madvise", "never")
    assert isinstance(doc.get("vms", []), list)


def test_live_host_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sample"]) == 0
    out = capsys.readouterr().out
    assert "kernel " in out and "CAP_2M" in out


def test_table_on_seed(capsys: pytest.CaptureFixture[str], fixtures_dir: Path) -> None:
    assert main(["sample", "--root", str(fixtures_dir / "linux-5.3-unfixed")]) == 0
    out = capsys.readouterr().out
    row = [l for l in out.splitlines() if l.startswith("seed-vm")][0]
    assert row.split()[3:7] == ["283", "12", "0", "271"] and row.endswith("known_page_cache_thp_bug")


def test_path_flags_override_root(capsys: pytest.CaptureFixture[str], fixtures_dir: Path) -> None:
    seed = fixtures_dir / "linux-5.3-unfixed"
    assert main(["sample", "--path.procfs", str(seed / "proc"), "--path.sysfs", str(seed / "sys"),
                 "--path.debugfs", str(fixtures_dir / "debugfs-missing/sys/kernel/debug"), "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["kernel"]["release"] == "5.3.0"
    assert doc["estimates"][0]["cause"] == "CAUSE_UNKNOWN"  # debugfs pointed at an empty mount point


def test_bad_root_and_bad_override_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sample", "--root", str(tmp_path / "nothing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    bad = tmp_path / "eras.yaml"
    bad.write_text("overrides:\n  - release: 'x'\n    era: sideways\n")
    with pytest.raises(SystemExit) as info:
        main(["sample", "--era-overrides", str(bad)])
    assert str(bad) in str(info.value) and "era" in str(info.value)


def test_console_script_installed() -> None:
    exe = Path(sys.executable).parent / "eptwatch-agent"
    out = subprocess.run([str(exe), "sample", "--format", "json"], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["host_id"]
