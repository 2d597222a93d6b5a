"""Which VMAs of a QEMU process back guest RAM, and what kind of memory they are. Pure.

Guest RAM is one or a few large read-write mappings: anonymous, a /dev/shm or other tmpfs file, a
memfd, or hugetlbfs. QEMU's own heap, libraries, thread stacks and malloc arenas are smaller or not
read-write, so a size floor plus the mapping kind separates them.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .smaps import Vma

MIB = 1024 * 1024
PMD_BYTES = 2 * MIB  # x86-64 and arm64 (4 KiB granule) PMD size: the 2 MiB unit everything counts in
# Smallest mapping we consider guest RAM. QEMU's biggest non-RAM rw mappings (malloc arenas are
# 64 MiB reservations, mostly PROT_NONE) stay below this once only the rw part is counted.
DEFAULT_GUEST_RAM_MIN_BYTES = 64 * MIB


class Backing(enum.Enum):
    ANONYMOUS = "anonymous"
    SHMEM = "shmem"
    MEMFD = "memfd"
    HUGETLBFS = "hugetlbfs"
    FILE = "file"


@dataclass(frozen=True)
class GuestRamMapping:
    start: int
    end: int
    path: str
    backing: Backing
    size_bytes: int
    rss_bytes: int
    anon_huge_bytes: int
    shmem_pmd_mapped_bytes: int
    file_pmd_mapped_bytes: int
    hugetlb_bytes: int
    hugetlb_page_bytes: int  # KernelPageSize for hugetlbfs (2 MiB or 1 GiB), else 0
    pmd_aligned: bool  # virtual address and file offset agree modulo 2 MiB: THP-eligible at all
    dev: str
    inode: int
    tmpfs_huge: str | None = None  # huge= of the backing tmpfs mount; None when not tmpfs or unknown
    other_mapper_pids: tuple[int, ...] | None = None  # None: not checked


def _is_pseudo(path: str) -> bool:
    return path.startswith("[") and not path.startswith("[anon:")


def classify_backing(vma: Vma, fstype: str | None) -> Backing | None:
    """The kind of memory behind a VMA, or None when it cannot be guest RAM (stack, vdso, ...)."""
    path = vma.path
    if _is_pseudo(path):
        return None
    if (vma.kernel_page_size_bytes or 4096) > 4096 or path.startswith("/anon_hugepage") or fstype == "hugetlbfs":
        return Backing.HUGETLBFS
    if path == "" or path.startswith("[anon:"):
        return Backing.ANONYMOUS
    if path.startswith("memfd:"):
        return Backing.MEMFD
    if fstype == "tmpfs" or path.startswith("/dev/shm/") or path.startswith("/SYSV"):
        return Backing.SHMEM
    return Backing.FILE


def _pmd_aligned(vma: Vma, backing: Backing) -> bool:
    if backing is Backing.ANONYMOUS:
        # Anonymous THP needs only an aligned 2 MiB range inside the VMA.
        first = -(-vma.start // PMD_BYTES) * PMD_BYTES
        return first + PMD_BYTES <= vma.end
    # File THP additionally needs the file offset to agree with the address modulo 2 MiB.
    return (vma.start - vma.offset) % PMD_BYTES == 0 and vma.length >= PMD_BYTES


def attribute_guest_ram(
    vmas: Iterable[Vma],
    fstype_for_path: Callable[[str], str | None] = lambda _path: None,
    min_bytes: int = DEFAULT_GUEST_RAM_MIN_BYTES,
) -> list[GuestRamMapping]:
    out: list[GuestRamMapping] = []
    for vma in vmas:
        if vma.length < min_bytes or "rw" not in vma.perms[:2]:
            continue
        fstype = fstype_for_path(vma.path) if vma.path.startswith("/") else None
        backing = classify_backing(vma, fstype)
        if backing is None:
            continue
        if backing is Backing.FILE and "x" in vma.perms:
            continue  # an executable file mapping is code, not RAM
        hugetlb_page = vma.kernel_page_size_bytes or 0
        out.append(
            GuestRamMapping(
                start=vma.start,
                end=vma.end,
                path=vma.path,
                backing=backing,
                size_bytes=vma.size_bytes if vma.size_bytes is not None else vma.length,
                rss_bytes=vma.rss_bytes or 0,
                anon_huge_bytes=vma.anon_huge_bytes or 0,
                shmem_pmd_mapped_bytes=vma.shmem_pmd_mapped_bytes or 0,
                file_pmd_mapped_bytes=vma.file_pmd_mapped_bytes or 0,
                hugetlb_bytes=vma.hugetlb_bytes,
                hugetlb_page_bytes=hugetlb_page if backing is Backing.HUGETLBFS else 0,
                pmd_aligned=_pmd_aligned(vma, backing),
                dev=vma.dev,
                inode=vma.inode,
            )
        )
    return out
