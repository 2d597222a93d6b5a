from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eptwatch.agent.model.predicate import (
    Cause,
    Era,
    HostHuge,
    ModelConfig,
    VmInputs,
    era_for,
    estimate_vm,
    load_era_overrides,
)
from eptwatch.agent.sources.guest_ram import Backing, GuestRamMapping
from eptwatch.agent.sources.kvm_debugfs import CounterScope, KvmCounterValues
from eptwatch.agent.sources.status import ParseError
from eptwatch.agent.sources.thp import ThpSettings

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
THP = ThpSettings(enabled="madvise", shmem_enabled="never", defrag="madvise", nx_huge_pages="N")


def shm(shmem_pmd_kb: int, *, size: int = 4 * GIB, rss: int | None = None, tmpfs_huge: str | None = "always",
        aligned: bool = True, mappers: tuple[int, ...] | None = None, backing: Backing = Backing.SHMEM) -> GuestRamMapping:
    return GuestRamMapping(
        start=0x7F2778200000, end=0x7F2778200000 + size, path="/dev/shm/qemu_back_mem.mem.Hz2hSf", backing=backing,
        size_bytes=size, rss_bytes=rss if rss is not None else shmem_pmd_kb * KIB + 4 * MIB, anon_huge_bytes=0,
        shmem_pmd_mapped_bytes=shmem_pmd_kb * KIB, file_pmd_mapped_bytes=0, hugetlb_bytes=0, hugetlb_page_bytes=0,
        pmd_aligned=aligned, dev="00:14", inode=262232, tmpfs_huge=tmpfs_huge, other_mapper_pids=mappers,
    )


def anon(anon_huge_bytes: int, rss: int) -> GuestRamMapping:
    return GuestRamMapping(0x7F4000000000, 0x7F4000000000 + 4 * GIB, "", Backing.ANONYMOUS, 4 * GIB, rss, anon_huge_bytes,
                           0, 0, 0, 0, True, "00:00", 0)


def legacy(n: int, nx: int = 0, scope: CounterScope = CounterScope.PER_VM_DEBUGFS) -> KvmCounterValues:
    return KvmCounterValues(naming="largepages", scope=scope, large_pages=n, nx_lpage_splits=nx)


def inputs(*mappings: GuestRamMapping, counters: KvmCounterValues | None, **kw: object) -> VmInputs:
    return VmInputs(vm_id="vm", host_huge=HostHuge.from_mappings(mappings), mappings=mappings, counters=counters,
                    counter_scope=counters.scope if counters else None, **kw)  # type: ignore[arg-type]


# --- the seed, through the pure model ---

def test_seed_before_fix_is_the_known_bug() -> None:
    era = era_for("5.3.0", "x86_64").era
    assert era is Era.COMPOUND_MAP_UNFIXED
    e = estimate_vm(inputs(shm(579584), counters=legacy(12)), era, THP)
    assert (e.host_huge_capacity_2m, e.observed_huge_2m, e.allowed_huge_2m) == (283, 12, 0)
    assert e.lost_huge_2m == 271
    assert e.cause is Cause.KNOWN_PAGE_CACHE_THP_BUG
    assert dict(e.breakdown) == {Cause.KNOWN_PAGE_CACHE_THP_BUG: 271}


def test_seed_after_fix_is_healthy() -> None:
    era = era_for("5.4.0", "x86_64").era
    assert era is Era.COMPOUND_MAP_FIXED
    e = estimate_vm(inputs(shm(557056), counters=legacy(271)), era, THP)
    assert (e.host_huge_capacity_2m, e.observed_huge_2m, e.lost_huge_2m) == (272, 271, 1)
    assert e.lost_ratio is not None and e.lost_ratio < 0.01
    assert e.cause is Cause.HEALTHY


def test_same_loss_on_a_fixed_kernel_is_unexplained() -> None:
    e = estimate_vm(inputs(shm(579584), counters=legacy(12)), Era.HOST_PAGE_WALK, THP)
    assert e.cause is Cause.UNEXPLAINED and e.lost_huge_2m == 271


# --- eras ---

@pytest.mark.parametrize(
    "release, machine, era",
    [
        ("4.4.0-210-generic", "x86_64", Era.MAPCOUNT_HEURISTIC),
        ("4.7.10", "x86_64", Era.MAPCOUNT_HEURISTIC),
        ("4.8.0", "x86_64", Era.COMPOUND_MAP_UNFIXED),
        ("4.9.200", "x86_64", Era.COMPOUND_MAP_UNFIXED),
        ("4.9.201", "x86_64", Era.COMPOUND_MAP_FIXED),
        ("4.13.16", "x86_64", Era.COMPOUND_MAP_UNFIXED),
        ("4.14.153", "x86_64", Era.COMPOUND_MAP_UNFIXED),
        ("4.14.154", "x86_64", Era.COMPOUND_MAP_FIXED),
        ("4.18.20", "x86_64", Era.COMPOUND_MAP_UNFIXED),
        ("4.19.83", "x86_64", Era.COMPOUND_MAP_UNFIXED),
        ("4.19.84", "x86_64", Era.COMPOUND_MAP_FIXED),
        ("4.19.300-1.el7", "x86_64", Era.COMPOUND_MAP_FIXED),
        ("5.2.21", "x86_64", Era.COMPOUND_MAP_UNFIXED),
        ("5.3.10", "x86_64", Era.COMPOUND_MAP_UNFIXED),
        ("5.3.11", "x86_64", Era.COMPOUND_MAP_FIXED),
        ("5.4.0", "x86_64", Era.COMPOUND_MAP_FIXED),
        ("5.5.19", "x86_64", Era.COMPOUND_MAP_FIXED),
        ("5.6.0", "x86_64", Era.HOST_PAGE_WALK),
        ("6.18.44-fc-v782", "x86_64", Era.HOST_PAGE_WALK),
        ("5.10.0", "aarch64", Era.COMPOUND_MAP_FIXED),
        ("5.14.21", "aarch64", Era.COMPOUND_MAP_FIXED),
        ("5.15.0", "aarch64", Era.HOST_PAGE_WALK),
        ("5.3.0", "aarch64", Era.COMPOUND_MAP_UNFIXED),
        ("not-a-kernel", "x86_64", Era.UNKNOWN),
    ],
)
def test_era_table(release: str, machine: str, era: Era) -> None:
    assert era_for(release, machine).era is era


def test_era_basis_says_why() -> None:
    assert "4.19.84" in era_for("4.19.84", "x86_64").basis
    assert "never received" in era_for("4.15.0", "x86_64").basis
    assert "override" in era_for("4.18.0-305.el8.x86_64", "x86_64").basis  # vendor kernels: the table alone cannot decide


def test_override_table_wins() -> None:
    table = load_era_overrides(
        "overrides:\n  - release: '4\\.18\\.0-.*\\.el8.*'\n    era: compound_map_fixed\n    note: vendor backport\n", "o.yaml"
    )
    d = era_for("4.18.0-305.el8.x86_64", "x86_64", table)
    assert d.era is Era.COMPOUND_MAP_FIXED and "vendor backport" in d.basis
    assert era_for("4.18.0", "x86_64", table).era is Era.COMPOUND_MAP_UNFIXED  # fullmatch, not search


@pytest.mark.parametrize(
    "text, needle",
    [
        ("overrides: 3", "must be a list"),
        ("nope: []", "single key 'overrides'"),
        ("overrides:\n  - release: '('\n    era: host_page_walk\n", "invalid regular expression"),
        ("overrides:\n  - release: '[[a]'\n    era: host_page_walk\n", "overrides[0].release: ambiguous regular expression (Possible nested set"),
        ("overrides:\n  - release: 'x'\n    era: sideways\n", "expected one of"),
        ("overrides:\n  - release: 'x'\n    era: host_page_walk\n    colour: red\n", "unknown key"),
        ("overrides:\n  - 'x'\n", "expected a mapping"),
        ("overrides: [\n", "not valid YAML"),
    ],
)
def test_override_table_errors_name_file_and_key(text: str, needle: str) -> None:
    with pytest.raises(ParseError) as info:
        load_era_overrides(text, "/etc/eptwatch/eras.yaml")
    assert needle in str(info.value) and "/etc/eptwatch/eras.yaml" in str(info.value)


def test_empty_override_file_is_no_overrides() -> None:
    assert load_era_overrides("", "o.yaml") == ()


# --- causes ---

def test_nx_split_explains_loss() -> None:
    e = estimate_vm(inputs(anon(4 * GIB, 4 * GIB), counters=legacy(1748, nx=300)), Era.COMPOUND_MAP_FIXED,
                    ThpSettings(enabled="always", nx_huge_pages="Y"))
    assert e.cause is Cause.NX_SPLIT and dict(e.breakdown) == {Cause.NX_SPLIT: 300}


def test_nx_splits_partly_explain_leaving_unexplained_rest() -> None:
    e = estimate_vm(inputs(anon(4 * GIB, 4 * GIB), counters=legacy(1000, nx=100)), Era.HOST_PAGE_WALK,
                    ThpSettings(enabled="always", nx_huge_pages="Y"))
    assert dict(e.breakdown) == {Cause.NX_SPLIT: 100, Cause.UNEXPLAINED: 948}
    assert e.cause is Cause.UNEXPLAINED


def test_false_negative_needs_evidence_of_another_mapper() -> None:
    with_mapper = estimate_vm(inputs(shm(2 * 1024 * 1024, mappers=(5200,)), counters=legacy(610)), Era.COMPOUND_MAP_FIXED, THP)
    assert with_mapper.cause is Cause.EXPECTED_FALSE_NEGATIVE
    alone = estimate_vm(inputs(shm(2 * 1024 * 1024, mappers=()), counters=legacy(610)), Era.COMPOUND_MAP_FIXED, THP)
    assert alone.cause is Cause.UNEXPLAINED


def test_tmpfs_huge_never_is_host_mapping_not_huge_without_invented_loss() -> None:
    e = estimate_vm(inputs(shm(0, rss=1 * GIB, tmpfs_huge="never"), counters=legacy(0)), Era.HOST_PAGE_WALK, THP)
    assert e.lost_huge_2m == 0 and e.host_huge_capacity_2m == 0
    assert e.cause is Cause.HOST_MAPPING_NOT_HUGE and "huge=never" in e.explanation


def test_unaligned_file_backend_says_alignment() -> None:
    e = estimate_vm(inputs(shm(0, rss=1 * GIB, aligned=False), counters=legacy(0)), Era.HOST_PAGE_WALK, THP)
    assert e.cause is Cause.HOST_MAPPING_NOT_HUGE and "align" in e.explanation


def test_thp_disabled_for_process() -> None:
    e = estimate_vm(inputs(anon(0, 1 * GIB), counters=legacy(0), thp_enabled_for_process=False), Era.HOST_PAGE_WALK, THP)
    assert e.cause is Cause.THP_DISABLED and "PR_SET_THP_DISABLE" in e.explanation


def test_thp_never_host_wide() -> None:
    e = estimate_vm(inputs(anon(0, 1 * GIB), counters=legacy(0)), Era.HOST_PAGE_WALK, ThpSettings(enabled="never"))
    assert e.cause is Cause.THP_DISABLED


def test_missing_counters_is_unknown_not_zero() -> None:
    e = estimate_vm(inputs(shm(579584), counters=None), Era.COMPOUND_MAP_UNFIXED, THP)
    assert e.cause is Cause.UNKNOWN and e.observed_huge_2m is None and e.lost_huge_2m is None
    assert e.host_huge_capacity_2m == 283


def test_missing_smaps_is_unknown() -> None:
    e = estimate_vm(VmInputs("vm", None, counters=legacy(12)), Era.COMPOUND_MAP_UNFIXED, THP)
    assert e.cause is Cause.UNKNOWN and e.host_huge_capacity_2m is None


def test_shared_global_counter_gives_no_per_vm_observation() -> None:
    e = estimate_vm(inputs(shm(579584), counters=legacy(12, scope=CounterScope.GLOBAL_DEBUGFS), counter_shared_by_vms=3),
                    Era.COMPOUND_MAP_UNFIXED, THP)
    assert e.observed_huge_2m is None and e.cause is Cause.UNKNOWN
    assert any("shared by 3 VMs" in u for u in e.uncertainty)


def test_one_gib_pages_count_512() -> None:
    m = GuestRamMapping(0, 8 * GIB, "/dev/hugepages1G/x", Backing.HUGETLBFS, 8 * GIB, 0, 0, 0, 0, 8 * GIB, GIB, True, "00:2d", 4)
    c = KvmCounterValues("pages_Nx", CounterScope.PER_VM_DEBUGFS, pages_4k=1, pages_2m=0, pages_1g=8)
    e = estimate_vm(inputs(m, counters=c), Era.HOST_PAGE_WALK, THP)
    assert (e.host_huge_capacity_2m, e.observed_huge_2m, e.cause) == (4096, 4096, Cause.HEALTHY)
    # legacy counters count a 1 GiB mapping once
    e2 = estimate_vm(inputs(m, counters=legacy(8)), Era.COMPOUND_MAP_FIXED, THP)
    assert e2.observed_huge_2m == 4096 and e2.cause is Cause.HEALTHY


def test_noise_allowance_is_configurable() -> None:
    strict = ModelConfig(healthy_lost_ratio=0.0, healthy_lost_2m=0)
    e = estimate_vm(inputs(shm(557056), counters=legacy(271)), Era.COMPOUND_MAP_FIXED, THP, strict)
    assert e.cause is Cause.UNEXPLAINED


@settings(max_examples=300, deadline=None)
@given(
    pmd_kb=st.integers(0, 2**30).map(lambda n: n * 2048),
    observed=st.integers(0, 2**31),
    nx=st.integers(0, 2**20),
    era=st.sampled_from(list(Era)),
)
def test_breakdown_always_adds_up(pmd_kb: int, observed: int, nx: int, era: Era) -> None:
    e = estimate_vm(inputs(shm(pmd_kb), counters=legacy(observed, nx=nx)), era, ThpSettings(nx_huge_pages="Y"))
    if e.lost_huge_2m is None:
        return
    assert sum(n for _, n in e.breakdown) == e.lost_huge_2m
    assert e.lost_huge_2m == max(0, (e.host_huge_capacity_2m or 0) - observed)
    assert 0.0 <= (e.lost_ratio or 0.0) <= 1.0
