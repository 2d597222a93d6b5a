from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest

from eptwatch.agent.faces.config import ConfigError, load_config
from eptwatch.agent.faces.daemon import AgentConfig
from eptwatch.agent.sources.labels import parse_labels_file
from eptwatch.agent.sources.status import ParseError
from eptwatch.agent.uplink.delivery import encode_agent_message
from eptwatch.agent.uplink.spool import Spool
from eptwatch.server.app import ServerConfig
from eptwatch.server.store.commit import Incoming
from eptwatch.server.store.sqlite import Store
from eptwatch.v1 import ingest_pb2, report_pb2


def test_spool_survives_reopen_and_keeps_numbering(tmp_path: Path) -> None:
    p = tmp_path / "s.db"
    s = Spool(p, 10**6, 3600)
    assert [s.append(lambda n: b"r%d" % n) for _ in range(3)] == [1, 2, 3]
    inst = s.agent_instance
    s.ack([1])
    s.close()
    s = Spool(p, 10**6, 3600)
    assert s.agent_instance == inst
    assert [seq for seq, _ in s.pending(0, 10, 10**6)] == [2, 3]
    assert s.append(lambda n: b"x") == 4
    assert s.stats().depth == 3


def test_spool_size_bound_drops_oldest_and_counts(tmp_path: Path) -> None:
    s = Spool(tmp_path / "s.db", max_bytes=250, max_age_seconds=3600)
    for _ in range(5):
        s.append(lambda n: bytes(100))
    st = s.stats()
    assert st.depth == 2 and st.bytes == 200 and st.dropped_total == 3
    assert [seq for seq, _ in s.pending(0, 10, 10**6)] == [4, 5]  # oldest went first


def test_spool_age_bound(tmp_path: Path) -> None:
    now = [1000.0]
    s = Spool(tmp_path / "s.db", 10**6, max_age_seconds=60, clock=lambda: now[0])
    s.append(lambda n: b"old")
    now[0] += 120
    s.expire()
    assert s.stats().depth == 0 and s.dropped_total == 1


def test_spool_pending_respects_cursor_limit_and_bytes(tmp_path: Path) -> None:
    s = Spool(tmp_path / "s.db", 10**6, 3600)
    for _ in range(10):
        s.append(lambda n: bytes(100))
    assert [q for q, _ in s.pending(3, 4, 10**6)] == [4, 5, 6, 7]
    assert len(s.pending(0, 10, 250)) == 2


def test_framing_equals_protobuf_encoding() -> None:
    reports = [report_pb2.HostReport(host_id=f"h{i}", sequence=i, agent_instance="x" * (i * 70)) for i in range(1, 4)]
    framed = encode_agent_message([r.SerializeToString() for r in reports], 300)
    msg = ingest_pb2.AgentMessage.FromString(framed)
    assert list(msg.reports) == reports and msg.spool_dropped_total == 300


def _incoming(host: str, inst: str, seq: int, t: float) -> Incoming:
    r = report_pb2.HostReport(host_id=host, agent_instance=inst, sequence=seq)
    r.sample_time.FromNanoseconds(int(t * 1e9))
    return Incoming(r, r.SerializeToString())


def test_store_dedupes_and_keeps_latest(tmp_path: Path) -> None:
    async def go() -> None:
        st = Store(tmp_path)
        st.start()
        res = await st.submit([_incoming("h", "i", 1, 100), _incoming("h", "i", 2, 200), _incoming("h", "i", 2, 200)])
        assert [r.status for r in res] == [ingest_pb2.ACK_STATUS_APPLIED, ingest_pb2.ACK_STATUS_APPLIED, ingest_pb2.ACK_STATUS_DUPLICATE]
        # A replayed older report from a new instance applies, but does not replace the newer state.
        (r,) = await st.submit([_incoming("h", "j", 1, 150)])
        assert r.status == ingest_pb2.ACK_STATUS_APPLIED and not r.became_latest
        st.close()
        st2 = Store(tmp_path)
        (host,) = st2.load_hosts()
        assert host.sequence == 2 and host.agent_instance == "i"
        assert {(a.agent_instance, a.last_sequence, a.applied_total) for a in st2.load_agents()} == {("i", 2, 2), ("j", 1, 1)}
        st2.start()
        (r,) = await st2.submit([_incoming("h", "i", 2, 200)])  # the mark survived the restart
        assert r.status == ingest_pb2.ACK_STATUS_DUPLICATE
        st2.close()

    asyncio.run(go())


def test_labels_file() -> None:
    assert parse_labels_file('zone="eu-1a"\nrack="r12"\n\nhw=gen3\n', "l") == {"zone": "eu-1a", "rack": "r12", "hw": "gen3"}
    with pytest.raises(ParseError, match="key="):
        parse_labels_file("nonsense\n", "l")
    with pytest.raises(ParseError, match="quoted"):
        parse_labels_file('a="unterminated\n', "l")


def test_config_errors_name_file_and_key(tmp_path: Path) -> None:
    p = tmp_path / "server.yaml"
    p.write_text("listen: 127.0.0.1:1\nlisten_port: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(ServerConfig, p, flags={"insecure_plaintext": True, "insecure_no_auth": True})
    assert str(p) in str(info.value) and "unknown key 'listen_port'" in str(info.value) and "did you mean listen" in str(info.value)
    p.write_text("max_concurrent_streams: lots\n")
    with pytest.raises(ConfigError, match="max_concurrent_streams: expected an integer"):
        load_config(ServerConfig, p)
    p.write_text("insecure_plaintext: yes please\n")
    with pytest.raises(ConfigError, match="insecure_plaintext: expected true or false"):
        load_config(ServerConfig, p)
    p.write_text("listen: nowhere\ninsecure_plaintext: true\ninsecure_no_auth: true\n")
    with pytest.raises(ConfigError, match="listen: expected HOST:PORT"):
        load_config(ServerConfig, p)


def test_config_precedence_file_env_flags(tmp_path: Path) -> None:
    p = tmp_path / "agent.yaml"
    p.write_text("server: a:1\ninsecure_plaintext: true\ntoken_file: /from/file\ninterval_seconds: 10\nlabels: {zone: z1}\n")
    cfg = load_config(AgentConfig, p, env={"EPTWATCH_TOKEN_FILE": "/from/env"}, flags={"interval_seconds": 5.0},
                      secret_paths=("token_file",))
    assert cfg.token_file == "/from/env" and cfg.interval_seconds == 5.0 and cfg.server == "a:1" and cfg.labels == {"zone": "z1"}
    with pytest.raises(ConfigError, match="server"):
        load_config(AgentConfig, None, flags={"insecure_plaintext": True})


def _persisted_dropped_total(path: Path) -> int:
    """The `meta` row, read straight from the file (not through the Spool under test)."""
    db = sqlite3.connect(path)
    try:
        (value,) = db.execute("SELECT value FROM meta WHERE key='dropped_total'").fetchone()
        return int(value)
    finally:
        db.close()


def test_spool_drop_count_is_durable_and_read_without_the_database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "s.db"
    s = Spool(path, max_bytes=250, max_age_seconds=3600)
    for _ in range(5):
        s.append(lambda seq: b"x" * 100)
    assert s.dropped_total == _persisted_dropped_total(path) == 3
    s.close()
    s = Spool(path, max_bytes=250, max_age_seconds=3600)
    assert s.dropped_total == 3  # loaded from the file at open
    # A transaction that drops and then fails is rolled back: neither the count in memory nor the
    # row may keep the drop (the real bound check runs, then the append fails after it).
    real_enforce = s._enforce_bounds

    def enforce_then_fail(held_bytes: int) -> int:
        assert real_enforce(held_bytes) == 1  # one more 100-byte report would exceed 250 bytes
        raise RuntimeError("failed after the drop")

    monkeypatch.setattr(s, "_enforce_bounds", enforce_then_fail)
    with pytest.raises(RuntimeError, match="failed after the drop"):
        s.append(lambda seq: b"y" * 100)
    monkeypatch.undo()
    assert s.dropped_total == _persisted_dropped_total(path) == 3
    assert s.stats().depth == 2 and s.stats().bytes == 200  # the dropped report is back, the new one is not
    # Read without the database: the delivery task reads the count for every message while a sample's
    # append holds the spool's lock through its fsync; it must neither wait for that lock nor query.
    got: list[int] = []
    with s._lock:
        reader = threading.Thread(target=lambda: got.append(s.dropped_total))
        reader.start()
        reader.join(5)
        assert got == [3], "dropped_total waited for the spool's lock"
    s.close()
    assert s.dropped_total == 3  # the connection is closed: a query would raise sqlite3.ProgrammingError


def test_delivery_survives_an_unexpected_error_and_says_so(tmp_path: Path) -> None:
    """A failure outside gRPC (here: building the channel; in life e.g. sqlite3.Error from the spool)
    must not end delivery quietly while the agent keeps sampling: it is logged and retried."""
    from eptwatch.agent.uplink.delivery import Delivery, DeliveryConfig

    spool = Spool(tmp_path / "s.db", 10**6, 3600)
    attempts = 0

    def broken_channel():  # type: ignore[no-untyped-def]
        nonlocal attempts
        attempts += 1
        raise RuntimeError("no channel today")

    async def run() -> Delivery:
        d = Delivery(DeliveryConfig(target="127.0.0.1:1", backoff_initial_seconds=0.01, backoff_max_seconds=0.02), spool, broken_channel)
        stopping = asyncio.Event()
        asyncio.get_running_loop().call_later(0.3, stopping.set)
        await asyncio.wait_for(d.run(stopping), 5)
        return d

    d = asyncio.run(run())
    assert attempts >= 2  # retried, not ended by the first failure
    assert "RuntimeError: no channel today" in d.counters.last_error
    spool.close()
