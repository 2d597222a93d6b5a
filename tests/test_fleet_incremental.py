"""FleetState keeps its rollups as running sums; they must always equal a view built from scratch."""

from __future__ import annotations

import random

import pytest

from eptwatch.server.fleet.state import FleetConfig, FleetState, FleetView, build_view, summarise
from eptwatch.server.simulate import SimHost, SimulatedFleet, load_templates
from eptwatch.v1 import report_pb2 as pb

from .conftest import FIXTURES

NAMES = ["linux-5.3-unfixed", "linux-5.4-fixed", "linux-6.6-pages2m", "anon-thp", "linux-5.10-hostwalk", "global-only-two-vms", "thp-off"]


@pytest.fixture(scope="module")
def templates() -> dict[str, pb.HostReport]:
    return load_templates(FIXTURES, NAMES)


def comparable(v: FleetView) -> tuple:  # type: ignore[type-arg]
    kernels = [(k.kernel_release, k.era, k.hosts, k.vms, k.capacity_2m, k.observed_2m, k.lost_2m, k.lost_explained_2m,
                k.lost_unexplained_2m, k.known_bug_vms, k.spool_dropped, dict(k.causes), k.verdict, k.compared_to, k.evidence)
               for k in v.kernels]
    def r(x):  # type: ignore[no-untyped-def]
        return (x.hosts, x.vms, x.capacity_2m, x.observed_2m, x.lost_2m, x.lost_explained_2m, x.lost_unexplained_2m,
                x.known_bug_vms, x.spool_dropped, dict(x.causes))
    return (r(v.total), kernels, {k: r(x) for k, x in v.labels.items()},
            v.hosts_stale, v.hosts_departed, [h.host_id for h in v.worst_hosts], sorted(v.fresh), sorted(v.stale),
            v.newest_received, v.oldest_fresh_received)


@pytest.mark.parametrize("seed", range(6))
def test_running_sums_equal_a_view_from_scratch(templates: dict[str, pb.HostReport], seed: int) -> None:
    rng = random.Random(seed)
    cfg = FleetConfig(stale_after_seconds=50, rollup_labels=("zone", "cluster"), top_n=4, min_hosts=2)
    now = [1000.0]
    state = FleetState(cfg, clock=lambda: now[0], max_view_age=0)
    fleet = SimulatedFleet(templates, 0)
    ids = [f"h{i:02d}" for i in range(24)]
    for _ in range(400):
        op = rng.random()
        host = rng.choice(ids)
        if op < 0.5:
            t = now[0] - rng.choice([0, 0, 0, 30, 80])  # some reports sampled (and kept) out of order
            sim = SimHost(host, rng.choice(NAMES), (("zone", rng.choice("ab")), ("cluster", rng.choice("xyz"))), "i")
            r = fleet.report(sim, t)
            state.put(summarise(r, received=now[0] - rng.choice([0, 0, 60]), spool_dropped_total=rng.randrange(3)))
        elif op < 0.62:
            state.stream_carries(host)
        elif op < 0.75:
            state.stream_ended([host], clean=rng.random() < 0.6)
        elif op < 0.97:
            now[0] += rng.choice([1, 5, 20, 40])
        else:
            now[0] -= rng.choice([1, 30])  # the clock steps back
        if rng.random() < 0.3:
            got = state.view()
            want = build_view(state.hosts().values(), set(state._departed), got.generated_at, cfg)
            assert comparable(got) == comparable(want)


@pytest.mark.parametrize("seed", range(4))
def test_replace_is_taking_the_old_report_away_and_adding_the_new(templates: dict[str, pb.HostReport], seed: int) -> None:
    """Rollups.replace (a counted host's next report, in one pass) leaves every rollup, its causes and its
    loss by cause exactly as add(old, -1) then add(new) do: across kernels, label values (present,
    absent, changed) and reports whose causes change or do not."""
    import dataclasses

    from eptwatch.server.fleet.state import Rollups

    rng = random.Random(seed)
    fleet = SimulatedFleet(templates, 0)
    labels = ("zone", "cluster")

    def summary() -> object:
        pairs = tuple((k, rng.choice("ab")) for k in labels if rng.random() < 0.8)
        r = fleet.report(SimHost("h1", rng.choice(NAMES), pairs, "i"), 1000.0)
        s = summarise(r, received=1000.0, spool_dropped_total=rng.randrange(3))
        return dataclasses.replace(s, received=rng.random()) if rng.random() < 0.3 else s

    def state(r: Rollups) -> tuple:  # type: ignore[type-arg]
        def one(x):  # type: ignore[no-untyped-def]
            return (x.hosts, x.vms, x.capacity_2m, x.observed_2m, x.lost_2m, x.lost_explained_2m, x.lost_unexplained_2m,
                    x.known_bug_vms, x.spool_dropped, dict(x.causes), dict(x.lost_by_cause))
        return (one(r.total), {k: one(x) for k, x in r.kernels.items()}, {k: one(x) for k, x in r.labels.items()})

    fast, slow = Rollups(labels), Rollups(labels)
    others = [summary() for _ in range(3)]  # other hosts in the same rollups
    for o in others:
        fast.add(o)  # type: ignore[arg-type]
        slow.add(o)  # type: ignore[arg-type]
    old = summary()
    fast.add(old)  # type: ignore[arg-type]
    slow.add(old)  # type: ignore[arg-type]
    lost_by_cause_seen = False
    for _ in range(200):
        new = old if rng.random() < 0.1 else summary()
        fast.replace(old, new)  # type: ignore[arg-type]
        slow.add(old, -1)  # type: ignore[arg-type]
        slow.add(new)  # type: ignore[arg-type]
        assert state(fast) == state(slow)
        lost_by_cause_seen = lost_by_cause_seen or bool(new.lost_by_cause)  # type: ignore[attr-defined]
        old = new
    assert lost_by_cause_seen  # the templates exercise the loss split too
