"""Fleet rollups, staleness, replica hand-over and kernel verdicts (pure domain code)."""

from __future__ import annotations

import pytest

from eptwatch.server.fleet.state import (
    VERDICT_INSUFFICIENT,
    VERDICT_KNOWN_BAD,
    VERDICT_OK,
    VERDICT_REGRESSED,
    FleetConfig,
    FleetState,
    build_view,
    summarise,
)
from eptwatch.server.simulate import SimHost, SimulatedFleet, load_templates
from eptwatch.v1 import report_pb2 as pb

from .conftest import FIXTURES

NAMES = ["linux-5.3-unfixed", "linux-5.4-fixed", "linux-6.6-pages2m", "anon-thp", "linux-5.10-hostwalk", "global-only-two-vms"]


@pytest.fixture(scope="module")
def templates() -> dict[str, pb.HostReport]:
    return load_templates(FIXTURES, NAMES)


def summaries(templates: dict[str, pb.HostReport], counts: dict[str, int], now: float = 1000.0):  # type: ignore[no-untyped-def]
    fleet = SimulatedFleet(templates, 0)
    i = 0  # deterministic allocation: exactly `counts` hosts per template
    for name, n in counts.items():
        for _ in range(n):
            fleet.hosts.append(SimHost(f"h{i:03d}", name, (("zone", "z1" if i % 2 else "z2"),), f"i{i}"))
            i += 1
    return [summarise(fleet.report(h, now), received=now) for h in fleet.hosts]


def test_summary_of_the_seed(templates: dict[str, pb.HostReport]) -> None:
    (s,) = summaries(templates, {"linux-5.3-unfixed": 1})
    assert (s.capacity_2m, s.observed_2m, s.lost_2m, s.lost_explained_2m, s.lost_unexplained_2m) == (283, 12, 271, 271, 0)
    assert s.known_bug_vms == 1 and s.era == pb.PREDICATE_ERA_COMPOUND_MAP_UNFIXED


def test_host_estimate_is_used_when_only_a_global_counter_exists(templates: dict[str, pb.HostReport]) -> None:
    (s,) = summaries(templates, {"global-only-two-vms": 1})
    assert s.vms == 2 and (s.capacity_2m, s.observed_2m, s.lost_2m) == (1536, 1530, 6)


def test_rollups_and_verdicts(templates: dict[str, pb.HostReport]) -> None:
    hosts = summaries(templates, {"linux-5.3-unfixed": 4, "linux-5.4-fixed": 4, "linux-6.6-pages2m": 4, "anon-thp": 2, "linux-5.10-hostwalk": 5})
    v = build_view(hosts, set(), 1000.0, FleetConfig(rollup_labels=("zone",), top_n=3))
    assert v.total.hosts == 19
    k = {x.kernel_release: x for x in v.kernels}
    assert k["5.3.0"].verdict == VERDICT_KNOWN_BAD and k["5.3.0"].known_bad and not k["5.3.0"].regressed
    assert "4 host(s) still run it" in k["5.3.0"].evidence
    assert k["6.6.15"].verdict == VERDICT_REGRESSED and "unexplained loss" in k["6.6.15"].evidence
    # 6.6.15 vs 5.10 (same era, healthy): the margin comparison names its peer.
    assert k["6.6.15"].compared_to == "5.10.0-28-amd64"
    assert k["5.4.0"].verdict == VERDICT_OK
    assert k["5.15.0-91-generic"].verdict == VERDICT_INSUFFICIENT  # 2 hosts < min_hosts 3
    assert k["5.3.0"].lost_2m == 4 * 271 and k["5.3.0"].capacity_2m == 4 * 283
    assert {key for key in v.labels} == {("zone", "z1"), ("zone", "z2")}
    assert sum(r.hosts for r in v.labels.values()) == 19
    assert [h.kernel_release for h in v.worst_hosts] == ["5.3.0"] * 3  # 95.8% beats 6.6's 25%
    # Kernels come in version order, not text order (5.3 before 5.10, 5.15 before 6.6).
    assert [x.kernel_release for x in v.kernels] == ["5.3.0", "5.4.0", "5.10.0-28-amd64", "5.15.0-91-generic", "6.6.15"]


@pytest.mark.parametrize("releases", [
    ["4.19.0", "5.3.0", "5.4.0-150-generic", "5.10.0-28-amd64", "6.6.15", "6.18.2"],
    ["6.1.0", "6.1.0-10-amd64", "6.1.0-rc1"],  # a bare release sorts before its suffixed builds
    ["5.15.0-9-generic", "5.15.0-91-generic", "5.15.0-100-generic"],
])
def test_kernel_version_key_orders_numbers_as_numbers(releases: list[str]) -> None:
    from eptwatch.server.fleet.state import kernel_version_key
    for shuffled in (releases[::-1], releases[1:] + releases[:1]):
        assert sorted(shuffled, key=kernel_version_key) == releases


def test_kernel_version_key_never_raises_on_odd_releases() -> None:
    from eptwatch.server.fleet.state import kernel_version_key
    odd = ["", "unknown", "9" * 5000, "5.\u00b2.1", "\x00", "5..3", "-", "6.6.15" + "a" * 300]
    assert len(sorted(odd, key=kernel_version_key)) == len(odd)
    assert sorted(["5.10", "5.3", "5.9"], key=kernel_version_key) == ["5.3", "5.9", "5.10"]


def test_margin_alone_flags_a_kernel(templates: dict[str, pb.HostReport]) -> None:
    hosts = summaries(templates, {"linux-6.6-pages2m": 3, "linux-5.10-hostwalk": 3})
    cfg = FleetConfig(unexplained_ratio_threshold=1.0, margin_vs_best=0.05)  # only the peer comparison can decide
    k = {x.kernel_release: x for x in build_view(hosts, set(), 1000.0, cfg).kernels}
    assert k["6.6.15"].regressed and "worse by more than" in k["6.6.15"].evidence
    cfg = FleetConfig(unexplained_ratio_threshold=1.0, margin_vs_best=0.5)
    assert not {x.kernel_release: x for x in build_view(hosts, set(), 1000.0, cfg).kernels}["6.6.15"].regressed


def test_staleness_removes_silent_hosts_from_rollups(templates: dict[str, pb.HostReport]) -> None:
    hosts = summaries(templates, {"linux-5.4-fixed": 3}, now=1000.0)
    v = build_view(hosts, set(), 1000.0 + 121, FleetConfig(stale_after_seconds=120))
    assert v.total.hosts == 0 and v.hosts_stale == 3 and v.kernels == []


def test_clean_stream_end_hands_a_host_over_at_once(templates: dict[str, pb.HostReport]) -> None:
    now = [1000.0]
    state = FleetState(FleetConfig(stale_after_seconds=120), clock=lambda: now[0], max_view_age=0)
    (h,) = summaries(templates, {"linux-5.4-fixed": 1})
    state.stream_carries(h.host_id)
    state.put(h)
    assert state.view().total.hosts == 1
    state.stream_ended([h.host_id], clean=False)  # broken: probably coming back, stays until stale
    assert state.view().total.hosts == 1
    state.stream_carries(h.host_id)
    state.stream_ended([h.host_id], clean=True)  # the agent rotated to another replica
    v = state.view()
    assert v.total.hosts == 0 and v.hosts_departed == 1
    state.stream_carries(h.host_id)  # ... and came back
    assert state.view().total.hosts == 1


def test_older_report_does_not_replace_newer(templates: dict[str, pb.HostReport]) -> None:
    state = FleetState()
    a, = summaries(templates, {"linux-5.4-fixed": 1}, now=2000.0)
    b, = summaries(templates, {"linux-5.3-unfixed": 1}, now=1000.0)
    object.__setattr__(b, "host_id", a.host_id)
    state.put(a)
    state.put(b)
    assert state.get(a.host_id).kernel_release == "5.4.0"  # type: ignore[union-attr]


def test_explained_loss_never_makes_a_kernel_regressed(templates: dict[str, pb.HostReport]) -> None:
    more = load_templates(FIXTURES, ["nx-splits", "linux-4.19.84-backport"])
    hosts = summaries({**templates, **more}, {"nx-splits": 3, "linux-4.19.84-backport": 3, "linux-5.4-fixed": 3})
    k = {x.kernel_release: x for x in build_view(hosts, set(), 1000.0, FleetConfig()).kernels}
    nx = k["5.4.0-150-generic"]
    assert nx.lost_ratio is not None and nx.lost_ratio > 0.1  # 14.6% lost, all of it NX splits
    assert not nx.regressed and nx.verdict == VERDICT_OK and "explained 14.6% by nx_split" in nx.evidence


def test_small_unexplained_loss_is_flagged_against_its_peers() -> None:
    from eptwatch.server.fleet.state import KernelRollup, judge_kernels

    a = KernelRollup(kernel_release="a", era=pb.PREDICATE_ERA_HOST_PAGE_WALK, hosts=5, capacity_2m=10000, lost_2m=300, lost_unexplained_2m=300)
    b = KernelRollup(kernel_release="b", era=pb.PREDICATE_ERA_HOST_PAGE_WALK, hosts=5, capacity_2m=10000, lost_2m=10, lost_unexplained_2m=10)
    judge_kernels([a, b], FleetConfig())  # 3% is under the 5% threshold, but 2.9 points worse than its peer
    assert a.regressed and a.compared_to == "b" and not b.regressed


def test_loss_by_cause_reaches_the_api_and_sums_to_the_loss(templates: dict[str, pb.HostReport]) -> None:
    from eptwatch.server.faces.query import fleet_pb, host_pb

    hosts = summaries(templates, {"linux-5.3-unfixed": 4, "linux-5.4-fixed": 4, "linux-6.6-pages2m": 4, "linux-5.10-hostwalk": 5})
    v = build_view(hosts, set(), 1000.0, FleetConfig())
    msg = fleet_pb(v)
    for k in msg.kernels:
        assert sum(k.rollup.lost_by_cause_2m.values()) == k.rollup.lost_huge_2m, k.kernel_release
    assert sum(msg.total.lost_by_cause_2m.values()) == msg.total.lost_huge_2m > 0
    by_kernel = {k.kernel_release: dict(k.rollup.lost_by_cause_2m) for k in msg.kernels}
    assert by_kernel["5.3.0"] == {"known_page_cache_thp_bug": 4 * 271}  # the seed's bug, named
    for h in hosts:
        m = host_pb(h, "fresh")
        assert sum(m.lost_by_cause_2m.values()) == m.lost_huge_2m
