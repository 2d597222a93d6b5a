"""A wheel carries the namespaced packages and the console scripts, and imports outside the tree."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from .conftest import have_compiler

REPO = Path(__file__).resolve().parent.parent
# Where each installed package's modules come from (pyproject.toml, [tool.setuptools.package-dir]).
PACKAGE_DIRS = {"eptwatch/agent/": "agent/", "eptwatch/server/": "server/", "eptwatch/common/": "common/", "eptwatch/v1/": "proto/eptwatch/v1/"}


def test_wheel_install_works(tmp_path: Path) -> None:
    # Built from a clean copy: the repository's build/ (stale modules, old compiled extensions) and the
    # in-place .so files of an editable install must not reach the wheel or stand in for a failed compile.
    src = tmp_path / "src"
    shutil.copytree(REPO, src, symlinks=True, ignore=shutil.ignore_patterns("build", ".venv", ".git", "*.egg-info", "__pycache__", ".hypothesis",
                                                             ".pytest_cache", ".mypy_cache", ".cache", "*.so", "artifacts"))
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src)],
                   check=True, capture_output=True)
    (wheel,) = dist.glob("eptwatch-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    modules = [n for n in names if n.endswith(".py") and n.startswith(tuple(PACKAGE_DIRS))]
    assert modules
    for n in modules:  # nothing in the wheel without a source in the repository (e.g. a module deleted since)
        prefix = next(p for p in PACKAGE_DIRS if n.startswith(p))
        assert (REPO / PACKAGE_DIRS[prefix] / n.removeprefix(prefix)).is_file(), f"{n} has no source in the repository"
    assert "eptwatch/agent/model/sampler.py" in names and "eptwatch/v1/report_pb2.py" in names
    # Every subpackage of the repository is in the wheel (pyproject.toml lists them one by one).
    for prefix, directory in PACKAGE_DIRS.items():
        for init in (REPO / directory).rglob("__init__.py"):
            assert f"{prefix}{init.relative_to(REPO / directory).as_posix()}" in names, init
    assert "eptwatch/agent/sources/collectors/smaps.py" in names
    assert "eptwatch/server/cli.py" in names and "eptwatch/agent/py.typed" in names
    assert "eptwatch/common/config.py" in names and "eptwatch/common/py.typed" in names
    assert not any(n.startswith(("agent/", "server/", "common/", "tests/")) for n in names)  # no bare top-level packages
    compiled = [n for n in names if n.startswith(("eptwatch/agent/sources/_smapscan", "eptwatch/server/ingest/_reportscan")) and n.endswith(".so")]
    if have_compiler():
        assert len(compiled) == 2, f"a compiler is available but the wheel has only {compiled} of the two extensions"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "eptwatch-agent = eptwatch.agent.faces.cli:main" in text and "eptwatch-server = eptwatch.server.cli:main" in text
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)], check=True, capture_output=True)
    # Run from an empty directory with only the installed copy first on the path: no source tree leaks in.
    empty = tmp_path / "empty"
    empty.mkdir()
    out = subprocess.run(
        [sys.executable, "-c", "import eptwatch.agent.model.sampler as s, eptwatch.v1.report_pb2 as r, eptwatch.agent.sources.smaps as m; "
         "import eptwatch.server.ingest.validate as v, sys; print(s.__file__); print(r.__file__); "
         "m.SCANNER == 'c' and print(sys.modules['eptwatch.agent.sources._smapscan'].__file__); "
         "v.WALKER == 'c' and print(sys.modules['eptwatch.server.ingest._reportscan'].__file__)"],
        cwd=empty, env={**os.environ, "PYTHONPATH": str(target)}, capture_output=True, text=True, check=True,
    )
    assert all(line.startswith(str(target)) for line in out.stdout.split())
    assert len(out.stdout.split()) == 2 + len(compiled)  # the installed wheel loads its own compiled extensions
