"""Which VMAs of a QEMU process back guest RAM, and what kind of memory they are. Pure.

Guest RAM is one or a few large read-write mappings: anonymous, a /dev/shm or other tmpfs file, a
memfd, or hugetlbfs. QEMU's own heap, libraries, thread stacks and malloc arenas are smaller or not
read-write, so a size floor plus the mapping kind separates them.

What the kernel prints as the mapping name (checked on real QEMU/KVM VMs, tests/e2e/test_backends_e2e.py;
captured text in tests/fixtures/captured/), by QEMU backend:
- memory-backend-ram: "" (private anonymous), "[anon:NAME]" when named by prctl;
  with share=on: "/dev/zero (deleted)" (shared anonymous memory is shmem on the internal mount)
- memory-backend-memfd: "/memfd:NAME (deleted)" (leading slash: d_path on the internal shm mount);
  with hugetlb=on the same name, but the file is on hugetlbfs (KernelPageSize 2048 kB or 1048576 kB)
- memory-backend-file / -mem-path: the file's path, " (deleted)" once unlinked (QEMU unlinks the
  temporary file it creates when mem-path is a directory); its mount's fstype tells tmpfs,
  hugetlbfs or a regular filesystem
- MAP_HUGETLB anonymous: "/anon_hugepage (deleted)"; SysV shm: "/SYSV%08x (deleted)"
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from eptwatch.agent.sources.smaps import Vma

MIB = 1024 * 1024
GIB = 1024 * MIB
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
    return path.startswith("[") and not path.startswith(("[anon:", "[anon_shmem:"))


# Names the kernel gives files on its internal mounts: d_path() from the mount's root, so they carry a
# leading slash but live on no mount the process can see (mountinfo would wrongly say "/" is ext4).
MEMFD_PREFIX = "/memfd:"
SHARED_ANON_NAME = "/dev/zero"  # MAP_SHARED|MAP_ANONYMOUS: a shmem file named after /dev/zero
SYSV_SHM_PREFIX = "/SYSV"
ANON_HUGETLB_NAME = "/anon_hugepage"
# Dentry names made by d_dname() (pseudo filesystems): printed without a slash.
_DNAME_PREFIXES = ("anon_inode:", "socket:", "pipe:", "dmabuf:")


def is_memfd(vma: Vma) -> bool:
    """A memfd_create() file: named "/memfd:NAME" and always unlinked (" (deleted)")."""
    return vma.path.startswith(MEMFD_PREFIX) and vma.deleted


def unreal_mapping_name(name: str) -> str | None:
    """Why ``name`` (a smaps/maps pathname as printed, " (deleted)" included) cannot have been printed
    by a real kernel, or None when it can. Guards the fixtures against hand-written names: the
    slash-less "memfd:NAME" form, which no kernel prints, once hid that real memfd guest RAM was misread."""
    if name.startswith(MEMFD_PREFIX) and not name.endswith(" (deleted)"):
        return "a memfd is never linked: the kernel prints /memfd:NAME (deleted)"
    if name == "" or name.startswith("/"):
        return None
    if name.startswith("memfd:"):
        return "a memfd is printed with a leading slash: /memfd:NAME (deleted)"
    if name.startswith("[") and name.endswith("]"):
        return None
    if name.startswith(_DNAME_PREFIXES):
        return None
    return "not an absolute path, a [pseudo] name or a pseudo-filesystem name"


def classify_backing(vma: Vma, fstype: str | None) -> Backing | None:
    """The kind of memory behind a VMA, or None when it cannot be guest RAM (stack, vdso, ...).

    ``fstype`` is the type of the mount the path lies under (from the process's mountinfo), or None.
    The kernel's internal-mount names are decided before it: "/memfd:x" would otherwise resolve to
    the "/" mount (ext4, a regular file) and "/dev/zero" to devtmpfs."""
    path = vma.path
    if _is_pseudo(path):
        return None
    # KernelPageSize first: a memfd with MFD_HUGETLB (memory-backend-memfd,hugetlb=on) has the memfd
    # name but lives on hugetlbfs.
    if (vma.kernel_page_size_bytes or 4096) > 4096 or path.startswith(ANON_HUGETLB_NAME) or fstype == "hugetlbfs":
        return Backing.HUGETLBFS
    if path == "" or path.startswith("[anon:"):
        return Backing.ANONYMOUS
    if is_memfd(vma):
        return Backing.MEMFD
    if vma.deleted and (path == SHARED_ANON_NAME or path.startswith(SYSV_SHM_PREFIX)):
        return Backing.SHMEM
    if path.startswith("[anon_shmem:"):
        return Backing.SHMEM  # a named shared anonymous mapping (prctl PR_SET_VMA_ANON_NAME, 6.2+)
    if fstype == "tmpfs" or path.startswith("/dev/shm/"):
        return Backing.SHMEM
    return Backing.FILE


def on_internal_shm_mount(m: GuestRamMapping) -> str | None:
    """What a shmem mapping on the kernel's internal shm mount is ("memfd", "shared anonymous memory",
    "SysV shared memory"), or None. Those follow transparent_hugepage/shmem_enabled, not a tmpfs huge=."""
    if m.backing is Backing.MEMFD:
        return "memfd"
    # By name alone, whatever mount the name seems to lie under: in a container /dev is often a tmpfs,
    # and a tmpfs_huge found for "/dev/zero" there would describe the wrong filesystem.
    if m.backing is Backing.SHMEM:
        if m.path == SHARED_ANON_NAME or m.path.startswith("[anon_shmem:"):
            return "shared anonymous memory"
        if m.path.startswith(SYSV_SHM_PREFIX):
            return "SysV shared memory"
    return None


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
        # Names on the kernel's internal mounts resolve to no mount of the process: don't look them up.
        internal = is_memfd(vma) or (vma.deleted and vma.path in (SHARED_ANON_NAME, ANON_HUGETLB_NAME))
        fstype = fstype_for_path(vma.path) if vma.path.startswith("/") and not internal else None
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


@dataclass(frozen=True)
class HostHuge:
    """Host-side huge capacity of one VM's guest RAM, split by kind (2 MiB units)."""

    anon_thp_2m: int
    shmem_thp_2m: int
    file_thp_2m: int
    hugetlb_2m: int
    hugetlb_1g_bytes: int
    resident_bytes: int

    @property
    def total_2m(self) -> int:
        return self.anon_thp_2m + self.shmem_thp_2m + self.file_thp_2m + self.hugetlb_2m

    @property
    def page_cache_thp_2m(self) -> int:
        return self.shmem_thp_2m + self.file_thp_2m

    @classmethod
    def from_mappings(cls, mappings: Sequence[GuestRamMapping]) -> HostHuge:
        return cls(
            anon_thp_2m=sum(m.anon_huge_bytes for m in mappings) // PMD_BYTES,
            shmem_thp_2m=sum(m.shmem_pmd_mapped_bytes for m in mappings) // PMD_BYTES,
            file_thp_2m=sum(m.file_pmd_mapped_bytes for m in mappings) // PMD_BYTES,
            hugetlb_2m=sum(m.hugetlb_bytes for m in mappings) // PMD_BYTES,
            hugetlb_1g_bytes=sum(m.hugetlb_bytes for m in mappings if m.hugetlb_page_bytes >= GIB),
            # hugetlb pages are not in Rss; they are resident by construction.
            resident_bytes=sum(m.rss_bytes + m.hugetlb_bytes for m in mappings),
        )

    def __add__(self, other: HostHuge) -> HostHuge:
        return HostHuge(*(a + b for a, b in zip(self._tuple(), other._tuple())))

    def _tuple(self) -> tuple[int, ...]:
        return (self.anon_thp_2m, self.shmem_thp_2m, self.file_thp_2m, self.hugetlb_2m, self.hugetlb_1g_bytes, self.resident_bytes)
