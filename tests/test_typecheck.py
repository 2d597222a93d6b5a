"""agent/ and server/ type-check clean under the settings in pyproject.toml ([tool.mypy])."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_mypy_is_clean(pytestconfig: pytest.Config) -> None:
    # pytest's cache directory: kept between runs (incremental checks), apart from the repository's own.
    assert pytestconfig.cache is not None, "needs pytest's cacheprovider plugin"
    cache = pytestconfig.cache.mkdir("mypy")
    out = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(cache)], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "no issues found" in out.stdout
