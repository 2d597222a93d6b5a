"""plan_commit: the exactly-once decision both stores (SQLite, PostgreSQL) take inside a transaction."""

from __future__ import annotations

from eptwatch.server.store.commit import Incoming, plan_commit
from eptwatch.v1 import ingest_pb2
from eptwatch.v1 import report_pb2 as pb

APPLIED, DUPLICATE = ingest_pb2.ACK_STATUS_APPLIED, ingest_pb2.ACK_STATUS_DUPLICATE


def item(host: str, seq: int, sample_s: int, instance: str = "i1", dropped: int = 0) -> Incoming:
    r = pb.HostReport(host_id=host, agent_instance=instance, sequence=seq)
    r.sample_time.FromSeconds(sample_s)
    return Incoming(r, spool_dropped_total=dropped)


def test_reports_at_or_below_the_mark_are_duplicates_carrying_it() -> None:
    plan = plan_commit([[item("h", 3, 100), item("h", 5, 101)], [item("h", 4, 102), item("h", 6, 103)]], {("h", "i1"): 3}, {})
    statuses = [[(r.status, r.high_water_sequence) for r in res] for res in plan.results]
    # 3 is at the committed mark; 4 is below the mark 5 set earlier in the same transaction.
    assert statuses == [[(DUPLICATE, 3), (APPLIED, 0)], [(DUPLICATE, 5), (APPLIED, 0)]]
    assert plan.marks == {("h", "i1"): 6}
    assert plan.agents == {("h", "i1"): [6, 2, 0]}  # last sequence, applied, largest drop count


def test_the_host_row_keeps_the_newest_sample_and_a_tie_goes_to_the_later_report() -> None:
    older_stored = {"h": 200.0}
    plan = plan_commit([[item("h", 1, 150), item("h", 2, 200), item("h", 3, 199)]], {}, older_stored)
    assert [r.became_latest for r in plan.results[0]] == [False, True, False]
    assert plan.hosts["h"][0].report.sequence == 2 and plan.latest == {"h": 200.0}
    assert plan.latest_slots == {"h": [(0, 1)]}


def test_instances_and_hosts_are_independent() -> None:
    plan = plan_commit([[item("a", 1, 10), item("a", 1, 10, instance="i2"), item("b", 1, 10, dropped=7)]], {("a", "i1"): 1}, {})
    assert [r.status for r in plan.results[0]] == [DUPLICATE, APPLIED, APPLIED]
    assert plan.agents == {("a", "i2"): [1, 1, 0], ("b", "i1"): [1, 1, 7]}
    assert set(plan.hosts) == {"a", "b"}
