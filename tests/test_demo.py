"""The README's main command: the embedded demo, run for real."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

from .procs import BIN, free_port


def demo_args(tmp_path: Path, *extra: str) -> list[str]:
    return [str(BIN / "eptwatch-demo"), "--hosts", "60", "--interval", "2", "--summary-every", "3", "--state", str(tmp_path / "state"),
            "--grpc-port", str(free_port()), "--http-port", str(free_port()), *extra]


def leftovers(tmp_path: Path) -> list[str]:
    out = subprocess.run(["pgrep", "-af", str(tmp_path / "state")], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "pgrep" not in line]


def test_demo_shows_regressed_and_known_bad_kernels(tmp_path: Path) -> None:
    out = subprocess.run(demo_args(tmp_path, "--duration", "12"), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "fleet page   http://127.0.0.1:" in text and "/metrics" in text
    assert "61 fresh hosts" in text  # 60 simulated + the real agent on this host
    row = [line for line in text.splitlines() if line.strip().startswith("6.6.15 ")][-1]
    assert "REGRESSED" in row
    row = [line for line in text.splitlines() if line.strip().startswith("5.3.0 ")][-1]
    assert "known-bad" in row
    assert "5.3.0: lacks 169226f7e0" in text
    assert not leftovers(tmp_path)


def test_demo_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    p = subprocess.Popen(demo_args(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert p.stdout is not None
    deadline = time.monotonic() + 60
    for line in p.stdout:
        if "Ctrl-C stops everything" in line or time.monotonic() > deadline:
            break
    time.sleep(2)
    p.send_signal(signal.SIGINT)
    assert p.wait(30) == 0
    assert "stopping" in p.stdout.read()
    assert not leftovers(tmp_path)
    assert "shutting down" in (tmp_path / "state" / "aggregator.log").read_text()
