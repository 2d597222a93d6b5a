"""The ingest wire as a hostile or broken agent sees it (issue 11): every integer that reaches storage
is bounded, an absurd but self-consistent report is refused by name, undecodable bytes cost only their
stream, one tenant's unstorable report costs only its own ack, a full disk ends streams UNAVAILABLE
with nothing acknowledged, and a DUPLICATE ack tells the agent the high-water mark.

Against a real gRPC server on loopback: the aggregator process (tests/procs.py), or, where the test
must hold the store's writer until two tenants' messages are queued, an in-process grpc.aio server.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from eptwatch.server.fleet.state import FleetState
from eptwatch.server.ingest import validate
from eptwatch.server.ingest.auth import TokenTable, hash_token
from eptwatch.server.ingest.servicer import IngestServicer, Received, Undecodable, decode_agent_message
from eptwatch.server.ingest.validate import (
    MAX_GUEST_RAM_BYTES,
    MAX_HUGE_2M,
    MAX_STORED_INTEGER,
    ReportTotals,
    check_report,
)
from eptwatch.server.store.commit import StoreError
from eptwatch.server.store.sqlite import Store
from eptwatch.v1 import ingest_pb2, ingest_pb2_grpc
from eptwatch.v1 import report_pb2 as pb

from .conftest import sampled_report_bytes
from .fuzzing import fuzz_settings
from .procs import Aggregator, env_without_proxy, http_fetch, http_get

INSECURE = ["--insecure-plaintext", "--insecure-no-auth"]
GIB = 2**30
STREAM_METHOD = "/eptwatch.v1.Ingest/Stream"


def report(seq: int, host: str = "hv-a-1", instance: str = "inst-1", fixture: str = "linux-5.3-unfixed") -> pb.HostReport:
    r = pb.HostReport.FromString(sampled_report_bytes(fixture))
    r.sequence, r.agent_instance, r.host_id = seq, instance, host
    r.sample_time.FromNanoseconds(time.time_ns())
    return r


def absurd_capacity(r: pb.HostReport) -> pb.HostReport:
    """Capacity 2^64-1 on an 8 GiB VM, every other rule kept: lost = capacity - observed, the
    breakdown sums to it, the ratio is in [0, 1]. Self-consistent, and cannot be."""
    r.vms[0].guest_ram_bytes = 8 * GIB
    e = next(e for e in r.estimates if e.vm_id == r.vms[0].vm_id)
    e.host_huge_capacity_2m = 2**64 - 1
    e.observed_huge_2m = 12
    e.allowed_huge_2m = 0
    e.lost_huge_2m = 2**64 - 1 - 12
    e.lost_ratio = 1.0
    del e.breakdown[:]
    e.breakdown.add(cause=pb.CAUSE_KNOWN_PAGE_CACHE_THP_BUG, lost_huge_2m=2**64 - 1 - 12)
    return r


def implausible(r: pb.HostReport) -> pb.HostReport:
    """What the agent sends for readings that contradict each other: cause IMPLAUSIBLE, no loss figure."""
    e = r.estimates[0]
    e.host_huge_capacity_2m = 2**64 - 1
    e.observed_huge_2m = 2**64 - 1
    e.cause = pb.CAUSE_IMPLAUSIBLE
    for name in ("lost_huge_2m", "lost_ratio", "allowed_huge_2m"):
        e.ClearField(name)
    del e.breakdown[:]
    return r


# --- the checks, pure ------------------------------------------------------------------------------
# (the clock is read per check: reports are stamped when built, and a module-level "now" taken at
# collection lags a long session's later tests by more than the allowed clock skew)


def _both(r: pb.HostReport) -> ReportTotals | str:
    """check_report in Python and, where built, with the compiled walk over the report's bytes: they agree."""
    wire = r.SerializeToString()
    now = time.time()
    with mock.patch.object(validate, "_walk_wire", None):
        python = check_report(r, now)
    compiled = check_report(r, now, (wire, 0, len(wire)))
    assert compiled == python
    return python


@pytest.mark.parametrize("mutate, needle", [
    (lambda r: setattr(r, "sequence", 2**63), "sequence 9223372036854775808: expected at most 9223372036854775807"),
    (lambda r: setattr(r, "sequence", 2**64 - 1), "sequence"),
    (absurd_capacity, "host_huge_capacity_2m 18446744073709551615 exceeds"),
    (lambda r: setattr(r.vms[0], "guest_ram_bytes", MAX_GUEST_RAM_BYTES + 1), "guest_ram_bytes"),
    (lambda r: setattr(r.estimates[0], "observed_huge_2m", MAX_HUGE_2M + 1), "observed_huge_2m"),
    # Within the 2 MiB bound but beyond this 4 GiB VM's RAM (2048 x 2 MiB), consistent otherwise.
    (lambda r: (setattr(r.estimates[0], "host_huge_capacity_2m", 2049 + 12), setattr(r.estimates[0], "lost_huge_2m", 2049),
                setattr(r.estimates[0].breakdown[0], "lost_huge_2m", 2049)), "exceeds the guest RAM of VM"),
])
def test_absurd_reports_are_refused_by_name(mutate: Callable[[pb.HostReport], object], needle: str) -> None:
    r = report(1)
    mutate(r)
    got = _both(r)
    assert isinstance(got, str) and needle in got, got


def test_the_bounds_themselves_pass_and_implausible_readings_are_data() -> None:
    r = report(MAX_STORED_INTEGER)
    r.vms[0].guest_ram_bytes = 8 * GIB
    e = r.estimates[0]
    e.host_huge_capacity_2m, e.observed_huge_2m = 4096, 0  # 8 GiB in 2 MiB units: the bound, met
    e.lost_huge_2m = e.breakdown[0].lost_huge_2m = 4096
    e.ClearField("lost_ratio")
    assert isinstance(_both(r), ReportTotals)
    e.host_huge_capacity_2m = e.lost_huge_2m = e.breakdown[0].lost_huge_2m = 4097
    assert isinstance(_both(r), str)
    # No RAM figure (0: not measured): only the 2 MiB bound applies.
    r.vms[0].guest_ram_bytes = 0
    assert isinstance(_both(r), ReportTotals)
    got = _both(implausible(report(1)))
    assert isinstance(got, ReportTotals) and got.capacity_2m == 0 and dict(got.causes) == {pb.CAUSE_IMPLAUSIBLE: 1}
    # IMPLAUSIBLE with a loss figure enters the sums: then the bounds apply.
    r = implausible(report(1))
    r.estimates[0].lost_huge_2m = 0
    assert isinstance(_both(r), str)
    assert validate.check_spool_dropped(MAX_STORED_INTEGER) is None
    assert "spool_dropped_total" in (validate.check_spool_dropped(2**63) or "")


# --- property fuzz: unbounded integers and mutated bytes --------------------------------------------

_EDGES = [0, 1, 2048, 2049, MAX_HUGE_2M, MAX_HUGE_2M + 1, MAX_GUEST_RAM_BYTES, MAX_GUEST_RAM_BYTES + 1,
          MAX_STORED_INTEGER, 2**63, 2**64 - 1, 2**64, 2**70, -1]
_ints = st.one_of(st.sampled_from(_EDGES), st.integers(min_value=0, max_value=2**64 - 1), st.integers())
_SETTERS: list[Callable[[pb.HostReport, int], None]] = [
    lambda r, v: setattr(r, "sequence", v),
    lambda r, v: setattr(r.vms[0], "guest_ram_bytes", v),
    lambda r, v: setattr(r.vms[-1], "guest_ram_bytes", v),
    lambda r, v: setattr(r.estimates[0], "host_huge_capacity_2m", v),
    lambda r, v: setattr(r.estimates[-1], "observed_huge_2m", v),
    lambda r, v: setattr(r.estimates[0], "allowed_huge_2m", v),
    lambda r, v: setattr(r.estimates[-1], "lost_huge_2m", v),
    lambda r, v: setattr(r.estimates[0].breakdown[0], "lost_huge_2m", v),
    lambda r, v: setattr(r.estimates[0], "cause", v),
    lambda r, v: setattr(r.host_estimate, "host_huge_capacity_2m", v),
    lambda r, v: setattr(r.vms[0], "vm_id", r.vms[-1].vm_id),  # duplicate ids
    lambda r, v: setattr(r.estimates[0], "vm_id", str(v)),  # an estimate of no VM
]


@pytest.mark.fuzz
@fuzz_settings(300)
@given(st.sampled_from(["linux-5.3-unfixed", "linux-6.6-pages2m"]),
       st.lists(st.tuples(st.integers(0, len(_SETTERS) - 1), _ints), min_size=1, max_size=5),
       st.sampled_from([None, pb.CAUSE_IMPLAUSIBLE, pb.CAUSE_HEALTHY]))
def test_report_checks_with_unbounded_integers(fixture: str, edits: list[tuple[int, int]], cause: int | None) -> None:
    """Whatever integers an agent puts in a report: the Python and compiled checks agree, nothing
    raises, and what is accepted is within every bound (so storage and the read side can hold it)."""
    r = report(1, fixture=fixture)
    if cause is not None:
        r.estimates[0].cause = cause  # type: ignore[assignment]
    for which, value in edits:
        try:
            _SETTERS[which](r, value)
        except (ValueError, TypeError):  # protobuf's own refusal: no such value can be on the wire
            continue
    got = _both(r)
    if isinstance(got, str):
        return
    assert 1 <= r.sequence <= MAX_STORED_INTEGER
    assert all(vm.guest_ram_bytes <= MAX_GUEST_RAM_BYTES for vm in r.vms)
    assert 0 <= got.lost_2m <= got.capacity_2m <= validate.MAX_VMS * MAX_HUGE_2M
    assert got.observed_2m <= validate.MAX_VMS * MAX_HUGE_2M


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(number: int, wire_type: int, body: bytes) -> bytes:
    return _varint(number << 3 | wire_type) + (_varint(len(body)) + body if wire_type == 2 else body)


@pytest.mark.fuzz
@fuzz_settings(300)
@given(st.data())
def test_vm_ids_and_guest_ram_in_odd_encodings(data: st.DataObject) -> None:
    """Extra VMs and estimates appended as raw bytes: repeated vm_id/guest_ram_bytes fields (the last
    one wins), wrong wire types (kept as unknown fields by the runtime), varints of any size. The
    compiled walk answers as Python does, or leaves it to Python."""
    r = report(1, fixture="linux-6.6-pages2m")
    r.sample_time.FromSeconds(int(time.time()))
    base = r.SerializeToString()
    ids = [b"a", b"b", r.vms[0].vm_id.encode()]
    vm = b""
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["id", "ram", "ram-wrong-type", "id-wrong-type"]))
        if kind == "id":
            vm += _field(1, 2, data.draw(st.sampled_from(ids)))
        elif kind == "ram":
            vm += _field(10, 0, _varint(data.draw(st.one_of(st.sampled_from(_EDGES[:-1]), st.integers(0, 2**80)))))
        elif kind == "ram-wrong-type":
            vm += _field(10, 1, b"\xff" * 8)
        else:
            vm += _field(1, 0, _varint(7))
    cap = data.draw(st.one_of(st.sampled_from([0, 1, 2048, 2049, 4096, 4097, MAX_HUGE_2M + 1]), st.integers(0, 2**64 - 1)))
    estimate = _field(1, 2, data.draw(st.sampled_from(ids))) + _field(2, 0, _varint(cap)) + _field(7, 0, _varint(
        data.draw(st.sampled_from([pb.CAUSE_HEALTHY, pb.CAUSE_IMPLAUSIBLE, pb.CAUSE_UNKNOWN]))))
    wire = base + _field(9, 2, vm) + _field(10, 2, estimate)
    if data.draw(st.booleans()):
        wire += _field(12, 2, _field(2, 0, _varint(cap)))  # a host-level estimate too
    try:
        parsed = pb.HostReport.FromString(wire)
    except Exception:  # noqa: BLE001 - the runtime refuses it: nothing reaches the checks
        return
    with mock.patch.object(validate, "_walk_wire", None):
        python = check_report(parsed, time.time())
    assert check_report(parsed, time.time(), (wire, 0, len(wire))) == python


@functools.cache
def _message_bytes() -> bytes:
    """The same bytes for every example (hypothesis replays its draws against them)."""
    reports = [report(1), report(2, fixture="linux-6.6-pages2m")]
    for r in reports:
        r.sample_time.FromSeconds(int(time.time()))
    return ingest_pb2.AgentMessage(reports=reports, spool_dropped_total=3).SerializeToString()


@pytest.mark.fuzz
@fuzz_settings(300)
@given(st.data())
def test_mutated_message_bytes_decode_or_are_named(data: st.DataObject) -> None:
    """Byte mutations of a whole AgentMessage: decoding never raises (an Undecodable names it), and
    every report of a message that parses gets the same answer from both checks."""
    wire = bytearray(_message_bytes())
    for _ in range(data.draw(st.integers(1, 6))):
        if not wire:
            break
        pos = data.draw(st.integers(0, len(wire) - 1))
        kind = data.draw(st.sampled_from(["replace", "delete", "insert", "truncate", "varint"]))
        if kind == "replace":
            wire[pos] = data.draw(st.integers(0, 255))
        elif kind == "delete":
            del wire[pos]
        elif kind == "insert":
            wire[pos:pos] = bytes([data.draw(st.integers(0, 255))])
        elif kind == "varint":  # an over-long varint (an integer past 64 bits) spliced in
            wire[pos:pos] = b"\xff" * data.draw(st.integers(1, 12)) + b"\x01"
        else:
            del wire[pos:]
    got = decode_agent_message(bytes(wire))
    if isinstance(got, Undecodable):
        assert got.error and got.size_bytes == len(wire)
        return
    assert isinstance(got, Received)
    validate.check_spool_dropped(got.message.spool_dropped_total)
    for i, r in enumerate(got.message.reports):
        with mock.patch.object(validate, "_walk_wire", None):
            python = check_report(r, time.time())
        if got.spans is not None:
            assert check_report(r, time.time(), (got.data, *got.spans[i])) == python


# --- against the aggregator process ----------------------------------------------------------------

@pytest.fixture
def agg(tmp_path: Path) -> Iterator[Aggregator]:
    a = Aggregator(tmp_path / "agg", INSECURE).start()
    yield a
    a.proc.kill9()  # type: ignore[union-attr]


async def exchange(target: str, messages: list[ingest_pb2.AgentMessage],
                   metadata: tuple[tuple[str, str], ...] = ()) -> list[ingest_pb2.ServerMessage]:
    """One stream: each message written, then its reply read."""
    async with grpc.aio.insecure_channel(target) as channel:
        call = ingest_pb2_grpc.IngestStub(channel).Stream(metadata=metadata, timeout=15)
        out = []
        for m in messages:
            await call.write(m)
            out.append(await call.read())
        await call.done_writing()
        return out


async def exchange_raw(target: str, payload: bytes) -> tuple[grpc.StatusCode, str]:
    """Bytes that are no AgentMessage, sent as one: the call's status and details."""
    async with grpc.aio.insecure_channel(target) as channel:
        stream = channel.stream_stream(STREAM_METHOD, request_serializer=lambda b: b,
                                       response_deserializer=ingest_pb2.ServerMessage.FromString)
        call = stream(timeout=15)
        try:
            await call.write(payload)
            await call.done_writing()
            async for _ in call:
                pass
        except grpc.aio.AioRpcError:
            pass  # the status is the call's, read below
        return await call.code(), await call.details()


def _fleet_ok(a: Aggregator) -> dict:
    status, body = http_fetch(a.http + "/api/v1/fleet")
    assert status == 200, body[:300]
    return json.loads(body)


def _metric(a: Aggregator, name: str, labels: str = "") -> float:
    status, body = http_fetch(a.http + "/metrics")
    assert status == 200
    for line in body.decode().splitlines():
        if line.startswith(name + labels + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{labels} not exported")


def test_out_of_range_integers_are_rejected_by_name_and_cost_only_themselves(agg: Aggregator) -> None:
    big_seq = report(2**63, instance="evil")
    huge_seq = report(2**64 - 1, instance="evil")
    absurd = absurd_capacity(report(1, host="hv-b-1"))
    (reply,) = asyncio.run(exchange(agg.target, [ingest_pb2.AgentMessage(reports=[big_seq, huge_seq, absurd, report(1)])]))
    assert [(a.status, a.sequence) for a in reply.acks] == [
        (ingest_pb2.ACK_STATUS_REJECTED, 2**63), (ingest_pb2.ACK_STATUS_REJECTED, 2**64 - 1),
        (ingest_pb2.ACK_STATUS_REJECTED, 1), (ingest_pb2.ACK_STATUS_APPLIED, 1)]
    assert "sequence" in reply.acks[0].reason and "sequence" in reply.acks[1].reason
    assert "host_huge_capacity_2m" in reply.acks[2].reason and "exceeds" in reply.acks[2].reason
    # spool_dropped_total travels per message and is stored with each report: all of that message's refused.
    (reply,) = asyncio.run(exchange(agg.target, [ingest_pb2.AgentMessage(reports=[report(1, host="hv-c-1")],
                                                                          spool_dropped_total=2**63)]))
    assert reply.acks[0].status == ingest_pb2.ACK_STATUS_REJECTED and "spool_dropped_total" in reply.acks[0].reason
    # The implausible reading the agent sends is stored, and the read side still answers.
    (reply,) = asyncio.run(exchange(agg.target, [ingest_pb2.AgentMessage(reports=[implausible(report(1, host="hv-d-1"))])]))
    assert reply.acks[0].status == ingest_pb2.ACK_STATUS_APPLIED
    assert agg.applied() == {("hv-a-1", "inst-1"): (1, 1), ("hv-d-1", "inst-1"): (1, 1)}
    _fleet_ok(agg)  # 200, with the absurd ones refused and the implausible one held
    assert _metric(agg, "eptwatch_server_reports_total", '{result="rejected"}') == 4
    # ... and after a restart, even with an absurd report that an older, looser aggregator stored.
    agg.proc.kill9()  # type: ignore[union-attr]
    old = absurd_capacity(report(1, host="hv-z-1"))
    db = sqlite3.connect(agg.workdir / "state" / "eptwatch.sqlite3")
    with db:
        db.execute("INSERT INTO hosts VALUES (?, ?, ?, ?, ?, ?)", ("hv-z-1", "inst-1", 1, time.time(), time.time(), old.SerializeToString()))
    db.close()
    agg.start()
    fleet = _fleet_ok(agg)
    # Shown, as invalid with its problem named, never as healthy and never in the sums.
    assert fleet["hosts_invalid"] == "1"  # proto3 JSON: 64-bit integers are strings
    host = json.loads(http_get(agg.http + "/api/v1/hosts/hv-z-1"))
    assert host["summary"]["status"] == "invalid" and host["summary"]["problem"]
    assert "stored report of 'hv-z-1': host shown invalid" in agg.proc.output()  # type: ignore[union-attr]


def test_undecodable_bytes_get_invalid_argument_and_one_log_line(agg: Aggregator) -> None:
    code, details = asyncio.run(exchange_raw(agg.target, b"\x0a\xff\xff\xff\xff\x0f garbage"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "undecodable AgentMessage" in details
    log = agg.proc.output()  # type: ignore[union-attr]
    assert log.count("undecodable AgentMessage") == 1 and "Traceback" not in log
    # The aggregator goes on serving.
    (reply,) = asyncio.run(exchange(agg.target, [ingest_pb2.AgentMessage(reports=[report(1)])]))
    assert reply.acks[0].status == ingest_pb2.ACK_STATUS_APPLIED


def test_duplicate_acks_carry_the_high_water_mark_and_a_rewind_is_logged_once(agg: Aggregator) -> None:
    asyncio.run(exchange(agg.target, [ingest_pb2.AgentMessage(reports=[report(s) for s in range(1, 6)])]))
    # A spool restored from a snapshot: 2, 3, 4 again, in three messages of one stream.
    replies = asyncio.run(exchange(agg.target, [ingest_pb2.AgentMessage(reports=[report(s)]) for s in (2, 3, 4)]))
    acks = [a for m in replies for a in m.acks]
    assert [(a.status, a.sequence, a.high_water_sequence) for a in acks] == [
        (ingest_pb2.ACK_STATUS_DUPLICATE, s, 5) for s in (2, 3, 4)]
    log = agg.proc.output()  # type: ignore[union-attr]
    assert log.count("at or below the high-water mark 5") == 1
    # An applied report's ack carries no mark.
    (reply,) = asyncio.run(exchange(agg.target, [ingest_pb2.AgentMessage(reports=[report(6)])]))
    assert reply.acks[0].status == ingest_pb2.ACK_STATUS_APPLIED and reply.acks[0].high_water_sequence == 0
    # The agent moves on with a new instance: logged on this side.
    (reply,) = asyncio.run(exchange(agg.target, [ingest_pb2.AgentMessage(reports=[report(1, instance="inst-2")])]))
    assert reply.acks[0].status == ingest_pb2.ACK_STATUS_APPLIED
    assert "host hv-a-1: agent instance inst-2 replaces inst-1" in agg.proc.output()  # type: ignore[union-attr]


# --- two tenants in one group commit (in-process server: the writer is held until both are queued) ---

def test_one_tenants_unstorable_report_costs_only_its_own_ack(tmp_path: Path) -> None:
    tokens = TokenTable.from_yaml(
        f"tokens:\n  - name: tenant-a\n    sha256: {hash_token('token-a')}\n    hosts: ['hv-a-*']\n"
        f"  - name: tenant-b\n    sha256: {hash_token('token-b')}\n    hosts: ['hv-b-*']\n", "tokens")
    store = Store(tmp_path / "state")
    # A report SQLite refuses although it passed every check: the kind of failure that used to fail the
    # whole group (tenant b's agent got UNKNOWN for tenant a's report).
    store._conn.execute("CREATE TRIGGER poison BEFORE INSERT ON agents WHEN NEW.agent_instance = 'poison' "
                        "BEGIN SELECT RAISE(ABORT, 'poisoned report'); END")
    servicer = IngestServicer(store, FleetState(), tokens, idle_timeout_seconds=30)

    async def run() -> tuple[list[ingest_pb2.ServerMessage], list[ingest_pb2.ServerMessage]]:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((servicer.handler(),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            target = f"127.0.0.1:{port}"
            a = asyncio.create_task(exchange(target, [ingest_pb2.AgentMessage(
                reports=[report(1, host="hv-a-1"), report(1, host="hv-a-2", instance="poison"), report(2, host="hv-a-1")])],
                metadata=(("authorization", "Bearer token-a"),)))
            b = asyncio.create_task(exchange(target, [ingest_pb2.AgentMessage(reports=[report(1, host="hv-b-1")])],
                                             metadata=(("authorization", "Bearer token-b"),)))
            while store._queue.qsize() < 2:  # both messages wait for the writer: one group
                await asyncio.sleep(0.01)
            store.start()
            return await a, await b
        finally:
            await server.stop(None)

    try:
        (ra,), (rb,) = asyncio.run(run())
    finally:
        store.close()
    assert [(a.host_id, a.status) for a in ra.acks] == [
        ("hv-a-1", ingest_pb2.ACK_STATUS_APPLIED), ("hv-a-2", ingest_pb2.ACK_STATUS_REJECTED),
        ("hv-a-1", ingest_pb2.ACK_STATUS_APPLIED)]
    assert "poisoned report" in ra.acks[1].reason
    assert [(a.host_id, a.status) for a in rb.acks] == [("hv-b-1", ingest_pb2.ACK_STATUS_APPLIED)]
    assert store.commit_failures_total == {"report": 1}
    assert servicer.counters.reports_applied_total == 3 and servicer.counters.reports_rejected_total == 1
    # What was acked APPLIED is stored; the culprit is not.
    reopened = Store(tmp_path / "state")
    try:
        assert sorted((a.host_id, a.agent_instance, a.last_sequence) for a in reopened.load_agents()) == [
            ("hv-a-1", "inst-1", 2), ("hv-b-1", "inst-1", 1)]
    finally:
        reopened.close()


def test_a_value_sqlite_cannot_hold_fails_only_its_own_report(tmp_path: Path) -> None:
    """Defence in depth below the checks: a sequence of 2^63 handed to the store directly (the checks
    refuse it first on the wire) fails only its own report; the group's other messages and reports land."""
    from eptwatch.server.store.commit import Incoming

    store = Store(tmp_path / "state")

    async def run() -> list[list[object]]:
        futures = [store.submit([Incoming(report(1, host="hv-a-1")), Incoming(report(2**63, host="hv-a-2"))]),
                   store.submit([Incoming(report(1, host="hv-b-1"), spool_dropped_total=5)])]
        store.start()  # both queued before the writer runs: one group
        return [[(r.status, r.reason) for r in await f] for f in futures]

    try:
        (a1, a2), (b1,) = asyncio.run(run())
        assert a1 == b1 == (ingest_pb2.ACK_STATUS_APPLIED, "")
        assert a2[0] == ingest_pb2.ACK_STATUS_REJECTED and "OverflowError" in a2[1]
        assert store.commit_failures_total == {"report": 1}
        assert sorted(a.host_id for a in store.load_agents()) == ["hv-a-1", "hv-b-1"]
    finally:
        store.close()


def test_store_error_names_a_full_disk() -> None:
    from eptwatch.server.store.sqlite import _store_error

    assert _store_error(sqlite3.OperationalError("database or disk is full")).reason == "disk_full"
    err = _store_error(sqlite3.OperationalError("disk I/O error"))
    assert isinstance(err, StoreError) and err.reason == "database"


# --- a full disk, for real: the aggregator's state on a small tmpfs --------------------------------

@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True,
                         env=env_without_proxy())
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {out.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(d: Path) -> Path:
    """Takes every free byte of d's filesystem."""
    filler = d / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (65536, 4096, 1):  # down to the last byte
            try:
                while os.write(fd, b"\0" * size) == size:
                    pass
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


def test_full_disk_ends_the_stream_unavailable_and_acks_nothing(tmp_path: Path, small_tmpfs: Path) -> None:
    agg = Aggregator(tmp_path / "agg", INSECURE + ["--state", str(small_tmpfs / "state")])
    agg.start()
    try:
        (reply,) = asyncio.run(exchange(agg.target, [ingest_pb2.AgentMessage(reports=[report(1)])]))
        assert reply.acks[0].status == ingest_pb2.ACK_STATUS_APPLIED
        filler = _fill(small_tmpfs)
        assert os.statvfs(small_tmpfs).f_bavail == 0
        batch = ingest_pb2.AgentMessage(reports=[report(s) for s in range(2, 40)])
        with pytest.raises(grpc.aio.AioRpcError) as info:
            asyncio.run(exchange(agg.target, [batch]))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "disk full" in (info.value.details() or "")
        assert _metric(agg, "eptwatch_server_store_commit_failures_total", '{reason="disk_full"}') >= 1
        assert _metric(agg, "eptwatch_server_store_commit_failures_total", '{reason="report"}') == 0
        assert "Traceback" not in agg.proc.output()  # type: ignore[union-attr]
        # Space again: the same reports are applied now (not DUPLICATE: none of them had been stored).
        filler.unlink()
        (reply,) = asyncio.run(exchange(agg.target, [batch]))
        assert {a.status for a in reply.acks} == {ingest_pb2.ACK_STATUS_APPLIED} and len(reply.acks) == 38
        db = sqlite3.connect(small_tmpfs / "state" / "eptwatch.sqlite3")
        try:
            rows = db.execute("SELECT host_id, agent_instance, last_sequence, applied_total FROM agents").fetchall()
        finally:
            db.close()
        assert rows == [("hv-a-1", "inst-1", 39, 39)]
        _fleet_ok(agg)
    finally:
        agg.proc.kill9()  # type: ignore[union-attr]

