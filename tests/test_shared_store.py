"""Several real aggregator processes (`eptwatch-server` on loopback) sharing one real PostgreSQL.

Exactly-once is the database's: one agent's stream split across two replicas (it rotates between them,
and one replica is SIGKILLed on the way) is applied with no loss and no duplicate, and an agent that
moves to the other replica in the middle of a backlog gets DUPLICATE for what the first one applied.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from eptwatch.v1 import ingest_pb2, ingest_pb2_grpc

from .pg import pg_server
from .procs import Aggregator, Proc, agent_args, http_get, spool_state
from .test_streaming import exchange, report, wait_for

INSECURE = ["--insecure-plaintext", "--insecure-no-auth"]

# How long a test waits for every replica to show a change: "eventually", with room for a loaded CI
# machine. The staleness bound itself (2 s) is a speed figure, measured by bench/follow_lag.py, not here.
CONVERGE_SECONDS = 30.0


@pytest.fixture
def replicas(tmp_path: Path) -> list[Aggregator]:
    dsn = pg_server().new_database()
    aggs = [Aggregator(tmp_path / f"r{i}", INSECURE, state=dsn) for i in range(2)]
    for a in aggs:
        a.start(wait=False)  # both create the schema at once: the race must be harmless
    for a in aggs:
        wait_for(lambda a=a: _ready(a), 30, a.proc)
    yield aggs
    for a in aggs:
        if a.proc:
            a.proc.kill9()


def _ready(a: Aggregator) -> bool:
    try:
        http_get(a.http + "/readyz")
        return True
    except OSError:
        return False


def _reports_total(a: Aggregator, result: str) -> float:
    for fam in text_string_to_metric_families(http_get(a.http + "/metrics")):
        for s in fam.samples:
            if s.name == "eptwatch_server_reports_total" and s.labels.get("result") == result:
                return s.value
    return 0.0


def test_agent_moving_between_replicas_mid_backlog_gets_duplicate_then_applied(replicas: list[Aggregator]) -> None:
    a, b = replicas
    first = asyncio.run(exchange(a.target, [ingest_pb2.AgentMessage(reports=[report(s, host="hv-move", instance="m")
                                                                             for s in range(1, 11)])]))
    assert [ack.status for m in first for ack in m.acks] == [ingest_pb2.ACK_STATUS_APPLIED] * 10
    # The acks of 6..10 were lost with the stream; the agent resends its backlog from 6 to replica b.
    second = asyncio.run(exchange(b.target, [ingest_pb2.AgentMessage(reports=[report(s, host="hv-move", instance="m")
                                                                              for s in range(6, 16)])]))
    acks = [ack for m in second for ack in m.acks]
    assert [(ack.sequence, ack.status) for ack in acks] == \
        [(s, ingest_pb2.ACK_STATUS_DUPLICATE) for s in range(6, 11)] + [(s, ingest_pb2.ACK_STATUS_APPLIED) for s in range(11, 16)]
    assert a.applied()[("hv-move", "m")] == (15, 15)
    assert _reports_total(b, "duplicate") == 5 and _reports_total(b, "applied") == 5


def test_one_agent_split_across_two_replicas_one_sigkilled_is_applied_exactly_once(replicas: list[Aggregator],
                                                                                    tmp_path: Path) -> None:
    a, b = replicas
    cfg = tmp_path / "agent.yaml"
    # round_robin over both replicas and streams rotated every 0.5 s: the stream keeps changing replica.
    cfg.write_text("load_balancing: round_robin\nstream_max_age_seconds: 0.5\nbackoff_initial_seconds: 0.05\nbackoff_max_seconds: 0.5\n")
    target = f"ipv4:127.0.0.1:{a.grpc_port},127.0.0.1:{b.grpc_port}"
    spools = {h: tmp_path / h / "spool.sqlite3" for h in ("hv-split-0", "hv-split-1")}
    agents = [Proc(agent_args(target, spool, h, interval=0.05, extra=["--insecure-plaintext", "--config", str(cfg)]),
                   tmp_path / h / "agent.log").start() for h, spool in spools.items()]
    try:
        wait_for(lambda: all(spool_state(s)[1] > 20 for s in spools.values()), 60, agents[0])
        a.proc.kill9()  # type: ignore[union-attr]  # in the middle of whatever it was committing
        time.sleep(0.5)
        a.start()
        # Both replicas applied reports of the streams (the split), counted per replica.
        wait_for(lambda: _reports_total(a, "applied") > 0 and _reports_total(b, "applied") > 0, 30, agents[0])
        time.sleep(1.0)
        for p in agents:
            assert p.term() == 0, p.output()[-2000:]
        applied = a.applied()
        for host, spool in spools.items():
            instance, created, depth = spool_state(spool)
            assert depth == 0, f"{host}: {depth} reports still spooled"
            # Every sequence 1..created applied once: mark == count == created (a duplicate would push
            # the count above, a loss would leave it below).
            assert applied[(host, instance)] == (created, created), (host, applied[(host, instance)], created)
    finally:
        for p in agents:
            p.kill9()


def test_each_replica_serves_the_whole_fleet_within_the_staleness_bound(replicas: list[Aggregator]) -> None:
    """Hosts whose reports only one replica received are on the other's API too, with the same rollups
    and verdicts, within the documented staleness bound (followers poll every 0.5 s; the bound is 2 s)."""
    a, b = replicas
    fixtures = ["linux-5.3-unfixed", "linux-5.4-fixed", "anon-thp"]
    for i, fx in enumerate(fixtures):
        for n, agg in enumerate((a, b)):
            asyncio.run(exchange(agg.target, [ingest_pb2.AgentMessage(reports=[report(1, host=f"hv-{fx}-{n}", instance="x", fixture=fx)])]))
    everyone = {f"hv-{fx}-{n}" for fx in fixtures for n in range(2)}
    for agg in (a, b):
        wait_for(lambda agg=agg: _fresh_hosts(agg) == everyone, CONVERGE_SECONDS)
    wait_for(lambda: _fleet(a) == _fleet(b), CONVERGE_SECONDS)
    fleet = _fleet(a)
    assert int(fleet["total"]["hosts"]) == len(everyone)
    # A newer report through one replica replaces the host's state on the other.
    asyncio.run(exchange(a.target, [ingest_pb2.AgentMessage(reports=[report(2, host="hv-anon-thp-0", instance="x", fixture="anon-thp")])]))
    wait_for(lambda: _host_sequence(b, "hv-anon-thp-0") == 2, CONVERGE_SECONDS)


async def _report_then_depart(target: str, r: object) -> None:
    """An agent's last stream: a report, its ack, then `departing` and a clean close (as an agent that stops)."""
    async with grpc.aio.insecure_channel(target) as channel:
        call = ingest_pb2_grpc.IngestStub(channel).Stream(timeout=15)
        await call.write(ingest_pb2.AgentMessage(reports=[r]))  # type: ignore[list-item]
        await call.read()
        await call.write(ingest_pb2.AgentMessage(departing=True))
        await call.done_writing()
        while await call.read() is not grpc.aio.EOF:
            pass


def _departed_hosts(a: Aggregator) -> set[str]:
    return {h["host_id"] for h in json.loads(http_get(a.http + "/api/v1/hosts?status=departed&limit=1000"))["hosts"]}


def test_a_departure_on_one_replica_is_seen_by_the_other_and_survives_a_restart(replicas: list[Aggregator]) -> None:
    a, b = replicas
    asyncio.run(exchange(b.target, [ingest_pb2.AgentMessage(reports=[report(1, host="hv-stays", instance="s")])]))
    asyncio.run(_report_then_depart(a.target, report(1, host="hv-gone", instance="g")))
    for agg in replicas:
        wait_for(lambda agg=agg: _departed_hosts(agg) == {"hv-gone"}, CONVERGE_SECONDS)
        assert int(_fleet(agg)["hosts_departed"]) == 1  # type: ignore[call-overload]
    b.proc.kill9()  # type: ignore[union-attr]
    b.start()
    assert _departed_hosts(b) == {"hv-gone"} and "hv-gone" in http_get(b.http + "/")
    # The host reports again (through the other replica): back on both.
    asyncio.run(exchange(b.target, [ingest_pb2.AgentMessage(reports=[report(2, host="hv-gone", instance="g")])]))
    for agg in replicas:
        wait_for(lambda agg=agg: _departed_hosts(agg) == set() and _fresh_hosts(agg) == {"hv-stays", "hv-gone"}, CONVERGE_SECONDS)


def _fresh_hosts(a: Aggregator) -> set[str]:
    return {h["host_id"] for h in json.loads(http_get(a.http + "/api/v1/hosts?limit=1000"))["hosts"]}


def _fleet(a: Aggregator) -> dict[str, object]:
    """The fleet document without the instant it was made."""
    doc = json.loads(http_get(a.http + "/api/v1/fleet"))
    doc.pop("generated", None)
    doc.pop("generated_at", None)
    return doc


def _host_sequence(a: Aggregator, host: str) -> int:
    """The sequence of the host's state in the replica's fleet view (not read from the store)."""
    return int(json.loads(http_get(a.http + f"/api/v1/hosts/{host}"))["summary"]["sequence"])


def _metric(a: Aggregator, name: str) -> list[float]:
    return [s.value for fam in text_string_to_metric_families(http_get(a.http + "/metrics")) for s in fam.samples if s.name == name]


def test_fleet_rollups_are_exported_by_one_replica_and_taken_over_when_it_dies(replicas: list[Aggregator]) -> None:
    """Prometheus sums over replicas: with a shared view, only the lease holder exports the rollups."""
    a, b = replicas
    asyncio.run(exchange(a.target, [ingest_pb2.AgentMessage(reports=[report(1, host="hv-exp", instance="x")])]))
    wait_for(lambda: all(_fresh_hosts(agg) == {"hv-exp"} for agg in replicas), CONVERGE_SECONDS)

    def exporters() -> list[Aggregator]:
        return [agg for agg in replicas if agg.proc and agg.proc.popen and agg.proc.popen.poll() is None
                and _metric(agg, "eptwatch_server_fleet_exporter") == [1.0]]

    wait_for(lambda: len(exporters()) == 1, 10)
    (holder,) = exporters()
    other = b if holder is a else a
    assert sum(_metric(holder, "eptwatch_fleet_hosts")) == 1
    assert _metric(other, "eptwatch_fleet_hosts") == []  # not exported twice
    assert _metric(other, "eptwatch_server_reports_total") != []  # its own ingest metrics stay
    holder.proc.kill9()  # type: ignore[union-attr]
    wait_for(lambda: _metric(other, "eptwatch_server_fleet_exporter") == [1.0], 15)  # lease TTL 5 s
    assert sum(_metric(other, "eptwatch_fleet_hosts")) == 1


def test_three_replicas_with_agents_rotating_agree_on_the_fleet_and_apply_once(tmp_path: Path) -> None:
    dsn = pg_server().new_database()
    aggs = [Aggregator(tmp_path / f"r{i}", INSECURE, state=dsn).start() for i in range(3)]
    cfg = tmp_path / "agent.yaml"
    cfg.write_text("load_balancing: round_robin\nstream_max_age_seconds: 0.7\nbackoff_initial_seconds: 0.05\nbackoff_max_seconds: 0.5\n")
    target = "ipv4:" + ",".join(f"127.0.0.1:{a.grpc_port}" for a in aggs)
    fixtures = ["linux-5.3-unfixed", "linux-5.4-fixed", "anon-thp", "linux-6.6-pages2m"]
    spools = {f"hv-rot-{i}": tmp_path / f"hv-rot-{i}" / "spool.sqlite3" for i in range(len(fixtures))}
    agents = [Proc(agent_args(target, spool, h, fixture=fixtures[i], interval=0.1, extra=["--insecure-plaintext", "--config", str(cfg)]),
                   tmp_path / h / "agent.log").start() for i, (h, spool) in enumerate(spools.items())]
    try:
        wait_for(lambda: all(spool_state(s)[1] > 15 for s in spools.values()), 60, agents[0])
        for p in agents:
            assert p.term() == 0, p.output()[-2000:]
        applied = aggs[0].applied()
        for host, spool in spools.items():
            instance, created, depth = spool_state(spool)
            assert depth == 0 and applied[(host, instance)] == (created, created), (host, applied.get((host, instance)), created)
        # Every replica took part, and each ends with the same view of the whole fleet: the agents that
        # stopped said they were departing, and every replica shows them departed (while their rotations
        # before were not: a departure stands only if no stream started carrying the host since).
        for a in aggs:
            assert _metric(a, "eptwatch_server_reports_total") and sum(_metric(a, "eptwatch_server_reports_total")) > 0
        wait_for(lambda: all(_departed_hosts(a) == set(spools) for a in aggs), CONVERGE_SECONDS)
        wait_for(lambda: _fleet(aggs[0]) == _fleet(aggs[1]) == _fleet(aggs[2]), CONVERGE_SECONDS)
        kernels = [json.loads(http_get(a.http + "/api/v1/kernels")) for a in aggs]
        assert kernels[0] == kernels[1] == kernels[2] and kernels[0]
    finally:
        for p in agents:
            p.kill9()
        for a in aggs:
            a.proc.kill9()  # type: ignore[union-attr]
