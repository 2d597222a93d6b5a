from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from eptwatch.agent.faces.cli import main


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


def test_no_qmp_flag_reaches_the_sampler(monkeypatch: pytest.MonkeyPatch, fixtures_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from eptwatch.agent.model import sampler  # cli imports it when `sample` runs

    seen = []
    real = sampler.Sampler

    def capture(root, config):  # type: ignore[no-untyped-def]
        seen.append(config)
        return real(root, config)

    monkeypatch.setattr(sampler, "Sampler", capture)
    root = str(fixtures_dir / "linux-5.3-unfixed")
    assert main(["sample", "--root", root]) == 0
    assert main(["sample", "--root", root, "--no-qmp"]) == 0
    assert [c.use_qmp for c in seen] == [True, False]
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    assert "--no-qmp" in capsys.readouterr().out


def test_run_no_qmp_flag_and_config_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from eptwatch.agent.faces import daemon
    from eptwatch.agent.faces.cli import build_parser

    assert build_parser().parse_args(["run", "--no-qmp"]).use_qmp is False
    assert build_parser().parse_args(["run"]).use_qmp is None  # not given: the config file decides

    configs: list[daemon.AgentConfig] = []

    class FakeDaemon:
        def __init__(self, cfg: daemon.AgentConfig) -> None:
            configs.append(cfg)

        async def run(self) -> int:
            return 0

    monkeypatch.setattr(daemon, "AgentDaemon", FakeDaemon)
    base = ["run", "--server", "127.0.0.1:1", "--insecure-plaintext", "--spool", str(tmp_path / "spool"), "--metrics-listen", ""]
    cfg_off = tmp_path / "agent.yaml"
    cfg_off.write_text("use_qmp: false\n")
    assert main(base) == 0
    assert main([*base, "--no-qmp"]) == 0
    assert main([*base, "--config", str(cfg_off)]) == 0
    assert [c.use_qmp for c in configs] == [True, False, False]

    monkeypatch.undo()
    real = daemon.AgentDaemon(daemon.AgentConfig(server="127.0.0.1:1", insecure_plaintext=True, spool_path=str(tmp_path / "s.sqlite3"),
                                                 metrics_listen="", use_qmp=False))
    try:
        assert real.sampler.config.use_qmp is False
    finally:
        real.spool.close()
