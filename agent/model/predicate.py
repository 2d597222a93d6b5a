"""The predicate model: which kernel logic decides whether KVM may map guest RAM huge, and how many
2 MiB EPT/NPT mappings a VM has lost and why. Pure: no I/O, no clock.

Inputs are what the collectors measured (guest-RAM mappings from smaps, KVM's own counters, the
kernel release, THP policy); the output is an `Estimate` per VM. See docs/predicate-model.md.
"""

from __future__ import annotations

import enum
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import yaml

from eptwatch.agent.sources.bounds import MAX_PLAUSIBLE_COUNT
from eptwatch.agent.sources.guest_ram import GIB, PMD_BYTES, Backing, GuestRamMapping, HostHuge, on_internal_shm_mount
from eptwatch.agent.sources.kernel import parse_release
from eptwatch.agent.sources.kvm_debugfs import CounterScope, KvmCounterValues
from eptwatch.agent.sources.status import ParseError
from eptwatch.agent.sources.thp import ThpSettings

PMDS_PER_1G = GIB // PMD_BYTES  # 512


class Era(enum.Enum):
    UNKNOWN = "unknown"
    MAPCOUNT_HEURISTIC = "mapcount_heuristic"  # < 4.8
    COMPOUND_MAP_UNFIXED = "compound_map_unfixed"  # 4.8 .. 5.3 without 169226f7e0
    COMPOUND_MAP_FIXED = "compound_map_fixed"  # 5.4, 5.5, stable backports (arm64: to 5.14)
    HOST_PAGE_WALK = "host_page_walk"  # >= 5.6 (arm64 >= 5.15)


class Cause(enum.Enum):
    HEALTHY = "healthy"
    KNOWN_PAGE_CACHE_THP_BUG = "known_page_cache_thp_bug"
    EXPECTED_FALSE_NEGATIVE = "expected_false_negative"
    NX_SPLIT = "nx_split"
    THP_DISABLED = "thp_disabled"
    HOST_MAPPING_NOT_HUGE = "host_mapping_not_huge"
    UNEXPLAINED = "unexplained"
    UNKNOWN = "unknown"
    # Readings that contradict each other or the host: no verdict, never healthy (wire CAUSE_IMPLAUSIBLE).
    IMPLAUSIBLE = "implausible"


# First stable release of each branch that carries 169226f7e0 (domain.md). Other 4.8..5.3 branches
# (4.10-4.13, 4.15-4.18, 4.20-5.2) never received it.
STABLE_BACKPORTS: dict[tuple[int, int], int] = {(4, 9): 201, (4, 14): 154, (4, 19): 84, (5, 3): 11}
_ARM64 = frozenset({"aarch64", "arm64"})
# Release suffixes that mark a distribution build, whose version number does not say what it carries.
_VENDOR_SUFFIX = re.compile(r"\.el\d|\.fc\d|-\d+-(generic|aws|azure|gcp|amd64|arm64|cloud)|\.amzn|uek|-\d{2,}\.")


@dataclass(frozen=True)
class EraOverride:
    pattern: re.Pattern[str]
    era: Era
    note: str = ""


@dataclass(frozen=True)
class EraDecision:
    era: Era
    basis: str


def load_era_overrides(text: str, name: str) -> tuple[EraOverride, ...]:
    """Parse the override table (YAML): vendor kernels whose version number does not tell the era.

    overrides:
      - release: '4\\.18\\.0-.*\\.el8.*'   # Python regex, matched against the whole release
        era: compound_map_fixed
        note: RHEL 8 carries 169226f7e0
    """
    try:
        doc = yaml.safe_load(text)
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: an integer past Python's 4,300-digit limit
        raise ParseError(name, f"not valid YAML: {exc}") from None
    except RecursionError:
        raise ParseError(name, "not valid YAML: nested too deeply") from None
    if doc is None:
        return ()
    if not isinstance(doc, dict) or set(doc) - {"overrides"}:
        raise ParseError(name, "expected a mapping with the single key 'overrides'")
    entries = doc.get("overrides") or []
    if not isinstance(entries, list):
        raise ParseError(name, "'overrides' must be a list")
    valid_eras = {e.value: e for e in Era if e is not Era.UNKNOWN}
    out: list[EraOverride] = []
    for i, entry in enumerate(entries):
        where = f"overrides[{i}]"
        if not isinstance(entry, dict):
            raise ParseError(name, f"{where}: expected a mapping with keys release, era[, note]")
        unknown = set(entry) - {"release", "era", "note"}
        if unknown:
            raise ParseError(name, f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))}")
        pattern, era = entry.get("release"), entry.get("era")
        if not isinstance(pattern, str) or not pattern:
            raise ParseError(name, f"{where}.release: expected a non-empty regular expression")
        try:
            with warnings.catch_warnings(record=True) as caught:
                # Python warns (FutureWarning) where a pattern's meaning will change in a later version,
                # such as "[[a]" (a possible nested set). An override that may one day match other
                # releases is refused now, with the reason, rather than printed as a bare warning.
                warnings.simplefilter("always")
                compiled = re.compile(pattern)
        except re.error as exc:
            raise ParseError(name, f"{where}.release: invalid regular expression: {exc}") from None
        if caught:
            raise ParseError(name, f"{where}.release: ambiguous regular expression ({caught[0].message}); escape the character it names")
        if era not in valid_eras:
            raise ParseError(name, f"{where}.era: expected one of {', '.join(sorted(valid_eras))}, got {era!r}")
        note = entry.get("note", "")
        if not isinstance(note, str):
            raise ParseError(name, f"{where}.note: expected a string")
        out.append(EraOverride(compiled, valid_eras[era], note))
    return tuple(out)


def era_for(release: str, machine: str, overrides: Sequence[EraOverride] = ()) -> EraDecision:
    for o in overrides:
        if o.pattern.fullmatch(release):
            return EraDecision(o.era, f"override {o.pattern.pattern!r}" + (f": {o.note}" if o.note else ""))
    v = parse_release(release)
    if v is None:
        return EraDecision(Era.UNKNOWN, f"release {release!r} is not a kernel version")
    mm = (v.major, v.minor)
    vendor = " (distribution kernel: it may carry backports; add an override)" if _VENDOR_SUFFIX.search(v.extra) else ""
    walk_from = (5, 15) if machine in _ARM64 else (5, 6)
    if not machine:
        vendor += " (architecture unknown: x86 table applied)"
    if mm < (4, 8):
        return EraDecision(Era.MAPCOUNT_HEURISTIC, f"{mm[0]}.{mm[1]} < 4.8: no shmem THP, _mapcount heuristic{vendor}")
    if mm <= (5, 3):
        first_fixed = STABLE_BACKPORTS.get(mm)
        if first_fixed is not None and v.patch >= first_fixed:
            return EraDecision(Era.COMPOUND_MAP_FIXED, f"stable backport of 169226f7e0 in {mm[0]}.{mm[1]}.{first_fixed}+")
        why = (
            f"{mm[0]}.{mm[1]}.{v.patch} predates the backport in {mm[0]}.{mm[1]}.{first_fixed}"
            if first_fixed
            else f"{mm[0]}.{mm[1]} never received 169226f7e0"
        )
        return EraDecision(Era.COMPOUND_MAP_UNFIXED, why + vendor)
    if mm < walk_from:
        return EraDecision(Era.COMPOUND_MAP_FIXED, f"{mm[0]}.{mm[1]}: PageTransCompoundMap with 169226f7e0{vendor}")
    return EraDecision(Era.HOST_PAGE_WALK, f"{mm[0]}.{mm[1]} >= {walk_from[0]}.{walk_from[1]}: KVM walks the host page tables")


@dataclass(frozen=True)
class ModelConfig:
    # Loss within this slack is measurement noise: EPT entries exist only where the guest touched
    # memory, memslot heads/tails are never huge, and smaps and counters are read at different instants.
    healthy_lost_ratio: float = 0.02
    healthy_lost_2m: int = 2
    # Host huge coverage of resident guest RAM below this ratio earns a host-side cause.
    low_host_coverage_ratio: float = 0.5


@dataclass(frozen=True)
class VmInputs:
    vm_id: str
    host_huge: HostHuge | None  # None: smaps unavailable
    mappings: tuple[GuestRamMapping, ...] = ()  # empty in rollup mode (no per-VMA attribution)
    whole_process: bool = False  # host_huge is smaps_rollup of the whole process
    counters: KvmCounterValues | None = None
    counter_scope: CounterScope | None = None
    counter_shared_by_vms: int = 1  # how many VMs the counter sums over
    thp_enabled_for_process: bool | None = None
    extra_uncertainty: tuple[str, ...] = ()


@dataclass(frozen=True)
class Estimate:
    vm_id: str
    era: Era
    host_huge_capacity_2m: int | None
    observed_huge_2m: int | None
    allowed_huge_2m: int | None
    lost_huge_2m: int | None
    lost_ratio: float | None
    cause: Cause
    breakdown: tuple[tuple[Cause, int], ...] = ()
    uncertainty: tuple[str, ...] = ()
    explanation: str = ""


def observed_huge_2m(c: KvmCounterValues, host: HostHuge | None, notes: list[str]) -> int | None:
    if c.pages_2m is not None:
        if c.pages_1g is None and host is not None and host.hugetlb_1g_bytes:
            notes.append("pages_1g unreadable: 1 GiB mappings not counted")
        return c.pages_2m + PMDS_PER_1G * (c.pages_1g or 0)
    if c.large_pages is not None:
        # largepages/lpages count every huge mapping once, 2 MiB or 1 GiB alike.
        if host is not None and host.hugetlb_1g_bytes and host.total_2m * PMD_BYTES == host.hugetlb_1g_bytes:
            notes.append(f"legacy {c.naming} counter: all huge memory is 1 GiB hugetlbfs, each counted as 512")
            return c.large_pages * PMDS_PER_1G
        if host is not None and host.hugetlb_1g_bytes:
            notes.append(f"legacy {c.naming} counter mixes 2 MiB and 1 GiB mappings: observed is a lower bound")
        return c.large_pages
    return None


def allowed_huge_2m(era: Era, host: HostHuge) -> int | None:
    if era in (Era.HOST_PAGE_WALK, Era.COMPOUND_MAP_FIXED):
        return host.total_2m
    if era in (Era.COMPOUND_MAP_UNFIXED, Era.MAPCOUNT_HEURISTIC):
        return host.anon_thp_2m + host.hugetlb_2m  # page-cache THP never passes the old predicate
    return None


def _not_aligned(m: GuestRamMapping, where: str) -> tuple[Cause, str]:
    # QEMU 7.2 (checked on real VMs): memory-backend-file without align=2M, -mem-path and
    # memory-backend-memfd (which has no align= option) map their file only 4 KiB aligned.
    fix = (
        "QEMU's memory-backend-memfd has no align= option; memory-backend-file on a huge= tmpfs with align=2M has"
        if m.backing is Backing.MEMFD
        else "QEMU memory-backend-file needs align=2M; -mem-path cannot ask for it"
    )
    return (
        Cause.HOST_MAPPING_NOT_HUGE,
        f"{where}: address and file offset are not 2 MiB aligned, so no THP can be PMD-mapped ({fix})",
    )


def _host_side_reason(m: GuestRamMapping, era: Era, thp: ThpSettings, thp_enabled_for_process: bool | None) -> tuple[Cause, str]:
    """Why this mapping is (mostly) not huge on the host."""
    where = f"{m.backing.value} guest RAM {m.path or '[anonymous]'} at {m.start:#x}"
    if m.backing is Backing.HUGETLBFS:
        return Cause.HOST_MAPPING_NOT_HUGE, f"{where}: hugetlbfs pages not yet faulted in"
    if m.backing is Backing.FILE:
        if not m.pmd_aligned:
            return _not_aligned(m, where)
        # Not "THP never applies to writable files": on 6.18 a shared writable file on ext4 was
        # PMD-mapped (FilePmdMapped) in a real VM. Older kernels only had read-only file THP.
        return Cause.THP_DISABLED, (
            f"{where}: a regular file, and this kernel/filesystem does not give it PMD-size page-cache folios "
            "(writable file THP needs filesystem large folios, e.g. ext4 on 6.18; older kernels have only read-only file THP)"
        )
    if thp_enabled_for_process is False:
        return Cause.THP_DISABLED, f"{where}: THP disabled for the QEMU process (prctl PR_SET_THP_DISABLE)"
    internal = on_internal_shm_mount(m)
    if m.backing is Backing.ANONYMOUS:
        if thp.enabled == "never":
            return Cause.THP_DISABLED, f"{where}: transparent_hugepage/enabled is never"
    else:
        if era is Era.MAPCOUNT_HEURISTIC:
            return Cause.THP_DISABLED, f"{where}: this kernel has no shmem THP (before 4.8)"
        if thp.shmem_enabled == "deny":
            return Cause.THP_DISABLED, f"{where}: transparent_hugepage/shmem_enabled is deny"
        if internal is not None and thp.shmem_enabled == "never":
            return Cause.THP_DISABLED, f"{where}: transparent_hugepage/shmem_enabled is never ({internal} uses the internal shm mount)"
        if internal is None and m.backing is Backing.SHMEM and thp.shmem_enabled != "force" and m.tmpfs_huge in (None, "never"):
            mount = "without huge=" if m.tmpfs_huge is None else "huge=never"
            return Cause.HOST_MAPPING_NOT_HUGE, f"{where}: its tmpfs is mounted {mount}, so its pages are never huge"
    if not m.pmd_aligned:
        return _not_aligned(m, where)
    return Cause.HOST_MAPPING_NOT_HUGE, f"{where}: THP-eligible but not PMD-mapped (not collapsed yet, or fragmented; defrag={thp.defrag or '?'})"


def noise_allowance_2m(capacity: int, config: ModelConfig) -> float:
    """Loss (or excess) in 2 MiB units that is measurement noise for this capacity."""
    return max(config.healthy_lost_2m, config.healthy_lost_ratio * capacity)


def implausible_reading(inputs: VmInputs, capacity: int | None, observed: int | None, config: ModelConfig) -> str:
    """Why these readings cannot all be true (a counter no machine can reach, more huge pages than
    guest RAM, KVM mapping more huge than the host has beyond the noise allowance); "" if none."""
    c = inputs.counters
    if c is not None:
        for attr in ("pages_4k", "pages_2m", "pages_1g", "large_pages", "nx_lpage_splits"):
            value = getattr(c, attr)
            if value is not None and value > MAX_PLAUSIBLE_COUNT:
                return f"KVM counter {attr} = {value} at {c.path or c.scope.value}: above {MAX_PLAUSIBLE_COUNT}, no machine has that many mappings"
    host = inputs.host_huge
    if host is not None and capacity is not None:
        guest_ram_bytes = sum(m.size_bytes for m in inputs.mappings)
        # Full smaps: huge pages lie within guest RAM; smaps_rollup: within what is resident.
        bound_bytes, what = (guest_ram_bytes, "guest RAM") if inputs.mappings else (host.resident_bytes, "resident memory")
        if (inputs.mappings or inputs.whole_process) and capacity * PMD_BYTES > bound_bytes:
            return f"host huge capacity of {capacity} x 2 MiB exceeds the VM's {what} of {bound_bytes} bytes"
    if capacity is not None and observed is not None and observed > capacity + noise_allowance_2m(capacity, config):
        return (f"KVM maps {observed} huge pages but the host has only {capacity} huge pages of guest RAM "
                f"(beyond the {noise_allowance_2m(capacity, config):.0f}-page noise allowance)")
    return ""


def estimate_vm(inputs: VmInputs, era: Era, thp: ThpSettings, config: ModelConfig = ModelConfig()) -> Estimate:
    notes: list[str] = list(inputs.extra_uncertainty)
    host = inputs.host_huge
    if inputs.whole_process:
        notes.append("smaps_rollup: whole-process totals, not only guest RAM")
    capacity = host.total_2m if host is not None else None
    observed: int | None = None
    if inputs.counters is not None:
        if inputs.counter_shared_by_vms > 1:
            notes.append(f"only a host-wide counter, shared by {inputs.counter_shared_by_vms} VMs: no per-VM observation")
        else:
            observed = observed_huge_2m(inputs.counters, host, notes)
            if inputs.counter_scope is CounterScope.GLOBAL_DEBUGFS:
                notes.append("host-wide counter attributed to the only VM on the host")
    allowed = allowed_huge_2m(era, host) if host is not None else None

    def unknown(why: str) -> Estimate:
        return Estimate(inputs.vm_id, era, capacity, observed, allowed, None, None, Cause.UNKNOWN, (), tuple(notes), why)

    def implausible(why: str) -> Estimate:
        # The numbers are left out (they may be absurd, and the wire and the fleet would carry them as
        # if measured); the explanation names the readings.
        return Estimate(inputs.vm_id, era, None, None, None, None, None, Cause.IMPLAUSIBLE, (), tuple(notes), why)

    why_implausible = implausible_reading(inputs, capacity, observed, config)
    if why_implausible:
        return implausible(why_implausible)
    if host is None:
        return unknown("guest RAM mappings could not be read: no host capacity")
    if observed is None:
        return unknown("KVM's huge-mapping counters are unavailable for this VM: no observation")

    assert capacity is not None
    if observed > capacity:
        notes.append("observed exceeds host capacity: smaps and counters were read at different instants")
    lost = max(0, capacity - observed)
    ratio = lost / capacity if capacity else 0.0

    remaining = lost
    shares: list[tuple[Cause, int]] = []

    def take(cause: Cause, limit: int) -> None:
        nonlocal remaining
        n = min(remaining, max(0, limit))
        if n:
            shares.append((cause, n))
            remaining -= n

    if era in (Era.COMPOUND_MAP_UNFIXED, Era.MAPCOUNT_HEURISTIC):
        take(Cause.KNOWN_PAGE_CACHE_THP_BUG, host.page_cache_thp_2m)
    nx = inputs.counters.nx_lpage_splits if inputs.counters is not None else None
    if nx and thp.nx_huge_pages not in ("off", "N"):
        take(Cause.NX_SPLIT, nx)
    if era is Era.COMPOUND_MAP_FIXED and host.page_cache_thp_2m:
        sharers = [m for m in inputs.mappings if m.other_mapper_pids]
        if sharers:
            pids = sorted({p for m in sharers for p in m.other_mapper_pids or ()})
            notes.append(f"guest RAM file also mapped by pid(s) {', '.join(map(str, pids[:8]))}")
            take(Cause.EXPECTED_FALSE_NEGATIVE, host.page_cache_thp_2m)
    if remaining:
        shares.append((Cause.UNEXPLAINED, remaining))

    tolerance = noise_allowance_2m(capacity, config)
    if lost > tolerance:
        cause = max(shares, key=lambda s: s[1])[0]
        if cause is Cause.UNEXPLAINED:
            notes.append("EPT entries exist only for memory the guest touched: an idle guest looks like loss")
        what = {
            Cause.KNOWN_PAGE_CACHE_THP_BUG: "this kernel lacks 169226f7e0: shmem/file THP is never mapped huge in EPT",
            Cause.NX_SPLIT: "the iTLB-multihit mitigation (nx_huge_pages) split executable huge pages",
            Cause.EXPECTED_FALSE_NEGATIVE: "file THP PTE-mapped by another process is mapped small (169226f7e0's known false negative)",
            Cause.UNEXPLAINED: "the predicate model does not explain this loss: regression candidate",
        }[cause]
        explanation = f"{lost} of {capacity} host huge pages not mapped huge by KVM ({ratio:.1%}): {what}"
    else:
        cause, explanation = Cause.HEALTHY, f"{observed} huge EPT mappings for {capacity} host huge pages"
        if lost:
            explanation += f" ({lost} within the {tolerance:.0f}-page noise allowance)"
        coverage_bytes = capacity * PMD_BYTES
        resident = host.resident_bytes
        if resident == 0:
            notes.append("guest RAM not resident: the guest has not touched it")
        elif coverage_bytes < config.low_host_coverage_ratio * resident and inputs.mappings:
            worst = max(inputs.mappings, key=lambda m: m.rss_bytes + m.hugetlb_bytes - (m.shmem_pmd_mapped_bytes + m.anon_huge_bytes + m.file_pmd_mapped_bytes + m.hugetlb_bytes))
            cause, why = _host_side_reason(worst, era, thp, inputs.thp_enabled_for_process)
            explanation = (
                f"host maps {coverage_bytes // (1024 * 1024)} MiB of {resident // (1024 * 1024)} MiB resident guest RAM huge; {why}"
            )
    return Estimate(inputs.vm_id, era, capacity, observed, allowed, lost, ratio, cause, tuple(shares), tuple(notes), explanation)
