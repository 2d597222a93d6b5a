"""Adversarial tests of the aggregator's read side: stored reports no check would pass, hosts that
departed before a restart, out-of-range query parameters, and HTTP peers that connect and say nothing.

Every read path (GetFleet, /api/v1/fleet, /api/v1/hosts, the page, /metrics) must answer whatever the
store holds; one absurd report costs only its own host, shown invalid with the problem named."""

from __future__ import annotations

import asyncio
import json
import socket
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from eptwatch.agent.report.host_report import message_to_dict
from eptwatch.common.httpserve import HttpServer
from eptwatch.server.faces.page import render_fleet_page
from eptwatch.server.faces.query import MAX_LIMIT, QueryError, fleet_pb, list_hosts, rollup_pb
from eptwatch.server.fleet.state import (
    MAX_HOST_HUGE_2M,
    FleetConfig,
    FleetState,
    Rollup,
    build_view,
    summarise,
)
from eptwatch.server.store.sqlite import DepartedLog, Store
from eptwatch.v1 import ingest_pb2, ingest_pb2_grpc, query_pb2, query_pb2_grpc
from eptwatch.v1 import report_pb2 as pb

from .conftest import sampled_report_bytes
from .fuzzing import fuzz_settings
from .procs import Aggregator, http_fetch

INSECURE = ["--insecure-plaintext", "--insecure-no-auth"]
U64_MAX = (1 << 64) - 1


def report(host: str, seq: int = 1, instance: str = "inst-1", sample_time: float | None = None) -> pb.HostReport:
    r = pb.HostReport.FromString(sampled_report_bytes("linux-5.3-unfixed"))
    r.host_id, r.sequence, r.agent_instance = host, seq, instance
    r.sample_time.FromNanoseconds(int((time.time() if sample_time is None else sample_time) * 1e9))
    return r


def absurd(host: str) -> pb.HostReport:
    """Self-consistent but impossible: a capacity of 2^64-1 huge pages on one VM (lost = capacity -
    observed, the breakdown sums to it, the ratio is in [0, 1]), so the report's own checks pass."""
    r = report(host)
    e = r.estimates[0]
    e.host_huge_capacity_2m = U64_MAX
    e.lost_huge_2m = U64_MAX - e.observed_huge_2m
    del e.breakdown[1:]
    e.breakdown[0].lost_huge_2m = e.lost_huge_2m
    e.lost_ratio = e.lost_huge_2m / U64_MAX
    return r


def wait_for(cond: Callable[[], object], timeout: float = 30.0) -> None:
    """Polls for a state (a bound against hanging, not a speed requirement)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise TimeoutError(f"condition not met in {timeout} s")


def get_json(agg: Aggregator, path: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    code, body = http_fetch(agg.http + path)
    return code, json.loads(body)


# --- pure read side: summaries and views of reports no check would pass ---

def test_absurd_totals_make_only_that_host_invalid_and_every_view_still_renders() -> None:
    now = time.time()
    state = FleetState(FleetConfig(stale_after_seconds=60), clock=lambda: now, max_view_age=0)
    state.put(summarise(report("hv-good"), now))
    bad = summarise(absurd("hv-bad"), now)
    # The report checks (the same the ingest path runs) name the field and the bound it broke.
    assert "host_huge_capacity_2m 18446744073709551615 exceeds" in bad.problem
    assert bad.capacity_2m == bad.lost_2m == 0  # nothing absurd is carried further
    state.put(bad)
    v = state.view()
    assert set(v.fresh) == {"hv-good"} and set(v.invalid) == {"hv-bad"}
    assert v.total.hosts == 1 and v.total.capacity_2m == 283  # the sums hold the good host only
    msg = fleet_pb(v)
    assert msg.hosts_invalid == 1
    assert message_to_dict(msg)["hosts_invalid"] == "1"
    page = render_fleet_page(v, now=now)
    assert "hv-bad" in page and "capacity_2m 18446744073709551615" in page and '<span id="invalid">1 invalid' in page
    listed = list_hosts(v, query_pb2.ListHostsRequest(status="invalid")).hosts
    assert [(h.host_id, h.status) for h in listed] == [("hv-bad", "invalid")] and "capacity_2m" in listed[0].problem
    # A valid report from the same host makes it fresh and counted again.
    state.put(summarise(report("hv-bad", seq=2), now))
    v = state.view()
    assert set(v.fresh) == {"hv-good", "hv-bad"} and not v.invalid and v.total.hosts == 2


@pytest.mark.parametrize("spoil, needle", [
    (lambda r: setattr(r.estimates[0], "cause", 99), "cannot evaluate the report"),  # the totals walk refuses it
    (lambda r: setattr(r.sample_time, "seconds", 10**15), "sample_time"),  # beyond year 9999: no JSON form
    (lambda r: r.estimates[0].breakdown[0].__setattr__("lost_huge_2m", 7), "cannot evaluate the report"),
])
def test_a_report_that_cannot_be_evaluated_names_its_problem(spoil: Callable[[pb.HostReport], object], needle: str) -> None:
    r = report("hv-x")
    spoil(r)
    h = summarise(r, time.time())
    assert needle in h.problem
    v = build_view([h], set(), time.time(), FleetConfig())
    assert set(v.invalid) == {"hv-x"} and not v.fresh
    message_to_dict(fleet_pb(v))  # the whole view is sayable as JSON
    message_to_dict(list_hosts(v, query_pb2.ListHostsRequest(status="all")))


def test_every_host_is_in_exactly_one_state() -> None:
    now = [1000.0]
    state = FleetState(FleetConfig(stale_after_seconds=60), clock=lambda: now[0], max_view_age=0)
    state.put(summarise(report("fresh"), 1000.0))
    state.put(summarise(report("stale"), 900.0))
    state.put(summarise(report("gone"), 1000.0))
    state.put(summarise(absurd("broken"), 1000.0))
    state.put(summarise(absurd("broken-and-gone"), 1000.0))
    for h in ("gone", "broken-and-gone"):
        state.stream_carries(h)
        state.stream_ended([h], clean=True)
    v = state.view()
    pools = {"fresh": v.fresh, "stale": v.stale, "departed": v.departed, "invalid": v.invalid}
    assert {k: sorted(p) for k, p in pools.items()} == {"fresh": ["fresh"], "stale": ["stale"],
                                                       "departed": ["broken-and-gone", "gone"], "invalid": ["broken"]}
    everyone = list_hosts(v, query_pb2.ListHostsRequest(status="all")).hosts
    assert sorted((h.host_id, h.status) for h in everyone) == [
        ("broken", "invalid"), ("broken-and-gone", "departed"), ("fresh", "fresh"), ("gone", "departed"), ("stale", "stale")]
    assert [h.stale for h in everyone if h.host_id == "stale"] == [True]
    f = fleet_pb(v)
    assert (f.total.hosts, f.hosts_stale, f.hosts_departed, f.hosts_invalid) == (1, 1, 2, 1)


def _every_read_path(reports: list[pb.HostReport]) -> None:
    """What each read path does with these reports as the stored latest ones: none may raise, and each
    host is either counted within the bounds or invalid with its problem named."""
    now = time.time()
    state = FleetState(FleetConfig(), clock=lambda: now, max_view_age=0)
    for r in reports:
        state.put(summarise(r, now, spool_dropped_total=U64_MAX))
    v = state.view()
    for h in v.fresh.values():
        assert not h.problem and 0 <= h.lost_2m <= h.capacity_2m <= MAX_HOST_HUGE_2M
    assert all(h.problem for h in v.invalid.values())
    message_to_dict(fleet_pb(v))
    for status in ("all", "fresh", "invalid"):
        message_to_dict(list_hosts(v, query_pb2.ListHostsRequest(status=status)))
    render_fleet_page(v, now=now)


U64 = st.integers(min_value=0, max_value=U64_MAX)


@pytest.mark.fuzz
@fuzz_settings(200)
@given(cap=U64, obs=U64, lost=U64, share=U64, allowed=U64, cause=st.integers(0, 2**31 - 1),
       seconds=st.integers(-(2**63), 2**63 - 1), nanos=st.integers(0, 999_999_999))
def test_no_stored_numbers_make_a_read_path_fail(cap: int, obs: int, lost: int, share: int, allowed: int, cause: int,
                                                 seconds: int, nanos: int) -> None:
    r = report("hv-fuzz")
    e = r.estimates[0]
    e.host_huge_capacity_2m, e.observed_huge_2m, e.lost_huge_2m, e.allowed_huge_2m = cap, obs, lost, allowed
    e.breakdown[0].lost_huge_2m = share
    e.cause = cause  # type: ignore[assignment]
    r.sample_time.seconds, r.sample_time.nanos = seconds, nanos
    _every_read_path([report("hv-good"), r])


@pytest.mark.fuzz
@fuzz_settings(200)
@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=8))
def test_no_mutated_stored_report_makes_a_read_path_fail(flips: list[tuple[int, int]]) -> None:
    data = bytearray(report("hv-mutant").SerializeToString())
    for at, byte in flips:
        data[at % len(data)] = byte
    try:
        r = pb.HostReport.FromString(bytes(data))
    except Exception:  # noqa: BLE001 - bytes that do not decode are the store loader's case (tested above)
        return
    _every_read_path([report("hv-good"), r])


def test_rollups_beyond_uint64_are_clamped_not_raised() -> None:
    msg = rollup_pb(Rollup(hosts=1, capacity_2m=1 << 70, lost_2m=1 << 69))
    assert msg.host_huge_capacity_2m == U64_MAX and msg.lost_huge_2m == U64_MAX


def test_departures_are_told_and_a_return_is_told_once() -> None:
    told: list[tuple[str, float | None]] = []
    state = FleetState(FleetConfig(), clock=lambda: 5.0, on_departed=lambda h, at: told.append((h, at)))
    state.put(summarise(report("hv-1"), 5.0))
    state.stream_carries("hv-1")
    state.stream_ended(["hv-1"], clean=True)
    state.put(summarise(report("hv-1", seq=2), 5.0))  # back: told once ...
    state.put(summarise(report("hv-1", seq=3), 5.0))  # ... and then ingest costs no further call
    state.stream_carries("hv-2")
    state.stream_ended(["hv-2"], clean=False)  # a broken stream is not a departure
    assert told == [("hv-1", 5.0), ("hv-1", None)]


def test_departed_log_writes_in_order_and_survives_reopening(tmp_path: Path) -> None:
    store = Store(tmp_path)
    log = DepartedLog(store.path)
    log.start()
    for host, at in (("a", 1.0), ("b", 2.0), ("a", None), ("c", 3.0), ("c", 4.0)):
        log.record(host, at)
    log.close()
    store.close()
    again = DepartedLog(Store(tmp_path).path)
    assert again.load() == {"b": 2.0, "c": 4.0}
    again.close()


@pytest.mark.parametrize("field, value, needle", [
    ("limit", MAX_LIMIT + 1, "limit"), ("status", "maybe", "status"), ("kernel_release", "k" * 300, "kernel"),
    ("cause", "c" * 300, "cause"),
])
def test_list_hosts_refuses_out_of_range_requests(field: str, value: object, needle: str) -> None:
    v = build_view([], set(), 0.0, FleetConfig())
    with pytest.raises(QueryError, match=needle):
        list_hosts(v, query_pb2.ListHostsRequest(**{field: value}))


# --- a real aggregator whose store holds an absurd report, written straight into SQLite ---

@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    d = tmp_path_factory.mktemp("seeded")
    store = Store(d / "state")  # creates the schema; the rows below bypass every ingest check
    now = time.time()
    rows = [(r.host_id, r.agent_instance, r.sequence, now, now, r.SerializeToString())
            for r in (report("hv-good"), absurd("hv-absurd"))]
    rows.append(("hv-corrupt", "inst-1", 1, now, now, b"\xff\xff\xff not a report"))
    c = sqlite3.connect(store.path)
    c.executemany("INSERT INTO hosts VALUES (?, ?, ?, ?, ?, ?)", rows)
    c.commit()
    c.close()
    store.close()
    (d / "server.yaml").write_text("http_idle_timeout_seconds: 0.5\nhttp_max_connections: 128\n")
    agg = Aggregator(d, [*INSECURE, "--config", str(d / "server.yaml")]).start()
    yield agg
    agg.proc.kill9()  # type: ignore[union-attr]


def test_stored_absurd_report_leaves_fleet_answering_with_the_host_invalid(seeded: Aggregator) -> None:
    code, fleet = get_json(seeded, "/api/v1/fleet")
    assert code == 200 and fleet["hosts_invalid"] == "2" and fleet["total"]["hosts"] == "1"
    assert fleet["total"]["host_huge_capacity_2m"] == "283"
    code, hosts = get_json(seeded, "/api/v1/hosts?status=invalid")
    problems = {h["host_id"]: h["problem"] for h in hosts["hosts"]}
    assert code == 200 and set(problems) == {"hv-absurd", "hv-corrupt"}
    assert "host_huge_capacity_2m 18446744073709551615 exceeds" in problems["hv-absurd"]
    assert problems["hv-corrupt"].startswith("stored report does not decode")
    for host in ("hv-absurd", "hv-corrupt"):
        code, detail = get_json(seeded, f"/api/v1/hosts/{host}")
        assert code == 200 and detail["summary"]["status"] == "invalid" and detail["summary"]["problem"], detail
    code, page = http_fetch(seeded.http + "/")
    assert code == 200 and b"hv-absurd" in page and b"hv-corrupt" in page and b"2 invalid" in page
    code, metrics = http_fetch(seeded.http + "/metrics")
    samples = {s.name: s.value for f in text_string_to_metric_families(metrics.decode()) for s in f.samples}
    assert samples["eptwatch_fleet_hosts_invalid"] == 2 and samples["eptwatch_fleet_hosts"] == 1

    async def grpc_fleet() -> query_pb2.FleetSummary:
        async with grpc.aio.insecure_channel(seeded.target) as ch:
            return await query_pb2_grpc.QueryStub(ch).GetFleet(query_pb2.GetFleetRequest(), timeout=15)

    f = asyncio.run(grpc_fleet())
    assert f.hosts_invalid == 2 and f.total.hosts == 1


@pytest.mark.parametrize("path, needle", [
    ("/api/v1/hosts?limit=99999999999999999999999", "limit"),
    ("/api/v1/hosts?limit=10001", "limit"),
    ("/api/v1/hosts?limit=-1", "limit"),
    ("/api/v1/hosts?limit=%C2%B2", "limit"),  # "²": a digit to str.isdigit(), not to int()
    ("/api/v1/hosts?limit=1e3", "limit"),
    ("/api/v1/hosts?offset=99999999999999999999999", "offset"),
    ("/api/v1/hosts?offset=4294967296", "offset"),
    ("/api/v1/hosts?offset=-3", "offset"),
    ("/api/v1/hosts?status=everything", "status"),
    ("/api/v1/hosts?kernel=" + "k" * 300, "kernel"),
    ("/api/v1/hosts?cause=" + "c" * 300, "cause"),
    ("/api/v1/hosts?label=" + "a=" + "b" * 300, "label"),
    ("/api/v1/hosts?" + "&".join(f"label=k{i}=v" for i in range(65)), "label"),
    ("/api/v1/hosts?limt=5", "limt"),  # misspelt: refused, not ignored
    ("/api/v1/kernels?era=" + "e" * 300, "era"),
    ("/api/v1/kernels?verdict=" + "v" * 300, "verdict"),
    ("/api/v1/fleet?status=stale", "status"),
    ("/api/v1/hosts/hv-good?limit=1", "limit"),
])
def test_every_query_parameter_out_of_range_is_400_naming_it(seeded: Aggregator, path: str, needle: str) -> None:
    code, body = get_json(seeded, path)
    assert code == 400 and body["error"].startswith(needle), body


@pytest.mark.parametrize("request_, needle", [
    (query_pb2.ListHostsRequest(limit=10001), "limit"),
    (query_pb2.ListHostsRequest(limit=4294967295), "limit"),
    (query_pb2.ListHostsRequest(kernel_release="k" * 300), "kernel"),
    (query_pb2.ListHostsRequest(labels=[f"k{i}=v" for i in range(65)]), "label"),
    (query_pb2.ListHostsRequest(status="everything"), "status"),
])
def test_grpc_query_out_of_range_is_invalid_argument(seeded: Aggregator, request_: query_pb2.ListHostsRequest, needle: str) -> None:
    async def call() -> None:
        async with grpc.aio.insecure_channel(seeded.target) as ch:
            await query_pb2_grpc.QueryStub(ch).ListHosts(request_, timeout=15)

    with pytest.raises(grpc.aio.AioRpcError) as info:
        asyncio.run(call())
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and (info.value.details() or "").startswith(needle)


def read_until_closed(s: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (b"" read). The socket timeout only
    guards against a hang: a server that never closes fails the test by raising here."""
    got = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            return got
        got += chunk


def test_200_silent_connections_are_closed_by_the_aggregator(seeded: Aggregator) -> None:
    socks = [socket.create_connection(("127.0.0.1", seeded.http_port), timeout=60) for _ in range(200)]
    try:
        answers = [read_until_closed(s) for s in socks]  # none of them ever sends a byte
    finally:
        for s in socks:
            s.close()
    # Each was closed by the server: silent ones after the idle timeout (nothing sent), those beyond the
    # connection cap at once with a 503.
    assert all(a == b"" or a.startswith(b"HTTP/1.0 503") for a in answers)
    code, metrics = http_fetch(seeded.http + "/metrics")
    assert code == 200
    samples = {s.name: s.value for f in text_string_to_metric_families(metrics.decode()) for s in f.samples}
    # Every one of the 200 was either timed out or refused (the scrape itself is the one open now).
    assert samples["eptwatch_server_http_connections_timed_out_total"] + samples["eptwatch_server_http_connections_refused_total"] >= 200


# --- the HTTP server itself: idle timeout and connection cap, counted ---

def _route(path: str, query: dict[str, list[str]]) -> tuple[int, str, bytes]:
    return 200, "text/plain", b"ok\n"


def test_idle_connections_are_timed_out_and_threads_never_exceed_the_cap() -> None:
    srv = HttpServer("127.0.0.1:0", _route, idle_timeout_seconds=0.3, max_connections=16)
    srv.start()
    try:
        socks = [socket.create_connection(("127.0.0.1", srv.port), timeout=60) for _ in range(200)]
        try:
            answers = [read_until_closed(s) for s in socks]
        finally:
            for s in socks:
                s.close()
        httpd = srv.httpd
        wait_for(lambda: httpd.connections_active == 0)
        refused = sum(a.startswith(b"HTTP/1.0 503") for a in answers)
        silent = sum(a == b"" for a in answers)
        assert refused + silent == 200
        assert httpd.connections_refused_total == refused
        assert httpd.connections_timed_out_total == silent  # every silent one was closed by the idle timeout
        assert httpd.connections_peak <= 16
    finally:
        srv.stop()


def test_past_the_cap_a_connection_gets_503_and_the_server_recovers() -> None:
    srv = HttpServer("127.0.0.1:0", _route, idle_timeout_seconds=600, max_connections=4)
    srv.start()
    try:
        held = [socket.create_connection(("127.0.0.1", srv.port), timeout=60) for _ in range(4)]
        wait_for(lambda: srv.httpd.connections_active == 4)
        with socket.create_connection(("127.0.0.1", srv.port), timeout=60) as extra:
            answer = read_until_closed(extra)
        assert answer.startswith(b"HTTP/1.0 503") and answer.endswith(b"busy\n")
        assert srv.httpd.connections_refused_total == 1
        for s in held:
            s.close()  # the held ones end: their threads return and free their slots
        wait_for(lambda: srv.httpd.connections_active == 0)
        code, body = http_fetch(f"http://127.0.0.1:{srv.port}/")
        assert (code, body) == (200, b"ok\n")
    finally:
        srv.stop()


# --- departed: survives a restart, visible in the API, gRPC and the page ---

async def _send(target: str, messages: list[ingest_pb2.AgentMessage]) -> list[ingest_pb2.ServerMessage]:
    async with grpc.aio.insecure_channel(target) as ch:
        call = ingest_pb2_grpc.IngestStub(ch).Stream(timeout=15)
        out = []
        for m in messages:
            await call.write(m)
            out.append(await call.read())
        await call.done_writing()
        while (m := await call.read()) is not grpc.aio.EOF:  # until the server ends the stream
            out.append(m)
        assert await call.code() == grpc.StatusCode.OK  # an ended stream, not a broken one
        return out


def _departed_rows(agg: Aggregator) -> dict[str, float]:
    c = sqlite3.connect(agg.workdir / "state" / "eptwatch.sqlite3")
    try:
        return dict(c.execute("SELECT host_id, departed_at FROM departed").fetchall())
    except sqlite3.OperationalError:
        return {}
    finally:
        c.close()


def test_departed_host_survives_a_restart_and_is_visible(tmp_path: Path) -> None:
    agg = Aggregator(tmp_path, INSECURE).start()
    try:
        for host in ("hv-stays", "hv-leaves"):
            msg = ingest_pb2.AgentMessage(reports=[report(host)], departing=host == "hv-leaves")
            (reply,) = asyncio.run(_send(agg.target, [msg]))
            assert reply.acks[0].status == ingest_pb2.ACK_STATUS_APPLIED
        wait_for(lambda: "hv-leaves" in _departed_rows(agg))
        wait_for(lambda: get_json(agg, "/api/v1/hosts/hv-leaves")[1]["summary"]["status"] == "departed")  # views are cached 1 s
        agg.proc.kill9()  # type: ignore[union-attr]  # no clean shutdown: what is durable must come back
        agg.start()

        code, detail = get_json(agg, "/api/v1/hosts/hv-leaves")
        assert code == 200 and detail["summary"]["status"] == "departed"
        assert detail["latest_report"]["host_id"] == "hv-leaves"
        every = {h["host_id"]: h["status"] for h in get_json(agg, "/api/v1/hosts?status=all")[1]["hosts"]}
        assert every == {"hv-stays": "fresh", "hv-leaves": "departed"}
        assert [h["host_id"] for h in get_json(agg, "/api/v1/hosts")[1]["hosts"]] == ["hv-stays"]
        fleet = get_json(agg, "/api/v1/fleet")[1]
        assert fleet["hosts_departed"] == "1" and fleet["total"]["hosts"] == "1"
        code, page = http_fetch(agg.http + "/")
        assert b'<span id="departed">1 departed' in page and b'<a href="/hosts/hv-leaves">hv-leaves</a></td><td>departed</td>' in page
        code, metrics = http_fetch(agg.http + "/metrics")
        assert b"eptwatch_fleet_hosts_departed 1.0" in metrics

        async def grpc_departed() -> list[str]:
            async with grpc.aio.insecure_channel(agg.target) as ch:
                got = await query_pb2_grpc.QueryStub(ch).ListHosts(query_pb2.ListHostsRequest(status="departed"), timeout=15)
                return [f"{h.host_id}:{h.status}" for h in got.hosts]

        assert asyncio.run(grpc_departed()) == ["hv-leaves:departed"]

        # It reports again: fresh, and no longer recorded as departed.
        (reply,) = asyncio.run(_send(agg.target, [ingest_pb2.AgentMessage(reports=[report("hv-leaves", instance="inst-2")])]))
        assert reply.acks[0].status == ingest_pb2.ACK_STATUS_APPLIED
        wait_for(lambda: "hv-leaves" not in _departed_rows(agg))
        wait_for(lambda: get_json(agg, "/api/v1/hosts/hv-leaves")[1]["summary"]["status"] == "fresh")
    finally:
        agg.proc.kill9()  # type: ignore[union-attr]
