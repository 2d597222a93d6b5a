"""Fixtures shared by the real-VM tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from .qemu_vm import build_guest


@pytest.fixture(scope="session")
def guest_elf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test guest, built once per session (every module boots the same one)."""
    return build_guest(tmp_path_factory.mktemp("guest"))
