from __future__ import annotations

from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN = Path(__file__).parent / "golden"


def fixture_roots() -> list[Path]:
    return sorted(p for p in FIXTURES.iterdir() if (p / "proc").is_dir())


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES
