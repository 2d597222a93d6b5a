"""The ingest request deserializer: each report's bytes found on the wire, never guessed."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eptwatch.agent.delivery import encode_agent_message
from eptwatch.server.ingest import INGEST_SERVICE, decode_agent_message, report_spans
from eptwatch.server.store import Incoming, Store
from eptwatch.v1 import ingest_pb2
from eptwatch.v1 import report_pb2 as pb


def _report(host: str, seq: int, extra: bytes = b"") -> bytes:
    r = pb.HostReport(host_id=host, agent_instance="i", sequence=seq, agent_version="v")
    r.sample_time.FromSeconds(1_700_000_000 + seq)
    return r.SerializeToString() + extra


def test_service_name_matches_the_proto() -> None:
    assert INGEST_SERVICE == ingest_pb2.DESCRIPTOR.services_by_name["Ingest"].full_name


@given(st.lists(st.tuples(st.text("abc-", min_size=1, max_size=20), st.integers(1, 2**31)), max_size=60),
       st.integers(0, 2**64 - 1), st.booleans())
@settings(max_examples=200, deadline=None)
def test_spans_are_the_reports_as_sent(reports: list[tuple[str, int]], dropped: int, departing: bool) -> None:
    # An unknown field (a newer agent's) inside a report travels with it: field 99, varint 7.
    bodies = [_report(h, s, b"\x98\x06\x07" if s % 2 else b"") for h, s in reports]
    wire = encode_agent_message(bodies, dropped)
    if departing:
        wire += b"\x18\x01"
    got = decode_agent_message(wire)
    assert got.report_bytes == bodies
    assert [pb.HostReport.FromString(b) for b in bodies] == list(got.message.reports)
    assert got.message.spool_dropped_total == dropped and got.message.departing == departing


def test_fields_in_any_order_and_unknown_top_level_fields() -> None:
    a, b = _report("a", 1), _report("b", 2)
    wire = (b"\x10\x05" + b"\x0a" + bytes([len(a)]) + a + b"\x3a\x02hi" + b"\x4d\x01\x02\x03\x04"
            + b"\x41" + bytes(8) + b"\x0a" + bytes([len(b)]) + b)
    got = decode_agent_message(wire)
    assert got.report_bytes == [a, b] and got.message.spool_dropped_total == 5


@given(st.binary(max_size=200))
@settings(max_examples=300, deadline=None)
def test_garbage_is_refused_or_framed_exactly(data: bytes) -> None:
    """Whatever protobuf accepts, the spans either match its reports or are None; never an exception."""
    spans = report_spans(data, 0)
    try:
        msg = ingest_pb2.AgentMessage.FromString(data)
    except Exception:  # noqa: BLE001 - protobuf refused it: the call fails before our walk matters
        return
    spans = report_spans(data, len(msg.reports))
    if spans is not None:
        assert [pb.HostReport.FromString(s) for s in spans] == list(msg.reports)


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
                await store.apply([Incoming(r, None, 0)])
            await asyncio.gather(*(one(k) for k in range(20)))
            return store.commits_total, store.reports_committed_total
        finally:
            store.close()

    commits_delayed, n = asyncio.run(run(0.05))
    assert n == 20 and commits_delayed <= 2
    commits_at_once, n = asyncio.run(run(0.0))
    assert n == 20 and commits_at_once > commits_delayed


def test_commit_delay_is_bounded(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="commit delay"):
        Store(tmp_path, commit_delay_seconds=5)
    from eptwatch.server.app import ServerConfig
    with pytest.raises(ValueError, match="store_commit_delay_seconds"):
        ServerConfig(insecure_plaintext=True, insecure_no_auth=True, store_commit_delay_seconds=-1)
