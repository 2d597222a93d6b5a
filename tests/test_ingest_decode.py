"""The ingest request deserializer: each report's bytes found on the wire, never guessed."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from pathlib import Path

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from eptwatch.agent.uplink.delivery import encode_agent_message, varint
from eptwatch.server.ingest.servicer import decode_agent_message, report_spans
from eptwatch.server.store.commit import Incoming
from eptwatch.server.store.sqlite import Store
from eptwatch.v1 import ingest_pb2
from eptwatch.v1 import report_pb2 as pb

from .fuzzing import fuzz_settings


def _report(host: str, seq: int, extra: bytes = b"") -> bytes:
    r = pb.HostReport(host_id=host, agent_instance="i", sequence=seq, agent_version="v")
    r.sample_time.FromSeconds(1_700_000_000 + seq)
    return r.SerializeToString() + extra


@given(st.lists(st.tuples(st.text("abc-", min_size=1, max_size=20), st.integers(1, 2**31)), max_size=60),
       st.integers(0, 2**64 - 1), st.booleans())
@pytest.mark.fuzz
@fuzz_settings(200)
def test_spans_are_the_reports_as_sent(reports: list[tuple[str, int]], dropped: int, departing: bool) -> None:
    # An unknown field (a newer agent's) inside a report travels with it: field 99, varint 7.
    bodies = [_report(h, s, b"\x98\x06\x07" if s % 2 else b"") for h, s in reports]
    wire = encode_agent_message(bodies, dropped)
    if departing:
        wire += b"\x18\x01"
    got = decode_agent_message(wire)
    assert [got.report_bytes(i) for i in range(len(bodies))] == bodies
    assert [pb.HostReport.FromString(b) for b in bodies] == list(got.message.reports)
    assert got.message.spool_dropped_total == dropped and got.message.departing == departing


def test_fields_in_any_order_and_unknown_top_level_fields() -> None:
    a, b = _report("a", 1), _report("b", 2)
    # Field 1 (reports) framed as encode_agent_message frames it, around other fields in any order.
    wire = (b"\x10\x05" + b"\x0a" + varint(len(a)) + a + b"\x3a\x02hi" + b"\x4d\x01\x02\x03\x04"
            + b"\x41" + bytes(8) + b"\x0a" + varint(len(b)) + b)
    got = decode_agent_message(wire)
    assert [got.report_bytes(0), got.report_bytes(1)] == [a, b] and got.message.spool_dropped_total == 5


@given(st.binary(max_size=200))
@pytest.mark.fuzz
@fuzz_settings(300)
def test_garbage_is_refused_or_framed_exactly(data: bytes) -> None:
    """Whatever protobuf accepts, the spans either match its reports or are None; never an exception."""
    report_spans(data, 0)  # must not raise, whatever the bytes
    try:
        msg = ingest_pb2.AgentMessage.FromString(data)
    except Exception:  # noqa: BLE001 - protobuf refused it: the call fails before our walk matters
        return
    spans = report_spans(data, len(msg.reports))
    if spans is not None:
        assert [pb.HostReport.FromString(data[a:b]) for a, b in spans] == list(msg.reports)


def test_truncated_and_overlong_varints_give_none() -> None:
    assert report_spans(b"\x0a\x05abc", 1) is None  # length past the end
    assert report_spans(b"\x0a", 1) is None
    assert report_spans(b"\x10" + b"\xff" * 11 + b"\x01", 0) is None
    assert report_spans(b"\x0b", 0) is None  # group wire types are not ours


def test_group_commit_delay_puts_concurrent_reports_in_one_transaction(tmp_path: Path) -> None:
    async def run(delay: float) -> tuple[int, int]:
        store = Store(tmp_path / f"d{delay}", commit_delay_seconds=delay)
        store.start()
        try:
            async def one(k: int) -> None:
                await asyncio.sleep(k * 0.001)  # arrivals spread over 20 ms, as from separate streams
                r = pb.HostReport.FromString(_report(f"h{k}", 1))
                await store.submit([Incoming(r, None, 0)])
            await asyncio.gather(*(one(k) for k in range(20)))
            return store.commits_total, store.reports_committed_total
        finally:
            store.close()

    # A window well past the 20 ms of arrivals: late wake-ups on a loaded machine still fall inside it.
    commits_delayed, n = asyncio.run(run(0.25))
    assert n == 20 and commits_delayed <= 2
    commits_at_once, n = asyncio.run(run(0.0))
    assert n == 20 and commits_at_once > commits_delayed


def test_commit_delay_is_bounded(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="commit delay"):
        Store(tmp_path, commit_delay_seconds=5)
    with pytest.raises(ValueError, match="gather delay"):
        Store(tmp_path, gather_delay_seconds=-0.1)
    from eptwatch.server.app import ServerConfig
    with pytest.raises(ValueError, match="store_commit_delay_seconds"):
        ServerConfig(insecure_plaintext=True, insecure_no_auth=True, store_commit_delay_seconds=-1)
    with pytest.raises(ValueError, match="store_commit_gather_seconds"):
        ServerConfig(insecure_plaintext=True, insecure_no_auth=True, store_commit_gather_seconds=2)


class _WatchedHurry(threading.Event):
    """The writer's hurry event, recording each group-commit wait: entered, and how it ended (True:
    woken by a hurried message; False: the gather delay ran out)."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = 0
        self.ended: list[bool] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.entered += 1
        got = super().wait(timeout)
        self.ended.append(got)
        return got


@pytest.mark.parametrize("hurried_last", [False, True])
def test_group_commit_gathers_paced_messages_until_a_sender_waits(tmp_path: Path, hurried_last: bool) -> None:
    """Messages whose senders wait on nothing (paced agents) gather for the whole gather delay and
    commit together; a message submitted with `hurry` (its stream has an earlier one unacknowledged)
    ends the wait at once, and commits with the gathered ones."""
    async def run() -> tuple[int, int, _WatchedHurry]:
        # The longest gather allowed: the unhurried case takes that second; the others must be queued inside it.
        store = Store(tmp_path / "st", commit_delay_seconds=0.0, gather_delay_seconds=1.0)
        watched = store._hurry = _WatchedHurry()
        store.start()
        try:
            loop = asyncio.get_running_loop()
            first = store.submit([Incoming(pb.HostReport.FromString(_report("h0", 1)), None, 0)])
            await until(lambda: watched.entered == 1)  # the writer holds h0 and waits for more
            more = [store.submit([Incoming(pb.HostReport.FromString(_report(f"h{k}", 1)), None, 0)], loop=loop)
                    for k in (1, 2)]
            more.append(store.submit([Incoming(pb.HostReport.FromString(_report("h3", 1)), None, 0)],
                                     hurry=hurried_last, loop=loop))
            await asyncio.gather(first, *more)
            return store.commits_total, store.reports_committed_total, watched
        finally:
            store.close()

    commits, reports, watched = asyncio.run(run())
    assert reports == 4 and commits == 1  # all four in the one transaction
    assert watched.ended == [hurried_last]  # woken by the hurried message, or the gather delay ran out


def test_no_gather_wait_when_it_is_not_longer_than_the_commit_delay(tmp_path: Path) -> None:
    """gather <= delay: the writer never waits on the hurry event (a hurried message changes nothing)."""
    async def run() -> _WatchedHurry:
        store = Store(tmp_path / "st", commit_delay_seconds=0.01, gather_delay_seconds=0.0)
        watched = store._hurry = _WatchedHurry()
        store.start()
        try:
            for k in range(3):
                await store.submit([Incoming(pb.HostReport.FromString(_report(f"h{k}", 1)), None, 0)], hurry=k == 1)
            return watched
        finally:
            store.close()

    watched = asyncio.run(run())
    assert watched.entered == 0 and not watched.is_set()


def test_a_stream_that_sends_ahead_hurries_its_commit() -> None:
    """A message is submitted with `hurry` exactly when an earlier message of its stream is still
    unacknowledged (the agent sends ahead: its throughput waits on the commit); a paced stream's next
    message, sent after the acks, is not."""
    from eptwatch.server.fleet.state import FleetConfig, FleetState
    from eptwatch.server.ingest.servicer import IngestServicer
    from eptwatch.server.store.commit import ApplyResult

    submitted: list[tuple[asyncio.Future, int, bool]] = []

    class _ManualStore:
        def submit(self, items, hurry=False, loop=None):  # type: ignore[no-untyped-def]
            assert loop is asyncio.get_running_loop()
            fut = asyncio.get_running_loop().create_future()
            submitted.append((fut, len(items), hurry))
            return fut

    def resolve(k: int) -> None:
        fut, n, _ = submitted[k]
        fut.set_result([ApplyResult(ingest_pb2.ACK_STATUS_APPLIED, True)] * n)

    async def run() -> list[int]:
        fleet = FleetState(FleetConfig())
        servicer = IngestServicer(_ManualStore(), fleet, None, 60.0)  # type: ignore[arg-type]
        now = int(time.time())
        acked: list[int] = []

        def message(seq: int):  # type: ignore[no-untyped-def]
            r = pb.HostReport.FromString(_report("hv-ahead-1", seq))
            r.sample_time.FromSeconds(now)
            return decode_agent_message(encode_agent_message([r.SerializeToString()], 0))

        async def requests():  # type: ignore[no-untyped-def]
            yield message(1)  # nothing outstanding: not hurried
            await until(lambda: len(submitted) == 1)
            yield message(2)  # 1 is not acknowledged yet: hurried
            await until(lambda: len(submitted) == 2)
            yield message(3)  # 1 and 2 still outstanding: hurried
            await until(lambda: len(submitted) == 3)
            for k in range(3):
                resolve(k)
            await until(lambda: len(acked) == 3)  # every ack is out: the agent waits for its next sample
            yield message(4)  # paced: not hurried
            await until(lambda: len(submitted) == 4)
            resolve(3)
            await until(lambda: len(acked) == 4)

        async for m in servicer.Stream(requests(), context=_Context()):  # type: ignore[arg-type]
            acked.extend(a.sequence for a in m.acks)
        return acked

    acked = asyncio.run(run())
    assert acked == [1, 2, 3, 4]
    assert [h for _, _, h in submitted] == [False, True, True, False]


def test_a_commit_is_applied_even_if_its_stream_is_cancelled_while_waiting(tmp_path: Path) -> None:
    """The agent goes away while its report commits: the report is durable (a resend is a DUPLICATE),
    so the fleet state and counters must still take it, although no ack can be sent."""
    from eptwatch.server.fleet.state import FleetConfig, FleetState
    from eptwatch.server.ingest.servicer import IngestServicer

    context = _Context()

    async def run() -> tuple[IngestServicer, FleetState]:
        store = Store(tmp_path / "st", commit_delay_seconds=0.3)  # the commit is still pending when we cancel
        store.start()
        fleet = FleetState(FleetConfig())
        servicer = IngestServicer(store, fleet, None, 60.0)
        r = pb.HostReport.FromString(_report("hv-gone-1", 1))
        r.sample_time.FromSeconds(int(time.time()))
        wire = encode_agent_message([r.SerializeToString()], 0)

        async def requests():  # type: ignore[no-untyped-def]
            yield decode_agent_message(wire)
            await asyncio.Event().wait()  # the agent never says more

        async def consume() -> None:
            async for _ in servicer.Stream(requests(), context=context):  # type: ignore[arg-type]
                pass

        submitted: list[asyncio.Future] = []
        real_submit = store.submit

        def submit(items, hurry=False, loop=None):  # type: ignore[no-untyped-def]
            submitted.append(real_submit(items, hurry, loop))
            return submitted[-1]

        store.submit = submit  # type: ignore[method-assign]
        task = asyncio.create_task(consume())
        await until(lambda: submitted)  # admitted, waiting for the commit
        assert not submitted[0].done()  # the commit is still pending when the agent goes away
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await until(submitted[0].done)  # the commit lands
        await asyncio.sleep(0)  # its done-callbacks, scheduled when it landed, run
        store.close()
        return servicer, fleet

    servicer, fleet = asyncio.run(run())
    assert context.compression == grpc.Compression.NoCompression  # acks are tiny: never gzip them
    assert servicer.counters.reports_applied_total == 1
    assert fleet.get("hv-gone-1") is not None


async def until(cond, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    """Polls `cond` on the event loop until it holds; fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"not within {timeout} s"
        await asyncio.sleep(0.01)


class _Context:
    """The part of grpc.aio.ServicerContext that Ingest.Stream uses without authentication."""

    compression: grpc.Compression | None = None

    def set_compression(self, compression: grpc.Compression) -> None:
        self.compression = compression


@pytest.mark.parametrize("store_summarises", [True, False])
def test_the_stores_summary_of_the_stored_report_goes_into_the_fleet_view_as_it_is(store_summarises: bool) -> None:
    """A store that summarised the report it stored (PostgreSQL) hands that summary back with the result:
    ingest puts it into the fleet view as it is (the same object, received at the store's time) and does
    not summarise the report again; without one, ingest summarises it at its own clock, as before."""
    import dataclasses

    from eptwatch.server.ingest import servicer as ingest_mod
    from eptwatch.server.fleet.state import FleetConfig, FleetState, summarise
    from eptwatch.server.ingest.servicer import IngestServicer
    from eptwatch.server.store.commit import ApplyResult

    r = pb.HostReport.FromString(_report("hv-sum-1", 1))
    r.sample_time.FromSeconds(int(time.time()))
    clock_now = time.time() + 0.25  # ingest's clock: checks and, without the store's summary, received
    from_store = dataclasses.replace(summarise(r, 1234.5), received=1234.5)
    calls: list[str] = []

    class _Store:
        def submit(self, items, hurry=False, loop=None):  # type: ignore[no-untyped-def]
            fut = asyncio.get_running_loop().create_future()
            fut.set_result([ApplyResult(ingest_pb2.ACK_STATUS_APPLIED, True, summary=from_store if store_summarises else None)
                            for _ in items])
            return fut

    real_summarise = ingest_mod.summarise

    def counting_summarise(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append("summarise")
        return real_summarise(*args, **kwargs)

    async def run() -> tuple[FleetState, list[ingest_pb2.ServerMessage]]:
        fleet = FleetState(FleetConfig())
        servicer = IngestServicer(_Store(), fleet, None, 60.0, clock=lambda: clock_now)  # type: ignore[arg-type]

        async def requests():  # type: ignore[no-untyped-def]
            yield decode_agent_message(encode_agent_message([r.SerializeToString()], 0))

        out = [m async for m in servicer.Stream(requests(), context=_Context())]  # type: ignore[arg-type]
        return fleet, out

    ingest_mod.summarise = counting_summarise  # type: ignore[assignment]
    try:
        fleet, out = asyncio.run(run())
    finally:
        ingest_mod.summarise = real_summarise  # type: ignore[assignment]
    assert [a.status for m in out for a in m.acks] == [ingest_pb2.ACK_STATUS_APPLIED]
    held = fleet.get("hv-sum-1")
    if store_summarises:
        assert held is from_store and calls == []
    else:
        assert held is not None and held.received == clock_now and calls == ["summarise"]


def test_the_handler_wakes_when_a_pending_commit_lands_and_acks_in_order() -> None:
    """A handler waiting for a pending commit wakes when it lands: every message's acks go out once its
    commit lands, in the order of the messages, each after the commit's counts reached the counters,
    even when later commits land first."""
    from eptwatch.server.fleet.state import FleetConfig, FleetState
    from eptwatch.server.ingest.servicer import IngestServicer
    from eptwatch.server.store.commit import ApplyResult

    pending: list[tuple[asyncio.Future, int]] = []

    class _LateStore:
        def submit(self, items, hurry=False, loop=None):  # type: ignore[no-untyped-def]
            fut = asyncio.get_running_loop().create_future()
            pending.append((fut, len(items)))
            return fut

    async def run() -> tuple[list[tuple[list[int], int]], IngestServicer]:
        fleet = FleetState(FleetConfig())
        servicer = IngestServicer(_LateStore(), fleet, None, 60.0)  # type: ignore[arg-type]
        now = int(time.time())

        async def requests():  # type: ignore[no-untyped-def]
            for seq in (1, 2, 3):
                r = pb.HostReport.FromString(_report("hv-late-1", seq))
                r.sample_time.FromSeconds(now)
                yield decode_agent_message(encode_agent_message([r.SerializeToString()], 0))
            await asyncio.Event().wait()  # the agent stays

        async def resolve() -> None:
            await until(lambda: len(pending) == 3)
            for fut, n in reversed(pending):  # the last message's commit lands first
                await asyncio.sleep(0.02)
                fut.set_result([ApplyResult(ingest_pb2.ACK_STATUS_APPLIED, True)] * n)

        got: list[tuple[list[int], int]] = []
        resolver = asyncio.create_task(resolve())
        stream = servicer.Stream(requests(), context=_Context())  # type: ignore[arg-type]
        async for m in stream:
            got.append(([a.sequence for a in m.acks], servicer.counters.reports_applied_total))
            if sum(len(s) for s, _ in got) == 3:
                break
        await stream.aclose()
        await resolver
        return got, servicer

    got, servicer = asyncio.run(asyncio.wait_for(run(), 10))  # a handler never woken fails here, not hangs
    assert [s for acks, _ in got for s in acks] == [1, 2, 3]
    assert got[-1][1] == 3 and all(applied >= max(acks) for acks, applied in got)
    assert servicer.counters.reports_applied_total == 3


def test_the_server_serves_with_its_collector_thresholds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`eptwatch-server` raises the cyclic collector's thresholds before it serves (cli.GC_THRESHOLDS:
    the default collected about once per backlog message), and not before its configuration is checked."""
    import gc

    from eptwatch.server import app, cli

    seen: list[tuple[int, ...]] = []

    class _Aggregator:
        def __init__(self, cfg: object) -> None:
            seen.append(gc.get_threshold())  # while configuring: CPython's own

        async def serve_forever(self) -> None:
            seen.append(gc.get_threshold())

    before = gc.get_threshold()
    monkeypatch.setattr(app, "Aggregator", _Aggregator)
    try:
        gc.set_threshold(700, 10, 10)
        assert cli.main(["--state", str(tmp_path / "st"), "--insecure-plaintext", "--insecure-no-auth"]) == 0
    finally:
        gc.set_threshold(*before)
    assert seen == [(700, 10, 10), cli.GC_THRESHOLDS]
    assert cli.GC_THRESHOLDS[0] > 700
