from __future__ import annotations

import functools
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN = Path(__file__).parent / "golden"


def fixture_roots() -> list[Path]:
    return sorted(p for p in FIXTURES.iterdir() if (p / "proc").is_dir())


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES


def have_compiler() -> bool:
    """True where setuptools can build the optional C extensions (agent/sources/_smapscan.c,
    server/ingest/_reportscan.c): the compiler Python was built with, and Python.h. There the extensions
    must have been built; a silent fallback would be a packaging bug."""
    import shlex
    import shutil
    import sysconfig

    compiler = shlex.split(sysconfig.get_config_var("CC") or "cc")[0]
    return shutil.which(compiler) is not None and (Path(sysconfig.get_paths()["include"]) / "Python.h").exists()


@functools.cache
def sampled_report_bytes(fixture: str) -> bytes:
    """One real sample of a fixture host as HostReport bytes (sampled once per test session);
    callers parse their own copy: `pb.HostReport.FromString(sampled_report_bytes(...))`."""
    from eptwatch.agent.model.sampler import Sampler
    from eptwatch.agent.report.host_report import host_report
    from eptwatch.agent.sources.hostroot import HostRoot

    return host_report(Sampler(HostRoot.from_root(FIXTURES / fixture)).sample()).SerializeToString()
