"""Proves the real-VM harness (qemu_vm.py) against the real host kernel.

Each test boots the freestanding guest under QEMU/KVM with 1 GiB of guest RAM
on a specific backend and checks what the host kernel reports for it:
/proc/PID/smaps of the guest-RAM VMA, /proc/PID/status, the per-VM KVM
debugfs counters and QMP ``query-stats``.

Skips (with the reason) when /dev/kvm, qemu-system-x86_64, as/ld or root are
missing, or when EPTWATCH_SKIP_E2E=1.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar, cast

import pytest

from .qemu_vm import (
    QemuVm,
    build_guest,
    ensure_debugfs,
    mounted_tmpfs,
    real_vm_skip_reason,
)

MIB = 1024  # smaps values are in kB
MEM_MIB = 1024
TOUCH_TIMEOUT = 90.0
TWO_MIB = 2 << 20


_REASON = real_vm_skip_reason("tmpfs mounts, debugfs")
_F = TypeVar("_F")


def needs_kvm(obj: _F) -> _F:
    """Mark ``kvm`` (registered in pyproject.toml) and skip with the reason."""
    marked = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")(obj)
    return cast(_F, pytest.mark.kvm(marked))


def _need_debugfs() -> None:
    if not ensure_debugfs():
        pytest.skip("KVM debugfs (/sys/kernel/debug/kvm) not available")


def _boot(vm: QemuVm) -> float:
    """Wait (the VM is started by ``with``) until the guest touched its RAM;
    returns the seconds since QEMU was started."""
    vm.wait_touched(timeout=TOUCH_TIMEOUT)
    vm.wait_ready()
    assert vm.started_at is not None
    return time.monotonic() - vm.started_at


def test_guest_builds(tmp_path: Path) -> None:
    for tool in ("as", "ld"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (apt-get install -y binutils)")
    elf = build_guest(tmp_path)
    data = elf.read_bytes()
    assert data[:5] == b"\x7fELF\x01"  # ELF32: QEMU's multiboot loader refuses ELF64
    magic = (0x1BADB002).to_bytes(4, "little")
    # multiboot v1 header: 4-byte aligned, within the first 8 KiB of the file
    off = data.find(magic)
    assert 0 <= off < 8192 - 12 and off % 4 == 0
    flags = int.from_bytes(data[off + 4 : off + 8], "little")
    checksum = int.from_bytes(data[off + 8 : off + 12], "little")
    assert (0x1BADB002 + flags + checksum) & 0xFFFFFFFF == 0


# ---------------------------------------------------------------------------
# 1 GiB on tmpfs huge=always: one VM shared by the tests of this class.
# Class scope (not module scope) so it is gone before the next VM boots: on
# the shadow-paging development host an idle second VM roughly doubles the
# boot and touch time of another one.


@pytest.fixture(scope="class")
def huge_vm(
    guest_elf: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[QemuVm]:
    if _REASON is not None:
        pytest.skip(_REASON)
    tmp = tmp_path_factory.mktemp("huge-always")
    with mounted_tmpfs(tmp, huge="always", size="1100M") as mnt:
        with QemuVm(
            guest_elf,
            name="e2e-huge-always",
            memory_mib=MEM_MIB,
            backend="file",
            mem_path=mnt.path / "guest.ram",
            align_2m=True,
            workdir=tmp,
        ) as vm:
            _boot(vm)
            yield vm


@needs_kvm
class TestFileHugeAlways:
    def test_shmem_pmd_mapped(self, huge_vm: QemuVm) -> None:
        vma = huge_vm.ram_vma()
        assert vma.size == MEM_MIB << 20
        assert vma.start % TWO_MIB == 0, hex(vma.start)
        assert vma.fields["ShmemPmdMapped"] > 900 * MIB, vma.fields
        assert vma.fields["Rss"] > 900 * MIB, vma.fields

    def test_kvm_debugfs_pages_2m(self, huge_vm: QemuVm) -> None:
        _need_debugfs()
        d = huge_vm.debugfs_dir()
        assert d is not None and d.name.startswith(f"{huge_vm.pid}-")
        counts = huge_vm.kvm_page_counts()
        assert counts["pages_2m"] > 400, counts
        assert counts["pages_4k"] < 1000, counts

    def test_qmp_query_stats_vm_pages_2m(self, huge_vm: QemuVm) -> None:
        stats = huge_vm.query_stats_vm()
        assert "pages_2m" in stats, sorted(stats)
        assert stats["pages_2m"] > 400, stats
        assert "pages_4k" in stats
        if ensure_debugfs():  # same KVM counters, idle guest: identical values
            assert huge_vm.kvm_page_counts()["pages_2m"] == stats["pages_2m"]

    def test_vm_is_identifiable(self, huge_vm: QemuVm) -> None:
        cmdline = Path(f"/proc/{huge_vm.pid}/cmdline").read_bytes().split(b"\0")
        assert b"guest=e2e-huge-always,debug-threads=on" in cmdline
        assert huge_vm.uuid.encode() in cmdline
        comms = {
            (t / "comm").read_text().strip()
            for t in Path(f"/proc/{huge_vm.pid}/task").iterdir()
        }
        assert "CPU 0/KVM" in comms, comms

    def test_guest_retouch_and_ping(self, huge_vm: QemuVm) -> None:
        before = huge_vm.kvm_page_counts()["pages_2m"] if ensure_debugfs() else None
        info = huge_vm.retouch(timeout=TOUCH_TIMEOUT)
        assert info.pass_no >= 2
        assert info.start == 8 << 20 and info.end > 1000 << 20
        huge_vm.ping()
        if before is not None:
            assert huge_vm.kvm_page_counts()["pages_2m"] == before


# ---------------------------------------------------------------------------
# negative controls, one VM each


@needs_kvm
def test_file_huge_never(guest_elf: Path, tmp_path: Path) -> None:
    with mounted_tmpfs(tmp_path, huge="never", size="1100M") as mnt:
        with QemuVm(
            guest_elf,
            name="e2e-huge-never",
            memory_mib=MEM_MIB,
            backend="file",
            mem_path=mnt.path / "guest.ram",
            workdir=tmp_path,
        ) as vm:
            _boot(vm)
            vma = vm.ram_vma()
            assert vma.start % TWO_MIB == 0
            assert vma.fields["ShmemPmdMapped"] == 0, vma.fields
            assert vma.fields["Rss"] > 900 * MIB, vma.fields
            if ensure_debugfs():
                counts = vm.kvm_page_counts()
                assert counts["pages_2m"] == 0, counts
                assert counts["pages_4k"] > 200_000, counts
            # the guest's own ACPI S5 power-off ends QEMU cleanly
            assert vm.poweroff(timeout=15) == 0
            assert "EPTWATCH-POWEROFF" in vm.serial_output()


@needs_kvm
def test_file_unaligned_mapping_is_not_pmd_mapped(
    guest_elf: Path, tmp_path: Path
) -> None:
    with mounted_tmpfs(tmp_path, huge="always", size="1100M") as mnt:
        with QemuVm(
            guest_elf,
            name="e2e-unaligned",
            memory_mib=MEM_MIB,
            backend="file",
            mem_path=mnt.path / "guest.ram",
            align_2m=False,
            workdir=tmp_path,
        ) as vm:
            _boot(vm)
            vma = vm.ram_vma()
            assert vma.start % TWO_MIB != 0, hex(vma.start)
            assert vma.fields["ShmemPmdMapped"] == 0, vma.fields
            assert vma.fields["Rss"] > 900 * MIB, vma.fields
            if ensure_debugfs():
                assert vm.kvm_page_counts()["pages_2m"] == 0


def _anon_thp_mode() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "missing"
    return text.split("[", 1)[1].split("]", 1)[0] if "[" in text else text.strip()


@needs_kvm
def test_anon_ram_thp(guest_elf: Path, tmp_path: Path) -> None:
    mode = _anon_thp_mode()
    if mode not in ("always", "madvise"):
        pytest.skip(f"anonymous THP is {mode!r} on this host")
    with QemuVm(
        guest_elf,
        name="e2e-anon-thp",
        memory_mib=MEM_MIB,
        backend="ram",
        workdir=tmp_path,
    ) as vm:
        _boot(vm)
        assert vm.status()["THP_enabled"] == "1"
        vma = vm.ram_vma()
        assert vma.start % TWO_MIB == 0
        assert vma.fields["AnonHugePages"] > 0, vma.fields
        assert vma.fields["AnonHugePages"] > 900 * MIB, vma.fields
        if ensure_debugfs():
            assert vm.kvm_page_counts()["pages_2m"] > 400


@needs_kvm
def test_anon_ram_thp_disabled(guest_elf: Path, tmp_path: Path) -> None:
    with QemuVm(
        guest_elf,
        name="e2e-anon-nothp",
        memory_mib=MEM_MIB,
        backend="ram",
        thp_disable=True,
        workdir=tmp_path,
    ) as vm:
        _boot(vm)
        assert vm.status()["THP_enabled"] == "0"
        vma = vm.ram_vma()
        assert vma.fields["AnonHugePages"] == 0, vma.fields
        assert vma.fields["Rss"] > 900 * MIB, vma.fields
        if ensure_debugfs():
            counts = vm.kvm_page_counts()
            assert counts["pages_2m"] == 0, counts
            assert counts["pages_4k"] > 200_000, counts


@needs_kvm
def test_stop_kills_unresponsive_qemu_by_pid(guest_elf: Path, tmp_path: Path) -> None:
    vm = QemuVm(
        guest_elf, name="e2e-kill", memory_mib=64, backend="ram", workdir=tmp_path
    )
    try:
        vm.start()
        pid = vm.pid
        os.kill(pid, signal.SIGSTOP)  # QMP quit cannot be answered now
        rc = vm.stop(timeout=1.0)
        assert rc == -signal.SIGKILL  # it gave up on QMP and killed by pid: what happened, not how fast
        assert not Path(f"/proc/{pid}").exists()
    finally:
        vm.stop()
