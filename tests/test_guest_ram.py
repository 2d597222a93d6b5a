"""Guest-RAM classification on the smaps text real kernels print (issue 12).

The blocks come from tests/fixtures/captured/ (real QEMU/KVM VMs on 6.18, capture_real.py), so each
backend is classified from exactly what the kernel printed for it.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from eptwatch.agent.model.predicate import Cause, Era, _host_side_reason
from eptwatch.agent.sources.guest_ram import (
    Backing,
    attribute_guest_ram,
    classify_backing,
    on_internal_shm_mount,
    unreal_mapping_name,
)
from eptwatch.agent.sources.smaps import parse_smaps
from eptwatch.agent.sources.thp import ThpSettings

from .conftest import FIXTURES

CAPTURED = FIXTURES / "captured"
MIB = 1 << 20


def _captured(case: str) -> str:
    path = CAPTURED / f"{case}.smaps"
    if not path.exists():
        pytest.fail(f"{path} missing: run tests/fixtures/capture_real.py")
    return path.read_text()


def _fstype_of(case: str) -> str | None:
    # What the process's mountinfo says for the path (the e2e test checks this against the real host).
    return {"tmpfs-always": "tmpfs", "tmpfs-never": "tmpfs", "mem-path-tmpfs": "tmpfs", "hugetlbfs-2m": "hugetlbfs",
            "hugetlbfs-1g": "hugetlbfs", "file-ext4": "ext4", "file-ext4-unaligned": "ext4"}.get(case, "ext4")


# case -> (backing, hugetlb page bytes)
EXPECTED = {
    "ram-thp": (Backing.ANONYMOUS, 0),
    "ram-nothp": (Backing.ANONYMOUS, 0),
    "ram-shared": (Backing.SHMEM, 0),
    "ram-shared-thp": (Backing.SHMEM, 0),
    "memfd": (Backing.MEMFD, 0),
    "memfd-thp": (Backing.MEMFD, 0),
    "memfd-hugetlb-2m": (Backing.HUGETLBFS, 2 * MIB),
    "tmpfs-always": (Backing.SHMEM, 0),
    "tmpfs-never": (Backing.SHMEM, 0),
    "mem-path-tmpfs": (Backing.SHMEM, 0),
    "hugetlbfs-2m": (Backing.HUGETLBFS, 2 * MIB),
    "hugetlbfs-1g": (Backing.HUGETLBFS, 1024 * MIB),
    "file-ext4": (Backing.FILE, 0),
    "file-ext4-unaligned": (Backing.FILE, 0),
}


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_captured_real_smaps_are_classified_by_backend(case: str) -> None:
    # (every captured case is listed: a new one must say what it is)
    assert {p.stem for p in CAPTURED.glob("*.smaps")} - {"tmpfs-advise", "tmpfs-within_size"} == set(EXPECTED)
    (vma,) = parse_smaps(_captured(case), case)
    backing, page = EXPECTED[case]
    # Every name goes through the mount lookup as the sampler does: the root filesystem is ext4, so a
    # memfd or /dev/zero that reached it would come out FILE (the bug this guards).
    (m,) = attribute_guest_ram([vma], lambda _p: _fstype_of(case))
    assert m.backing is backing, (vma.path, m.backing)
    assert m.hugetlb_page_bytes == page


def test_memfd_name_has_a_leading_slash_and_is_deleted() -> None:
    (vma,) = parse_smaps(_captured("memfd"))
    assert vma.path == "/memfd:memory-backend-memfd" and vma.deleted
    assert classify_backing(vma, "ext4") is Backing.MEMFD
    # Not deleted: a regular file that happens to be called /memfd:x is a file.
    assert classify_backing(replace(vma, deleted=False), "ext4") is Backing.FILE


def test_hugetlb_memfd_is_hugetlbfs_by_its_page_size() -> None:
    (vma,) = parse_smaps(_captured("memfd-hugetlb-2m"))
    assert vma.path.startswith("/memfd:") and vma.kernel_page_size_bytes == 2 * MIB
    assert classify_backing(vma, None) is Backing.HUGETLBFS


def test_internal_shm_mount_kinds() -> None:
    for case, kind in (("memfd", "memfd"), ("ram-shared", "shared anonymous memory"), ("tmpfs-never", None), ("ram-thp", None)):
        (m,) = attribute_guest_ram(parse_smaps(_captured(case)), lambda _p, c=case: _fstype_of(c))
        if case == "tmpfs-never":
            m = replace(m, tmpfs_huge="never")  # the sampler fills this from mountinfo
        assert on_internal_shm_mount(m) == kind, case
    # /dev on a tmpfs (containers): the shared anonymous mapping is still on the internal mount.
    (m,) = attribute_guest_ram(parse_smaps(_captured("ram-shared")), lambda _p: "tmpfs")
    assert m.backing is Backing.SHMEM and on_internal_shm_mount(replace(m, tmpfs_huge="never")) == "shared anonymous memory"
    cause, why = _host_side_reason(replace(m, tmpfs_huge="never"), Era.HOST_PAGE_WALK, ThpSettings(shmem_enabled="never"), True)
    assert cause is Cause.THP_DISABLED and "shmem_enabled is never" in why


@pytest.mark.parametrize(
    ("name", "real"),
    [
        ("", True),
        ("/memfd:memory-backend-memfd (deleted)", True),
        ("/dev/zero (deleted)", True),
        ("[heap]", True),
        ("[anon:guest]", True),
        ("anon_inode:kvm-vcpu:0", True),
        ("/usr/bin/qemu-system-x86_64", True),
        ("memfd:pc.ram (deleted)", False),
        ("memfd:pc.ram", False),
        ("/memfd:pc.ram", False),
        ("dev/shm/x", False),
    ],
)
def test_unreal_mapping_name(name: str, real: bool) -> None:
    assert (unreal_mapping_name(name) is None) is real, unreal_mapping_name(name)


def _reason(case: str, thp: ThpSettings, tmpfs_huge: str | None = None) -> tuple[Cause, str]:
    (m,) = attribute_guest_ram(parse_smaps(_captured(case)), lambda _p: _fstype_of(case))
    return _host_side_reason(replace(m, tmpfs_huge=tmpfs_huge), Era.HOST_PAGE_WALK, thp, True)


def test_reasons_seen_on_real_vms() -> None:
    never = ThpSettings(enabled="madvise", shmem_enabled="never", defrag="madvise")
    advise = replace(never, shmem_enabled="advise")
    cause, why = _reason("memfd", never)
    assert cause is Cause.THP_DISABLED and "shmem_enabled is never (memfd" in why
    cause, why = _reason("ram-shared", never)
    assert cause is Cause.THP_DISABLED and "shared anonymous memory" in why and "tmpfs" not in why
    cause, why = _reason("memfd-thp", advise)  # QEMU maps a memfd only 4 KiB aligned
    assert cause is Cause.HOST_MAPPING_NOT_HUGE and "memory-backend-memfd has no align=" in why
    cause, why = _reason("file-ext4-unaligned", never)
    assert cause is Cause.HOST_MAPPING_NOT_HUGE and "align=2M" in why
    cause, why = _reason("mem-path-tmpfs", never, tmpfs_huge="always")
    assert cause is Cause.HOST_MAPPING_NOT_HUGE and "-mem-path" in why
    cause, why = _reason("tmpfs-never", never, tmpfs_huge="never")
    assert cause is Cause.HOST_MAPPING_NOT_HUGE and "huge=never" in why


def test_aligned_regular_file_is_not_said_to_be_beyond_thp() -> None:
    # A writable ext4 file was PMD-mapped on 6.18: the explanation must not claim THP cannot apply.
    (m,) = attribute_guest_ram(parse_smaps(_captured("file-ext4")), lambda _p: "ext4")
    assert m.pmd_aligned and m.file_pmd_mapped_bytes > 0
    _cause, why = _host_side_reason(replace(m, file_pmd_mapped_bytes=0), Era.HOST_PAGE_WALK, ThpSettings(), True)
    assert "does not apply" not in why and "large folios" in why


def test_sampler_takes_no_tmpfs_huge_for_shared_anonymous_memory_when_dev_is_a_tmpfs() -> None:
    from eptwatch.agent.model.sampler import Sampler
    from eptwatch.agent.sources.thp import Mount

    dev_tmpfs = [Mount("/", "ext4", ("rw",), "/dev/vda1"), Mount("/dev", "tmpfs", ("rw", "huge=always"), "tmpfs")]
    (shared,) = attribute_guest_ram(parse_smaps(_captured("ram-shared")), lambda _p: "tmpfs")
    assert Sampler._with_tmpfs_huge(shared, dev_tmpfs).tmpfs_huge is None  # /dev/zero: shmem_enabled decides
    # A real tmpfs file still takes its mount's huge= option.
    (tmpfs_file,) = attribute_guest_ram(parse_smaps(_captured("tmpfs-always")), lambda _p: "tmpfs")
    mounts = [Mount("/", "ext4", ("rw",), "/dev/vda1"), Mount(tmpfs_file.path.rsplit("/", 1)[0], "tmpfs", ("rw", "huge=always"), "tmpfs")]
    assert Sampler._with_tmpfs_huge(tmpfs_file, mounts).tmpfs_huge == "always"
