"""The PostgreSQL store against a real PostgreSQL server (tests/pg.py): the store contract both stores
share, exactly-once across two stores (two replicas) on one database, following by ingest id, and the
DSN never shown with its password."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import psycopg
import pytest

from eptwatch.server.store.base import StoreBase, is_postgres_url, open_store, redact_dsn
from eptwatch.server.store.postgres import PgStore
from eptwatch.server.store.commit import DATABASE, REPORT, Incoming, StoreError
from eptwatch.v1 import ingest_pb2, report_pb2

from .pg import pg_server

APPLIED, DUPLICATE = ingest_pb2.ACK_STATUS_APPLIED, ingest_pb2.ACK_STATUS_DUPLICATE


def _incoming(host: str, inst: str, seq: int, t: float) -> Incoming:
    r = report_pb2.HostReport(host_id=host, agent_instance=inst, sequence=seq)
    r.sample_time.FromNanoseconds(int(t * 1e9))
    return Incoming(r, r.SerializeToString())


@pytest.fixture
def pg_dsn() -> str:
    return pg_server().new_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def state(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """--state for either store: a directory, or a URL of a fresh PostgreSQL database."""
    return pg_server().new_database() if request.param == "postgresql" else str(tmp_path / "state")


def test_store_contract_dedupes_keeps_latest_and_survives_reopen(state: str) -> None:
    async def go() -> None:
        st = open_store(state)
        st.start()
        res = await st.submit([_incoming("h", "i", 1, 100), _incoming("h", "i", 2, 200), _incoming("h", "i", 2, 200)])
        assert [r.status for r in res] == [APPLIED, APPLIED, DUPLICATE]
        assert res[2].high_water_sequence == 2  # the mark goes with a DUPLICATE ack
        # A replayed older report from a new instance applies, but does not replace the newer state.
        (r,) = await st.submit([_incoming("h", "j", 1, 150)])
        assert r.status == APPLIED and not r.became_latest
        assert st.report_reader().latest("h") is not None and st.report_reader().latest("nobody") is None
        st.close()
        st2 = open_store(state)
        (host,) = st2.load_hosts()
        assert host.sequence == 2 and host.agent_instance == "i"
        assert {(a.agent_instance, a.last_sequence, a.applied_total) for a in st2.load_agents()} == {("i", 2, 2), ("j", 1, 1)}
        st2.start()
        (r,) = await st2.submit([_incoming("h", "i", 2, 200)])  # the mark survived the restart
        assert r.status == DUPLICATE
        st2.close()

    asyncio.run(go())


def test_postgres_url_selects_the_postgres_store(pg_dsn: str, tmp_path: Path) -> None:
    st = open_store(pg_dsn)
    try:
        assert isinstance(st, PgStore)
    finally:
        st.close()
    assert is_postgres_url("postgres://x/y") and is_postgres_url("POSTGRESQL://x") and not is_postgres_url(str(tmp_path))


def test_dsn_password_is_never_shown() -> None:
    assert redact_dsn("postgresql://agg:s3cr%40t@db:5432/ept?sslmode=require") == "postgresql://agg:***@db:5432/ept?sslmode=require"
    assert redact_dsn("postgresql://db/ept?user=agg&password=s3cret&sslmode=require") == \
        "postgresql://db/ept?user=agg&password=***&sslmode=require"
    assert redact_dsn("host=db password='a b' user=agg") == "host=db password=*** user=agg"
    assert redact_dsn("postgresql://agg@db/ept") == "postgresql://agg@db/ept"


def test_a_refused_connection_names_the_server_but_not_the_password() -> None:
    from .procs import free_port

    dsn = f"postgresql://agg:hunter2@127.0.0.1:{free_port()}/ept"
    with pytest.raises(RuntimeError) as err:
        PgStore(dsn)
    assert "hunter2" not in str(err.value) and "postgresql://agg:***@127.0.0.1" in str(err.value), err.value


def _run_stream(store: StoreBase, host: str, inst: str, seqs: list[int], per_message: int) -> dict[int, int]:
    """Submit `seqs` in messages of `per_message` reports, each awaited (as a stream does); seq -> status."""
    async def go() -> dict[int, int]:
        out: dict[int, int] = {}
        for k in range(0, len(seqs), per_message):
            part = seqs[k:k + per_message]
            res = await store.submit([_incoming(host, inst, s, 1000 + s) for s in part])
            out.update({s: r.status for s, r in zip(part, res)})
        return out

    return asyncio.run(go())


def test_two_replicas_on_one_database_apply_each_report_exactly_once(pg_dsn: str) -> None:
    """One agent's backlog sent to two replicas at once, overlapping (a stream moved while the first was
    still committing): every sequence is APPLIED by exactly one replica and DUPLICATE on the other, and
    the database's mark and count say each was applied once."""
    a, b = PgStore(pg_dsn), PgStore(pg_dsn)
    a.start()
    b.start()
    try:
        outcome: dict[str, dict[int, int]] = {}
        seqs = list(range(1, 301))
        threads = [threading.Thread(target=lambda n=n, s=s: outcome.__setitem__(n, _run_stream(s, "hv-1", "inst", seqs, 7)))
                   for n, s in (("a", a), ("b", b))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for s in seqs:
            assert sorted([outcome["a"][s], outcome["b"][s]]) == [APPLIED, DUPLICATE], s
        (agent,) = a.load_agents()
        assert (agent.last_sequence, agent.applied_total) == (300, 300)
        (host,) = b.load_hosts()
        assert host.sequence == 300  # the newest report is the stored state, whoever applied it
    finally:
        a.close()
        b.close()


def test_agent_moving_to_another_replica_mid_backlog_gets_duplicate_then_applied(pg_dsn: str) -> None:
    a, b = PgStore(pg_dsn), PgStore(pg_dsn)
    a.start()
    b.start()
    try:
        first = _run_stream(a, "hv-2", "inst", list(range(1, 21)), 5)
        assert set(first.values()) == {APPLIED}
        # Acks for 16..20 were lost with the stream: the agent resends from 16 to the other replica.
        second = _run_stream(b, "hv-2", "inst", list(range(16, 41)), 5)
        assert all(second[s] == DUPLICATE for s in range(16, 21))
        assert all(second[s] == APPLIED for s in range(21, 41))
        # And back again: the first replica holds nothing in memory that could disagree.
        third = _run_stream(a, "hv-2", "inst", list(range(39, 46)), 3)
        assert [third[s] for s in range(39, 46)] == [DUPLICATE] * 2 + [APPLIED] * 5
        (agent,) = a.load_agents()
        assert (agent.last_sequence, agent.applied_total) == (45, 45)
        assert a.commits_total > 0 and b.commits_total > 0
    finally:
        a.close()
        b.close()


def test_reports_since_follows_every_change_in_order(pg_dsn: str) -> None:
    a, b = PgStore(pg_dsn), PgStore(pg_dsn)
    a.start()
    b.start()
    try:
        assert a.reports_since(0) == []
        _run_stream(a, "h1", "i", [1, 2], 2)
        _run_stream(b, "h2", "i", [1], 1)
        seen = a.reports_since(0)
        assert [f.host_id for f in seen] == ["h1", "h2"]
        assert seen[0].ingest_id < seen[1].ingest_id
        cursor = seen[-1].ingest_id
        assert b.reports_since(cursor) == []
        _run_stream(b, "h1", "i", [3], 1)
        (change,) = a.reports_since(cursor)
        assert (change.host_id, change.sequence) == ("h1", 3) and change.ingest_id > cursor
        assert [f.host_id for f in a.reports_since(0, limit=1)] == ["h2"]  # h1 changed since: now after h2
        # One transaction stamps all its hosts with one id: paging inside it misses none.
        async def three() -> None:
            await a.submit([_incoming(h, "i", 1, 2000) for h in ("g1", "g2", "g3")])

        asyncio.run(three())
        page = a.reports_since(change.ingest_id, limit=2)
        assert [f.host_id for f in page] == ["g1", "g2"] and page[0].ingest_id == page[1].ingest_id
        rest = a.reports_since(page[-1].ingest_id, 2, page[-1].host_id)
        assert [f.host_id for f in rest] == ["g3"]
    finally:
        a.close()
        b.close()


def test_a_commit_after_the_database_connection_dropped_reconnects(pg_dsn: str) -> None:
    st = PgStore(pg_dsn)
    st.start()
    try:
        assert _run_stream(st, "h", "i", [1], 1) == {1: APPLIED}
        with psycopg.connect(pg_dsn, autocommit=True) as c:
            c.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                      "WHERE application_name = 'eptwatch-server' AND pid <> pg_backend_pid()")
        # The commit on the dead connection fails (the stream would fail and the agent resend) ...
        with pytest.raises(StoreError, match="PostgreSQL postgresql://eptwatch@127.0.0.1") as err:
            _run_stream(st, "h", "i", [2], 1)
        assert err.value.reason == DATABASE and st.commit_failures_total == {DATABASE: 1}
        # ... and the next one runs on a new connection; nothing was applied twice or lost.
        assert _run_stream(st, "h", "i", [2, 3], 2) == {2: APPLIED, 3: APPLIED}
        (agent,) = st.load_agents()
        assert (agent.last_sequence, agent.applied_total) == (3, 3)
    finally:
        st.close()


def test_server_with_an_unreachable_database_exits_2_without_showing_the_password(capsys: pytest.CaptureFixture[str]) -> None:
    from eptwatch.server.cli import main

    from .procs import free_port

    url = f"postgresql://agg:hunter2@127.0.0.1:{free_port()}/ept"
    assert main(["--state", url, "--insecure-plaintext", "--insecure-no-auth", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"]) == 2
    err = capsys.readouterr().err
    assert "cannot connect" in err and "agg:***@127.0.0.1" in err and "hunter2" not in err, err


def test_follower_takes_every_change_into_the_fleet_view_across_pages(pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from eptwatch.server.fleet import follow
    from eptwatch.server.fleet.state import FleetState

    writer, mine = PgStore(pg_dsn), PgStore(pg_dsn)
    writer.start()
    try:
        _run_stream(writer, "before", "i", [1], 1)
        fleet = FleetState()
        f = follow.StoreFollower(mine, fleet)
        f.start_at_high_water()  # what was committed before is loaded, not followed
        monkeypatch.setattr(follow, "FOLLOW_BATCH", 2)

        async def five() -> None:
            await writer.submit([_incoming(f"h{k}", "i", 1, 3000) for k in range(5)])

        asyncio.run(five())
        assert f.poll_once() == 5
        assert set(fleet.hosts()) == {f"h{k}" for k in range(5)} and f.hosts_followed_total == 5
        assert f.poll_once() == 0  # nothing new
        async def newer() -> None:
            await writer.submit([_incoming("h0", "i", 2, 4000)])

        asyncio.run(newer())
        assert f.poll_once() == 1 and fleet.get("h0").sequence == 2  # type: ignore[union-attr]
        # A row that does not parse costs only its host: the follower moves past it.
        with psycopg.connect(pg_dsn, autocommit=True) as c:
            c.execute("UPDATE hosts SET report = %s, ingest_id = 1000, sample_time = 9999 WHERE host_id = 'h1'", (b"\xff\xff",))
            good = _incoming("h2", "i", 7, 9999).report.SerializeToString()
            c.execute("UPDATE hosts SET report = %s, ingest_id = 1001, sample_time = 9999, sequence = 7 WHERE host_id = 'h2'", (good,))
        assert f.poll_once() == 2
        assert fleet.get("h1").sequence == 1 and fleet.get("h2").sequence == 7  # type: ignore[union-attr]
        assert f.poll_once() == 0
        # The export lease: one holder at a time.
        g = follow.StoreFollower(writer, FleetState())
        f.renew_lease()
        g.renew_lease()
        assert f.exports_fleet() and not g.exports_fleet()
    finally:
        writer.close()
        mine.close()


def test_a_value_the_database_refuses_fails_only_its_own_report(pg_dsn: str) -> None:
    """A sequence beyond BIGINT (were the checks to let it through) is REJECTED alone: the other messages
    of its group commit, and the other reports of its own message, are applied."""
    st = PgStore(pg_dsn, commit_delay_seconds=0.2)  # both messages wait for, and join, one transaction
    st.start()

    async def go() -> tuple[object, object]:
        good = st.submit([_incoming("h-good", "i", 1, 100)])
        bad = st.submit([_incoming("h-bad", "i", 1, 100), _incoming("h-bad", "i", 2**63, 100)])
        return tuple(await asyncio.gather(good, bad, return_exceptions=True))  # type: ignore[return-value]

    try:
        good, bad = asyncio.run(go())
        assert [r.status for r in good] == [APPLIED]  # type: ignore[attr-defined]
        assert [r.status for r in bad] == [APPLIED, ingest_pb2.ACK_STATUS_REJECTED]  # type: ignore[attr-defined]
        assert "could not be stored" in bad[1].reason  # type: ignore[index]
        assert {(a.host_id, a.applied_total) for a in st.load_agents()} == {("h-good", 1), ("h-bad", 1)}
        assert st.commit_failures_total == {REPORT: 1}
    finally:
        st.close()


def test_departures_are_kept_in_the_store_followed_by_other_replicas_and_cleared_by_a_report(pg_dsn: str) -> None:
    """PgDepartedLog: a departure written by one replica is in the store (loaded at start-up), reaches
    another replica's fleet view through its follower, and a later report of the host clears it."""
    from eptwatch.server.fleet import follow
    from eptwatch.server.fleet.state import FleetConfig
    from eptwatch.server.store.postgres import PgDepartedLog

    writer, mine = PgStore(pg_dsn), PgStore(pg_dsn)
    writer.start()
    told: list[tuple[str, float | None]] = []
    try:
        now = 1_000_000.0
        fleet = follow.SharedFleetState(FleetConfig(stale_after_seconds=1e12), on_departed=lambda h, at: told.append((h, at)))
        f = follow.StoreFollower(mine, fleet)

        async def first() -> None:
            await writer.submit([_incoming("h1", "i", 1, now), _incoming("h2", "i", 1, now)])

        asyncio.run(first())
        assert f.poll_once() == 2
        departures = PgDepartedLog(writer)
        departures.write([("h1", 123.5)])
        assert departures.load() == {"h1": 123.5}  # durable: what a restarting replica marks departed
        assert f.poll_once() == 1
        view = fleet.view()
        assert set(view.departed) == {"h1"} and set(view.fresh) == {"h2"} and view.total.hosts == 1

        async def back() -> None:
            await writer.submit([_incoming("h1", "i", 2, now + 1)])

        asyncio.run(back())
        assert departures.load() == {}  # the host's next latest report clears its departure
        assert f.poll_once() == 1
        assert set(fleet.view().fresh) == {"h1", "h2"}

        # An agent rotating from replica A to B: A's departure, landing before or after B's stream start,
        # leaves the host reporting; the departure of the last stream's replica stands.
        on_a, on_b = departures, PgDepartedLog(mine)
        on_a.write([("h2", None)])
        on_b.write([("h2", None)])
        on_a.write([("h2", 10.0)])
        assert departures.load() == {}
        on_b.write([("h2", 20.0)])
        assert departures.load() == {"h2": 20.0}
        on_a.write([("h2", None)])  # the agent starts again, on A
        on_a.write([("h2", 30.0)])
        assert departures.load() == {"h2": 30.0}
        on_b.write([("h2", None)])  # rotated to B: A's departure landed first, B's stream start clears it
        assert departures.load() == {}
        # In one batch a host's last word wins.
        on_a.write([("h1", None), ("h1", 40.0)])
        assert departures.load() == {"h1": 40.0}
        on_a.write([("h1", 50.0), ("h1", None)])
        assert departures.load() == {} and on_a.writes_failed_total == on_b.writes_failed_total == 0
        assert f.poll_once() == 2 and not fleet.view().departed
        assert told == []  # nothing followed is told back to the store

        # Where the store says departed while a stream here carries the host, this replica says it carries it.
        fleet.stream_carries("h2")
        assert told == [("h2", None)]  # a stream starting is told to the store
        on_b.write([("h2", 60.0)])  # B departs it: this replica's stream start has not landed (it only told `told`)
        assert f.poll_once() == 1
        assert "h2" not in fleet.view().departed and told == [("h2", None), ("h2", None)]
    finally:
        writer.close()
        mine.close()


def test_followers_take_the_committing_replicas_summary_and_fall_back_to_the_report(pg_dsn: str) -> None:
    """A replica stores each host's summary beside its report; another replica's follower takes it as
    the summary it would have made itself, and summarises the report where the summary is missing,
    broken, or belongs to another report than the row's."""
    import dataclasses

    from eptwatch.server.fleet import follow
    from eptwatch.server.fleet.state import FleetState, summarise
    from eptwatch.server.ingest.validate import report_totals
    from eptwatch.server.store.postgres import decode_summary

    from .test_streaming import report

    writer, mine = PgStore(pg_dsn), PgStore(pg_dsn)
    writer.start()
    try:
        r = report(3, host="hv-sum", instance="s", fixture="anon-thp")
        r.labels["rack"] = "r1"

        async def put() -> None:
            await writer.submit([Incoming(r, r.SerializeToString(), 7, report_totals(r))])

        asyncio.run(put())
        (row,) = mine.reports_since(0)
        assert row.summary is not None and row.report_bytes is None  # the report itself is not sent
        expected = dataclasses.replace(summarise(r, row.received, 7), spool_dropped_total=row.spool_dropped_total)
        assert decode_summary(row) == expected and expected.vms > 0 and expected.labels == (("rack", "r1"),)
        fleet = FleetState()
        assert follow.StoreFollower(mine, fleet).poll_once() == 1
        assert fleet.get("hv-sum") == expected
        # A summary that is not its row's, or does not decode: the row's report is summarised instead.
        assert decode_summary(dataclasses.replace(row, sequence=4)) is None
        assert decode_summary(dataclasses.replace(row, summary='["s", 3')) is None
        assert decode_summary(dataclasses.replace(row, summary=row.summary.replace('"s",3', '"s",true'))) is None
        with psycopg.connect(pg_dsn, autocommit=True) as c:
            c.execute("UPDATE hosts SET summary = '[1]', ingest_id = 1000")
        other = FleetState()
        assert follow.StoreFollower(mine, other).poll_once() == 1
        assert other.get("hv-sum") == expected
    finally:
        writer.close()
        mine.close()


def test_binary_arrays_round_trip_through_the_server(pg_dsn: str) -> None:
    """The commit's arrays are encoded by the store itself (PostgreSQL's binary array format), not by
    psycopg: every value comes back from the server as it was sent, NULLs and empty arrays included."""
    from eptwatch.server.store.postgres import bytea_array, float8_array, int8_array, text_array

    store = PgStore(pg_dsn)  # its writer connection has the dumpers
    try:
        c = store._conn
        texts = ["hv-1", "", "ünïcode ✓", "x" * 5000, None]
        ints = [0, 1, -1, (1 << 63) - 1, -(1 << 63)]
        floats = [0.0, -1.5, 1.7e9 + 0.123456, float("inf")]
        blobs = [b"", b"\x00\x01\xff", bytes(range(256)) * 60]
        for arr, expected in ((text_array(texts), texts), (int8_array(ints), ints), (float8_array(floats), floats),
                              (bytea_array(blobs), blobs), (text_array([]), []), (int8_array([]), [])):
            assert c.execute("SELECT %b", (arr,)).fetchone() == (expected,)  # type: ignore[union-attr]
        rows = c.execute("SELECT v.h, v.n FROM unnest(%b::text[], %b::bigint[]) AS v(h, n)",
                         (text_array(["a", "b"]), int8_array([5, 6]))).fetchall()
        assert rows == [("a", 5), ("b", 6)]
        # What the server or the column type refuses is a DataError, as with psycopg's own dumpers: the
        # commit's error isolation then refuses only the report that carries it.
        with pytest.raises(psycopg.DataError):
            int8_array([1, 1 << 63])
        with pytest.raises(psycopg.DataError):
            c.execute("SELECT %b", (text_array(["nul\x00inside"]),))
    finally:
        store.close()


def test_two_replicas_two_instances_of_one_host_exactly_once_and_the_newest_report_stored(pg_dsn: str) -> None:
    """The marks and the host's latest sample time are read in one statement, and the marks, the clock and
    the hosts row written in one: with two agent instances of one host (different marks rows, the same
    hosts row) each sent to both replicas at once, every (instance, sequence) is APPLIED exactly once,
    the marks count each once, the stored row is the newest report of all, and every change is followed
    in ingest-id order."""
    a, b = PgStore(pg_dsn), PgStore(pg_dsn)
    a.start()
    b.start()
    try:
        outcome: dict[tuple[str, str], dict[int, int]] = {}
        seqs = list(range(1, 121))

        def stream(store: PgStore, name: str, inst: str, offset: float) -> None:
            async def go() -> dict[int, int]:
                out: dict[int, int] = {}
                for k in range(0, len(seqs), 4):
                    part = seqs[k:k + 4]
                    res = await store.submit([_incoming("hv-x", inst, s, 1000 + 2 * s + offset) for s in part])
                    out.update({s: r.status for s, r in zip(part, res)})
                return out
            outcome[(name, inst)] = asyncio.run(go())

        threads = [threading.Thread(target=stream, args=(st, n, inst, off))
                   for n, st in (("a", a), ("b", b)) for inst, off in (("i1", 0.0), ("i2", 1.0))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for inst in ("i1", "i2"):
            for s in seqs:
                assert sorted([outcome[("a", inst)][s], outcome[("b", inst)][s]]) == [APPLIED, DUPLICATE], (inst, s)
        agents = {ag.agent_instance: ag for ag in a.load_agents()}
        assert {i: (ag.last_sequence, ag.applied_total) for i, ag in agents.items()} == {"i1": (120, 120), "i2": (120, 120)}
        (host,) = b.load_hosts()
        assert (host.agent_instance, host.sequence, host.sample_time) == ("i2", 120, 1241.0)  # the newest of all
        changes = a.reports_since(0)
        assert [ch.ingest_id for ch in changes] == sorted(ch.ingest_id for ch in changes)
    finally:
        a.close()
        b.close()


def test_the_stored_reports_summary_comes_back_with_its_result(pg_dsn: str) -> None:
    """The writer summarises the report it stores (for the summary column) and hands that summary back with
    the report's result, received at the transaction's time as in the row; ingest then puts it into the
    fleet view without summarising again. Reports superseded in the same commit carry none."""
    from eptwatch.server.fleet.state import summarise
    from eptwatch.server.ingest.validate import report_totals

    from .test_streaming import report

    store = PgStore(pg_dsn)
    store.start()
    try:
        rs = [report(s, host="hv-s", instance="s", fixture="anon-thp") for s in (1, 2, 3)]
        for k, r in enumerate(rs):
            r.sample_time.FromSeconds(2000 + k)

        async def put() -> list:  # type: ignore[type-arg]
            return await store.submit([Incoming(r, r.SerializeToString(), 0, report_totals(r)) for r in rs])

        res = asyncio.run(put())
        assert [(x.status, x.became_latest) for x in res] == [(APPLIED, True)] * 3
        assert [x.summary is None for x in res] == [True, True, False]
        (host,) = store.load_hosts()
        assert res[2].summary == summarise(rs[2], host.received, 0, report_totals(rs[2]))
        # Without totals (nothing walked the report at ingest), no summary: ingest makes it as before.
        r4 = report(4, host="hv-s", instance="s", fixture="anon-thp")
        r4.sample_time.FromSeconds(2010)

        async def put4() -> list:  # type: ignore[type-arg]
            return await store.submit([Incoming(r4, r4.SerializeToString())])

        (x4,) = asyncio.run(put4())
        assert (x4.status, x4.became_latest, x4.summary) == (APPLIED, True, None)
    finally:
        store.close()


def test_a_missing_clock_row_fails_the_commit_and_stores_nothing(pg_dsn: str) -> None:
    """The clock row is taken inside the write statement: without it nothing may be half-written (marks
    moved, host not stored); the commit fails as the database's fault and nothing is acknowledged. So on
    both ways a commit takes: the locking transaction (an agent new to the process) and the one statement
    (an agent it knows: there a division by zero fails the statement)."""
    store = PgStore(pg_dsn)
    store.start()
    try:
        assert _run_stream(store, "hv-k", "i", [1], 1) == {1: APPLIED}  # known from now on
        with psycopg.connect(pg_dsn, autocommit=True) as c:
            c.execute("DELETE FROM ingest_clock")

        async def put() -> None:
            await store.submit([_incoming("hv-c", "i", 1, 1000.0)])

        with pytest.raises(RuntimeError, match="ingest_clock row is missing"):
            asyncio.run(put())
        assert store.commit_failures_total == {DATABASE: 1}
        with pytest.raises(RuntimeError, match="ingest_clock row is missing"):
            _run_stream(store, "hv-k", "i", [2], 1)
        assert store.commit_failures_total == {DATABASE: 2}
        assert [(h.host_id, h.sequence) for h in store.load_hosts()] == [("hv-k", 1)]
        assert sorted((ag.host_id, ag.last_sequence, ag.applied_total) for ag in store.load_agents()) in (
            [("hv-k", 1, 1)], [("hv-c", 0, 0), ("hv-k", 1, 1)])
    finally:
        store.close()


class _StatementSpy:
    """The writer's connection, recording what it is asked to run (statements and transactions)."""

    def __init__(self, conn: psycopg.Connection) -> None:  # type: ignore[type-arg]
        self._conn = conn
        self.calls: list[str] = []

    def execute(self, query, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.calls.append(query.split()[0] if isinstance(query, str) else "?")
        return self._conn.execute(query, *args, **kwargs)

    def transaction(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.calls.append("BEGIN")
        return self._conn.transaction(*args, **kwargs)

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self._conn, name)


def test_a_known_agents_commit_is_one_statement_and_a_moved_mark_sends_it_the_locking_way(pg_dsn: str) -> None:
    """Once the process knows an agent's mark, its commit is one autocommitted statement (no BEGIN, no
    lock statement). When another replica moved the mark meanwhile, that statement moves nothing and
    writes nothing of the agent: the database refused the stale plan, and the locking transaction then
    answers DUPLICATE for what the other replica applied."""
    a, b = PgStore(pg_dsn), PgStore(pg_dsn)
    a.start()
    b.start()
    try:
        assert set(_run_stream(a, "hv-f", "i", [1, 2, 3], 3).values()) == {APPLIED}  # first contact: locked
        spy = _StatementSpy(a._conn)
        a._conn = spy  # type: ignore[assignment]
        assert _run_stream(a, "hv-f", "i", [4, 5], 2) == {4: APPLIED, 5: APPLIED}
        assert spy.calls == ["WITH"]  # the whole commit: marks, clock, hosts row
        assert _run_stream(a, "hv-f", "i", [5, 6], 2) == {5: DUPLICATE, 6: APPLIED}
        assert spy.calls == ["WITH", "WITH"]
        # The agent moves to b, which applies 7..9; a still holds mark 6 for it.
        assert _run_stream(b, "hv-f", "i", [6, 7, 8, 9], 4) == {6: DUPLICATE, 7: APPLIED, 8: APPLIED, 9: APPLIED}
        spy.calls.clear()
        assert _run_stream(a, "hv-f", "i", [7, 8, 9, 10], 4) == {7: DUPLICATE, 8: DUPLICATE, 9: DUPLICATE, 10: APPLIED}
        assert spy.calls[0] == "WITH" and spy.calls[1] == "BEGIN" and "SELECT" in spy.calls  # refused, then locked
        (agent,) = a.load_agents()
        assert (agent.last_sequence, agent.applied_total) == (10, 10)
        (host,) = a.load_hosts()
        assert host.sequence == 10
    finally:
        a.close()
        b.close()


def test_the_mark_cache_keeps_one_instance_per_host_and_an_old_instance_stays_exactly_once(pg_dsn: str) -> None:
    """An agent that restarts reports as a new instance: the process's cache of marks drops the host's old
    instance, so it grows with hosts, not with restarts. The old instance, should it send again, is
    judged by the database's mark: its resend is a DUPLICATE, a later report is APPLIED once."""
    st = PgStore(pg_dsn)
    st.start()
    try:
        for k in range(30):  # 30 restarts of one host's agent, each instance sending two reports
            assert _run_stream(st, "hv-r", f"i{k}", [1, 2], 1) == {1: APPLIED, 2: APPLIED}
        assert set(st._marks) == {("hv-r", "i29")}
        assert _run_stream(st, "hv-s", "j", [1], 1) == {1: APPLIED}
        assert set(st._marks) == {("hv-r", "i29"), ("hv-s", "j")}
        # i3 comes back (a restored spool, say): its resend and its next report, each once.
        assert _run_stream(st, "hv-r", "i3", [2, 3], 1) == {2: DUPLICATE, 3: APPLIED}
        assert _run_stream(st, "hv-r", "i3", [3, 4], 2) == {3: DUPLICATE, 4: APPLIED}
        assert set(st._marks) == {("hv-r", "i3"), ("hv-s", "j")}
        agents = {a.agent_instance: (a.last_sequence, a.applied_total) for a in st.load_agents() if a.host_id == "hv-r"}
        assert len(agents) == 30 and agents["i3"] == (4, 4) and agents["i29"] == (2, 2)
    finally:
        st.close()


def test_a_follower_skips_its_own_process_commits_but_not_its_departures(pg_dsn: str) -> None:
    """A process's follower is not sent the rows its own ingest wrote (its fleet view has them), and its
    cursor still moves past them; a departure its own departed log wrote is followed like any change."""
    from eptwatch.server.store.postgres import PgDepartedLog

    a, b = PgStore(pg_dsn), PgStore(pg_dsn)
    a.start()
    b.start()
    try:
        _run_stream(a, "h-a", "i", [1], 1)
        _run_stream(b, "h-b", "i", [1], 1)
        _run_stream(a, "h-c", "i", [1], 1)
        changes, last, full = a.follow_page(0, None, 10, a.writer_id)
        assert [ch.host_id for ch in changes] == ["h-b"] and not full
        assert last is not None and last[1] == "h-c"  # the page's last row is a's own: the cursor passes it
        assert a.follow_page(last[0], last[1], 10, a.writer_id) == ([], None, False)
        assert [ch.host_id for ch in a.follow_page(0, None, 2, a.writer_id)[0]] == ["h-b"]
        assert {ch.host_id for ch in a.reports_since(0)} == {"h-a", "h-b", "h-c"}  # without a writer: all
        PgDepartedLog(a).write([("h-a", 50.0)])
        changes, _, _ = a.follow_page(last[0], last[1], 10, a.writer_id)
        assert [(ch.host_id, ch.departed_at) for ch in changes] == [("h-a", 50.0)]
    finally:
        a.close()
        b.close()


def test_the_follower_asks_for_the_export_lease_once_per_renewal_period_not_every_poll(pg_dsn: str,
                                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from eptwatch.server.fleet import follow
    from eptwatch.server.fleet.state import FleetState

    store = PgStore(pg_dsn)
    try:
        asked: list[str] = []
        real = store.hold_lease
        monkeypatch.setattr(store, "hold_lease", lambda *a: asked.append(a[1]) or real(*a))
        now = [1000.0]
        monkeypatch.setattr(follow.time, "monotonic", lambda: now[0])
        f = follow.StoreFollower(store, FleetState())
        f.poll_and_renew()
        assert len(asked) == 1 and f.exports_fleet()
        now[0] += follow.FLEET_EXPORT_LEASE_RENEW_SECONDS / 2
        f.poll_and_renew()
        assert len(asked) == 1 and f.exports_fleet()  # polled, the lease not asked for again yet
        now[0] += follow.FLEET_EXPORT_LEASE_RENEW_SECONDS / 2
        f.poll_and_renew()
        assert len(asked) == 2 and f.exports_fleet()
        # Renewed at least every RENEW + a poll interval, inside the holder's local validity (TTL / 2).
        assert follow.FLEET_EXPORT_LEASE_RENEW_SECONDS + follow.FOLLOW_INTERVAL_SECONDS < follow.FLEET_EXPORT_LEASE_TTL_SECONDS / 2
    finally:
        store.close()


def test_one_group_mixing_known_moved_and_new_agents_gets_each_report_its_own_result(pg_dsn: str) -> None:
    """One message carrying an agent whose mark another replica moved (its one-statement commit is
    refused), an agent the process knows (the statement decides it) and an agent new to the process (the
    locking transaction): every report's result is its own, in the message's order."""
    a, b = PgStore(pg_dsn), PgStore(pg_dsn)
    b.start()
    try:
        a._commit([[_incoming("hv-x", "i", s, 1000 + s) for s in range(1, 21)], [_incoming("hv-z", "i", 5, 1005)]])
        assert _run_stream(b, "hv-x", "i", list(range(18, 26)), 8)[25] == APPLIED  # hv-x's mark is now 25, a knows 20
        (res,) = a._commit([[_incoming("hv-x", "i", 23, 1023), _incoming("hv-z", "i", 5, 1005), _incoming("hv-y", "i", 1, 1001),
                             _incoming("hv-z", "i", 6, 1006), _incoming("hv-x", "i", 26, 1026)]])
        assert [(r.status, r.high_water_sequence) for r in res] == [(DUPLICATE, 25), (DUPLICATE, 5), (APPLIED, 0), (APPLIED, 0),
                                                                    (APPLIED, 0)]
        assert {(ag.host_id, ag.last_sequence, ag.applied_total) for ag in a.load_agents()} == {
            ("hv-x", 26, 26), ("hv-z", 6, 2), ("hv-y", 1, 1)}
        assert {h.host_id: h.sequence for h in a.load_hosts()} == {"hv-x": 26, "hv-z": 6, "hv-y": 1}
    finally:
        a.close()
        b.close()
