"""A wheel carries the namespaced packages and the console scripts, and imports outside the tree."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_wheel_install_works(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(REPO)],
                   check=True, capture_output=True)
    (wheel,) = tmp_path.glob("eptwatch-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "eptwatch/agent/sampler.py" in names and "eptwatch/v1/report_pb2.py" in names
    assert "eptwatch/server/cli.py" in names and "eptwatch/agent/py.typed" in names
    assert not any(n.startswith(("agent/", "server/", "tests/")) for n in names)  # no bare top-level packages
    compiled = [n for n in names if n.startswith(("eptwatch/agent/_smapscan", "eptwatch/server/_reportscan")) and n.endswith(".so")]
    if shutil.which("cc") is not None and (Path(sysconfig.get_paths()["include"]) / "Python.h").exists():
        assert len(compiled) == 2, f"a compiler is available but the wheel has only {compiled} of the two extensions"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "eptwatch-agent = eptwatch.agent.cli:main" in text and "eptwatch-server = eptwatch.server.cli:main" in text
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)], check=True, capture_output=True)
    # Run from an empty directory with only the installed copy first on the path: no source tree leaks in.
    out = subprocess.run(
        [sys.executable, "-c", "import eptwatch.agent.sampler as s, eptwatch.v1.report_pb2 as r, eptwatch.agent.smaps as m; "
         "import eptwatch.server.validate as v, sys; print(s.__file__); print(r.__file__); "
         "m.SCANNER == 'c' and print(sys.modules['eptwatch.agent._smapscan'].__file__); "
         "v.WALKER == 'c' and print(sys.modules['eptwatch.server._reportscan'].__file__)"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(target)}, capture_output=True, text=True, check=True,
    )
    assert all(line.startswith(str(target)) for line in out.stdout.split())
    assert len(out.stdout.split()) == 2 + len(compiled)  # the installed wheel loads its own compiled extensions
