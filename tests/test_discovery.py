"""Discovery reads fd links only where a VM can be: its cost follows the VMM processes, not every fd
on the host (issue 12), and the reads stay beneath --root."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from eptwatch.agent.sources.discovery import discover_vms, vm_fds_of
from eptwatch.agent.sources.hostroot import HostRoot

FIXTURE = Path(__file__).parent / "fixtures" / "linux-6.6-pages2m"
STAT = "{pid} ({comm}) S 1 {pid} {pid} 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0 424242 1000 100 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0\n"


def _process(root: Path, pid: int, comm: str, argv: list[str], links: dict[str, str]) -> None:
    d = root / "proc" / str(pid)
    (d / "fd").mkdir(parents=True)
    (d / "comm").write_text(comm + "\n")
    (d / "cmdline").write_bytes(b"".join(a.encode() + b"\0" for a in argv))
    (d / "stat").write_text(STAT.format(pid=pid, comm=comm))
    for name, target in links.items():
        (d / "fd" / name).symlink_to(target)


@pytest.fixture
def host(tmp_path: Path) -> Path:
    root = tmp_path / "host"
    shutil.copytree(FIXTURE, root, symlinks=True)
    return root


def _listed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    listed: list[str] = []
    original = HostRoot.readlinks

    def readlinks(self: HostRoot, path: Path) -> list[tuple[str, str]]:
        listed.append(path.parent.name)
        return original(self, path)

    monkeypatch.setattr(HostRoot, "readlinks", readlinks)
    return listed


def test_fd_links_are_read_only_for_vmm_candidates(host: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    many = {str(i): "/dev/null" for i in range(300)}
    for pid in range(500, 520):  # daemons with many fds: never listed
        _process(host, pid, "sshd", ["/usr/sbin/sshd", "-D"], many)
    _process(host, 600, "vm-web", ["/usr/bin/qemu-system-x86_64", "-name", "web,process=vm-web"], {"3": "/dev/kvm", "9": "anon_inode:kvm-vm"})
    _process(host, 700, "firecracker", ["/usr/bin/firecracker", "--api-sock", "/x"], {"5": "anon_inode:kvm-vm"})
    _process(host, 710, "firecracker", ["/usr/bin/firecracker"], {"5": "/dev/null"})  # no VM fd: no VM
    _process(host, 720, "kvm-pit", [], {})  # a kernel thread: its name is not enough
    listed = _listed(monkeypatch)
    vms, notes = discover_vms(HostRoot.from_root(host), [(8100, 14), (8200, 15)])
    assert sorted(set(listed)) == ["600", "700", "710", "720", "8100", "8200"]
    by = {v.pid: (v.vm_fds, v.discovered_by) for v in vms}
    assert by[600] == ((9,), ("cmdline", "vm_fd"))  # renamed by -name process=: found by argv[0]
    assert by[700] == ((5,), ("vm_fd",))
    assert by[8100][1] == ("cmdline", "debugfs", "vm_fd")
    assert sorted(by) == [600, 700, 8100, 8200] and notes == []


def test_cost_follows_vmm_processes_not_host_fds(host: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Adding fds to other processes adds no link read; adding a QEMU adds one fd listing."""
    listed = _listed(monkeypatch)
    discover_vms(HostRoot.from_root(host), [])
    before = len(listed)
    for pid in range(500, 510):
        _process(host, pid, "postgres", ["postgres"], {str(i): "/dev/null" for i in range(100)})
    listed.clear()
    discover_vms(HostRoot.from_root(host), [])
    assert len(listed) == before
    _process(host, 900, "qemu-system-x86", ["/usr/bin/qemu-system-x86_64", "-name", "db"], {"7": "anon_inode:kvm-vm"})
    listed.clear()
    vms, _ = discover_vms(HostRoot.from_root(host), [])
    assert len(listed) == before + 1 and 900 in {v.pid for v in vms}


def test_fd_directory_outside_the_root_is_not_read(host: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "3").symlink_to("anon_inode:kvm-vm")
    _process(host, 800, "qemu-system-x86", ["/usr/bin/qemu-system-x86_64"], {})
    os.rmdir(host / "proc/800/fd")
    (host / "proc/800/fd").symlink_to(outside)  # absolute: leaves the root
    root = HostRoot.from_root(host)
    assert vm_fds_of(root, 800) == []
    (host / "proc/800/fd").unlink()
    (host / "proc/800/fd").symlink_to("../../../outside")  # relative, climbing out: the same
    assert vm_fds_of(root, 800) == []
    vms, _ = discover_vms(root, [])
    assert [v.vm_fds for v in vms if v.pid == 800] == [()]  # still a QEMU by name, with no fd read outside


def test_live_host_finds_its_own_vm_fd() -> None:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("no usable /dev/kvm")
    import fcntl

    kvm = os.open("/dev/kvm", os.O_RDWR)
    try:
        vm = fcntl.ioctl(kvm, 0xAE01, 0)  # KVM_CREATE_VM
        try:
            assert vm_fds_of(HostRoot(), os.getpid()) == [vm]
        finally:
            os.close(vm)
    finally:
        os.close(kvm)
