"""Adversarial uplink cases: a full disk under the spool, a rewound spool, a read that never returns.

The full-disk cases mount a small tmpfs of their own (skipped, with the reason, where mounting is not
permitted) and drive the real Spool and Delivery against a real aggregator on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import shutil
import sqlite3
import subprocess
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry

from eptwatch.agent.faces.daemon import AgentConfig, AgentDaemon
from eptwatch.agent.faces.metrics import AgentCollector, AgentState
from eptwatch.agent.uplink.delivery import Delivery, DeliveryConfig
from eptwatch.agent.uplink.spool import Spool
from eptwatch.v1 import ingest_pb2, ingest_pb2_grpc
from eptwatch.v1 import report_pb2 as pb

from .conftest import FIXTURES, sampled_report_bytes
from .procs import Aggregator, Proc, agent_args, http_get, spool_state

INSECURE = ["--insecure-plaintext", "--insecure-no-auth"]
HOST = "hv-disk-1"


# --- helpers ---

@contextlib.contextmanager
def small_tmpfs(size: str = "2m") -> Iterator[Path]:
    """A tmpfs of `size` mounted for this test only."""
    mnt = Path(tempfile.mkdtemp(prefix="eptwatch-tmpfs-"))
    try:
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(mnt)],
                             capture_output=True, text=True)
    except FileNotFoundError:
        mnt.rmdir()
        pytest.skip("no mount(8) here: cannot make a small tmpfs for the full-disk cases")
    if res.returncode != 0:
        mnt.rmdir()
        pytest.skip(f"mounting a tmpfs is not permitted here ({res.stderr.strip() or res.returncode}): full-disk cases need it")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        mnt.rmdir()


def fill_disk(filler: Path) -> Path:
    """Write to `filler` (made beforehand: a full disk may refuse even a new name) until the filesystem
    refuses another byte."""
    with open(filler, "ab", buffering=0) as fh:  # unbuffered: nothing left to fail at close
        for chunk in (65536, 4096, 512, 1):
            while True:
                try:
                    fh.write(b"\0" * chunk)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break
    return filler


def report_bytes(seq: int, instance: str, host: str = HOST) -> bytes:
    r = pb.HostReport.FromString(sampled_report_bytes("linux-5.3-unfixed"))
    r.sequence, r.agent_instance, r.host_id = seq, instance, host
    r.sample_time.FromNanoseconds(time.time_ns())
    return r.SerializeToString()


def on_disk(path: Path) -> tuple[list[int], int, int]:
    """(sequences held, their payload bytes, dropped_total) read with a connection of our own."""
    db = sqlite3.connect(path)
    try:
        seqs = [int(s) for (s,) in db.execute("SELECT seq FROM reports ORDER BY seq")]
        size = int(db.execute("SELECT coalesce(sum(size), 0) FROM reports").fetchone()[0])
        dropped = int(db.execute("SELECT value FROM meta WHERE key='dropped_total'").fetchone()[0])
        return seqs, size, dropped
    finally:
        db.close()


def real_file_bytes(path: Path) -> int:
    return sum(os.stat(f"{path}{s}").st_size for s in ("", "-wal", "-shm") if os.path.exists(f"{path}{s}"))


def agg_dropped(agg: Aggregator) -> dict[tuple[str, str], int]:
    db = sqlite3.connect(agg.workdir / "state" / "eptwatch.sqlite3")
    try:
        return {(h, i): int(n) for h, i, n in db.execute("SELECT host_id, agent_instance, spool_dropped_total FROM agents")}
    finally:
        db.close()


def server_duplicates(agg: Aggregator) -> float:
    for line in http_get(agg.http + "/metrics").splitlines():
        if line.startswith("eptwatch_server_reports_total{") and 'result="duplicate"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# A delivery whose counters (sent, acked, reconnects, ...) change in none of this many polls is stuck,
# however loaded the machine: the guard asserts progress, not speed.
STALL_POLLS = 1200


async def _poll(cond, d: Delivery, task: asyncio.Task[None]) -> None:  # type: ignore[no-untyped-def]
    """Poll `cond()` while `d` runs as `task`; fail if the task ends or the delivery stops progressing."""
    last, still = repr(d.counters), 0
    while not await asyncio.to_thread(cond):
        assert not task.done(), task
        now = repr(d.counters)
        still = still + 1 if now == last else 0
        last = now
        assert still < STALL_POLLS, f"condition not met and the delivery made no progress: {d.counters}"
        await asyncio.sleep(0.05)


async def deliver_until(d: Delivery, cond) -> None:  # type: ignore[no-untyped-def]
    """Run delivery until `cond()` holds."""
    stopping = asyncio.Event()
    task = asyncio.create_task(d.run(stopping))
    try:
        await _poll(cond, d, task)
    finally:
        stopping.set()
        await asyncio.wait_for(task, 30)


async def wait_async(cond, d: Delivery, task: asyncio.Task[None]) -> None:  # type: ignore[no-untyped-def]
    await _poll(cond, d, task)


def fast(target: str) -> DeliveryConfig:
    return DeliveryConfig(target=target, backoff_initial_seconds=0.05, backoff_max_seconds=0.2)


def insecure(target: str):  # type: ignore[no-untyped-def]
    return lambda: grpc.aio.insecure_channel(target)


# --- full disk ---

def test_full_disk_drops_oldest_counted_once_then_acks_apply_and_nothing_is_resent(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with small_tmpfs("2m") as mnt:
        path = mnt / "spool.sqlite3"
        (mnt / "filler").touch()
        spool = Spool(path, max_bytes=10**9, max_age_seconds=3600)  # only the disk bounds it
        assert spool.reserve_path.stat().st_size == 256 * 1024
        created = 0
        # Samples while the disk is full: every append succeeds, the oldest make room.
        while spool.dropped_total == 0 or created < 400:
            seq = spool.append(lambda n: report_bytes(n, spool.agent_instance))
            created += 1
            assert seq == created
            assert created < 5000, "the 2 MiB disk never filled"
        seqs, size, dropped_on_disk = on_disk(path)
        st = spool.stats()
        # Counted once and exactly: what is held plus what was counted dropped is what was made, and
        # the dropped ones are exactly the oldest.
        assert dropped_on_disk == spool.dropped_total == created - len(seqs) > 0
        assert seqs == list(range(created - len(seqs) + 1, created + 1))
        # The byte gauges are true: the table's payload bytes and the files' real sizes.
        assert st.depth == len(seqs) and st.bytes == size
        assert st.file_bytes == real_file_bytes(path)
        assert st.file_bytes < 2 * 1024 * 1024

        # Now the disk is full to the last byte (something else wrote to it), and the aggregator is back.
        filler = fill_disk(mnt / "filler")
        agg = Aggregator(tmp_path / "agg", INSECURE).start()
        try:
            d = Delivery(fast(agg.target), spool, insecure(agg.target))
            seen: dict[str, float] = {}

            async def scenario() -> None:
                stopping = asyncio.Event()
                task = asyncio.create_task(d.run(stopping))
                try:
                    await wait_async(lambda: spool.stats().depth == 0, d, task)
                    # Acks were applied on the full disk: every held report left the spool, sent once each.
                    assert on_disk(path)[0] == []
                    assert d.counters.reports_sent_total == len(seqs) == d.counters.reports_acked_total
                    assert agg.applied()[(HOST, spool.agent_instance)] == (created, len(seqs))
                    seen["duplicates"] = server_duplicates(agg)
                    # More samples (room again: the acked reports' pages are free) are delivered.
                    for _ in range(5):
                        await asyncio.to_thread(spool.append, lambda n: report_bytes(n, spool.agent_instance))
                        d.notify()
                    await wait_async(lambda: agg.applied()[(HOST, spool.agent_instance)][1] == len(seqs) + 5, d, task)
                finally:
                    stopping.set()
                    await asyncio.wait_for(task, 30)

            asyncio.run(scenario())
            assert agg.applied()[(HOST, spool.agent_instance)] == (created + 5, len(seqs) + 5)
            assert spool.stats().depth == 0
            # Nothing acked was resent: the aggregator saw no duplicate (a new stream's first message may
            # repeat the newest acked report to a replica; one stream here, so none).
            assert seen["duplicates"] == 0 == server_duplicates(agg)
            assert d.counters.reports_sent_total == len(seqs) + 5
            # The count of lost samples reached the aggregator, exactly.
            assert agg_dropped(agg) == {(HOST, spool.agent_instance): dropped_on_disk}
            assert "cannot rollback" not in caplog.text and "delivery failed unexpectedly" not in caplog.text
            # Freeing space later invents no drops.
            filler.unlink()
            spool.append(lambda n: report_bytes(n, spool.agent_instance))
            assert spool.dropped_total == dropped_on_disk == on_disk(path)[2]
        finally:
            agg.proc.kill9()  # type: ignore[union-attr]
            spool.close()


def test_acked_reports_are_never_handed_out_again_while_the_disk_refuses_their_delete(tmp_path: Path) -> None:
    with small_tmpfs("2m") as mnt:
        path = mnt / "spool.sqlite3"
        spool = Spool(path, max_bytes=10**9, max_age_seconds=3600, reserve_bytes=0)  # no reserve: the DELETE must fail
        for _ in range(10):
            spool.append(lambda n: report_bytes(n, spool.agent_instance))
        spool._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # an empty WAL: a DELETE needs new disk space
        (mnt / "filler").touch()
        filler = fill_disk(mnt / "filler")
        spool.ack([1, 2, 3])
        assert on_disk(path)[0] == list(range(1, 11)), "the DELETE unexpectedly found room on a full disk"
        assert [s for s, _ in spool.pending(0, 100, 10**9)] == list(range(4, 11))  # never resent
        assert spool.stats().depth == 7
        filler.unlink()
        spool.append(lambda n: report_bytes(n, spool.agent_instance))  # retries the DELETE first
        assert on_disk(path)[0] == list(range(4, 12))
        assert spool.dropped_total == 0 == on_disk(path)[2]  # acked reports are never counted as drops
        spool.close()


def test_a_report_that_fits_nowhere_is_counted_and_raises_no_sqlite_error(tmp_path: Path) -> None:
    from eptwatch.agent.uplink.spool import SpoolFull

    with small_tmpfs("2m") as mnt:
        spool = Spool(mnt / "spool.sqlite3", max_bytes=10**9, max_age_seconds=3600)
        with pytest.raises(SpoolFull, match="report is lost"):
            spool.append(lambda n: os.urandom(3 * 1024 * 1024))  # larger than the whole disk
        assert spool.dropped_total == 1 == on_disk(mnt / "spool.sqlite3")[2]
        assert spool.stats().depth == 0 and spool.stats().bytes == 0
        assert spool.append(lambda n: b"small") == 1  # the spool still works
        spool.close()


# --- rewound spool ---

class RewindingIngest(ingest_pb2_grpc.IngestServicer):
    """An aggregator that already holds sequences up to `marks[(host, instance)]` and acks like the real one."""

    def __init__(self, marks: dict[tuple[str, str], int]) -> None:
        self.marks = marks
        self.received: list[tuple[str, int, int]] = []  # (instance, sequence, status)

    async def Stream(self, request_iterator: AsyncIterator[ingest_pb2.AgentMessage], context: grpc.aio.ServicerContext
                     ) -> AsyncIterator[ingest_pb2.ServerMessage]:
        async for msg in request_iterator:
            if not msg.reports:
                continue
            out = ingest_pb2.ServerMessage()
            for r in msg.reports:
                key = (r.host_id, r.agent_instance)
                mark = self.marks.get(key, 0)
                ack = out.acks.add(host_id=r.host_id, agent_instance=r.agent_instance, sequence=r.sequence)
                if r.sequence <= mark:
                    ack.status, ack.high_water_sequence = ingest_pb2.ACK_STATUS_DUPLICATE, mark
                else:
                    ack.status = ingest_pb2.ACK_STATUS_APPLIED
                    self.marks[key] = r.sequence
                self.received.append((r.agent_instance, r.sequence, ack.status))
            yield out


def test_rewound_spool_starts_a_new_instance_on_a_duplicate_ack_with_a_high_water_mark(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    spool = Spool(tmp_path / "s.db", 10**6, 3600)
    old = spool.agent_instance
    for _ in range(3):
        spool.append(lambda n: report_bytes(n, spool.agent_instance))
    # The aggregator holds up to 20 of this instance: the spool was restored from an older snapshot.
    servicer = RewindingIngest({(HOST, old): 20})

    async def scenario() -> Delivery:
        server = grpc.aio.server()
        ingest_pb2_grpc.add_IngestServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            target = f"127.0.0.1:{port}"
            d = Delivery(fast(target), spool, insecure(target))
            await deliver_until(d, lambda: spool.stats().depth == 0)
            return d
        finally:
            await server.stop(None)

    with caplog.at_level(logging.WARNING):
        d = asyncio.run(scenario())
    new = spool.agent_instance
    assert new != old and d.counters.instance_restarts_total == 1
    # The three reports were first acked DUPLICATE under the old instance, then applied under the new one.
    assert [(i, s) for i, s, st in servicer.received if st == ingest_pb2.ACK_STATUS_APPLIED] == [(new, 1), (new, 2), (new, 3)]
    assert {(i, st) for i, _, st in servicer.received if i == old} == {(old, ingest_pb2.ACK_STATUS_DUPLICATE)}
    assert "spool was rewound" in caplog.text and new in caplog.text
    # Exported: the restart, and the spool's real size on disk.
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(AgentState(delivery=d.counters, spool=spool)))
    assert registry.get_sample_value("eptwatch_agent_instance_restarts_total") == 1
    assert registry.get_sample_value("eptwatch_agent_spool_file_bytes") == real_file_bytes(tmp_path / "s.db") > 0
    # Reports made afterwards carry the new instance, and a reopened spool keeps it.
    spool.append(lambda n: report_bytes(n, spool.agent_instance))
    spool.close()
    reopened = Spool(tmp_path / "s.db", 10**6, 3600)
    assert reopened.agent_instance == new
    assert [pb.HostReport.FromString(p).agent_instance for _, p in reopened.pending(0, 10, 10**9)] == [new]
    reopened.close()


def test_an_ordinary_duplicate_does_not_start_a_new_instance(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db", 10**6, 3600)
    for _ in range(3):
        spool.append(lambda n: report_bytes(n, spool.agent_instance))
    # A resend after a lost ack: the aggregator holds 2 of 3; the mark is below our next sequence (4).
    assert spool.restart_instance(2) is None and spool.restart_instance(3) is None
    inst = spool.agent_instance
    assert spool.restart_instance(4) is not None and spool.agent_instance != inst
    spool.close()


def _server_sets_high_water(agg: Aggregator) -> bool:
    async def probe() -> int:
        async with grpc.aio.insecure_channel(agg.target) as ch:
            call = ingest_pb2_grpc.IngestStub(ch).Stream(timeout=15)
            r = pb.HostReport.FromString(report_bytes(1, "probe-instance", host="hv-probe"))
            for _ in range(2):
                await call.write(ingest_pb2.AgentMessage(reports=[r]))
                reply = await call.read()
            await call.done_writing()
            assert reply.acks[0].status == ingest_pb2.ACK_STATUS_DUPLICATE
            return int(reply.acks[0].high_water_sequence)

    return asyncio.run(probe()) == 1


def test_rewound_spool_against_the_real_aggregator(tmp_path: Path) -> None:
    agg = Aggregator(tmp_path / "agg", INSECURE).start()
    try:
        if not _server_sets_high_water(agg):
            pytest.skip("this aggregator does not set ReportAck.high_water_sequence on DUPLICATE acks yet "
                        "(the ingest hardening branch adds it); the agent side is covered by the fake-ack test")
        path = tmp_path / "s.db"
        spool = Spool(path, 10**6, 3600)
        old = spool.agent_instance
        for _ in range(10):
            spool.append(lambda n: report_bytes(n, spool.agent_instance))
        d = Delivery(fast(agg.target), spool, insecure(agg.target))
        asyncio.run(deliver_until(d, lambda: spool.stats().depth == 0))
        spool.close()
        # Rewind: the meta row is rewritten as a restored snapshot would have it.
        db = sqlite3.connect(path)
        db.execute("UPDATE meta SET value='4' WHERE key='next_sequence'")
        db.commit()
        db.close()
        spool = Spool(path, 10**6, 3600)
        for _ in range(3):
            spool.append(lambda n: report_bytes(n, spool.agent_instance))  # 4, 5, 6: new samples, old numbers
        d = Delivery(fast(agg.target), spool, insecure(agg.target))
        asyncio.run(deliver_until(d, lambda: spool.stats().depth == 0))
        new = spool.agent_instance
        assert new != old and d.counters.instance_restarts_total == 1
        applied = agg.applied()
        assert applied[(HOST, old)] == (10, 10)
        assert applied[(HOST, new)] == (6, 3)  # the three new samples, applied, not swallowed as duplicates
        spool.close()
    finally:
        agg.proc.kill9()  # type: ignore[union-attr]


# --- SIGTERM while a read blocks ---

def test_daemon_stops_while_a_sample_is_stuck_and_logs_where(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = AgentConfig(server="127.0.0.1:1", insecure_plaintext=True, root=str(FIXTURES / "linux-5.3-unfixed"),
                      spool_path=str(tmp_path / "s.db"), metrics_listen="", interval_seconds=0.05)
    daemon = AgentDaemon(cfg)
    entered, release = threading.Event(), threading.Event()

    class StuckSampler:
        def sample(self):  # type: ignore[no-untyped-def]
            entered.set()
            release.wait()  # a read that does not return (a FIFO, a hung mount)
            raise AssertionError("unreachable in the test's lifetime")

    daemon.sampler = StuckSampler()  # type: ignore[assignment]

    async def scenario() -> int:
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        threading.Thread(target=lambda: entered.wait(30) and loop.call_soon_threadsafe(stopping.set), daemon=True).start()
        return await asyncio.wait_for(daemon.run(stopping), 60)

    try:
        with caplog.at_level(logging.INFO):
            assert asyncio.run(scenario()) == 0
        assert entered.is_set()
        assert "did not return" in caplog.text and "release.wait()" in caplog.text  # the stuck frame
        assert daemon.spool.stats().depth == 0  # closed: nothing was spooled by the stuck sample
    finally:
        release.set()


def test_sigterm_stops_run_while_smaps_is_a_fifo(tmp_path: Path) -> None:
    root = tmp_path / "host"
    shutil.copytree(FIXTURES / "linux-5.3-unfixed", root, symlinks=True)
    fifos = []
    for name in ("smaps", "smaps_rollup"):
        f = root / "proc" / "4242" / name
        f.unlink()
        os.mkfifo(f)
        fifos.append(f)
    spool = tmp_path / "spool.sqlite3"
    args = agent_args("127.0.0.1:1", spool, "hv-fifo", extra=["--insecure-plaintext"])
    args[args.index("--root") + 1] = str(root)
    proc = Proc(args, tmp_path / "agent.log").start()
    writers: list[int] = []
    try:
        # Wait until the agent is blocked reading a FIFO (it holds it open for reading: a non-blocking
        # writer can open it), or has spooled a sample (a reader that refuses FIFOs never blocks).
        deadline = time.monotonic() + 60
        blocked = False
        while not blocked and time.monotonic() < deadline:
            assert proc.popen is not None and proc.popen.poll() is None, proc.output()
            for f in fifos:
                try:
                    writers.append(os.open(f, os.O_WRONLY | os.O_NONBLOCK))  # kept open: the read now waits for data
                    blocked = True
                    break
                except OSError as exc:
                    assert exc.errno == errno.ENXIO  # no reader yet
            if not blocked and spool.exists():
                with contextlib.suppress(sqlite3.Error, KeyError):
                    if spool_state(spool)[1] >= 1:
                        break
            time.sleep(0.02)
        else:
            if not blocked:
                raise AssertionError(f"the agent neither blocked on the FIFO nor spooled a sample: {proc.output()}")
        if blocked:
            # The handler is installed before sampling starts; the read is stuck now.
            assert re.search(r"agent instance \w+ streaming", proc.output()), proc.output()
        assert proc.popen is not None
        proc.popen.send_signal(15)
        code = proc.popen.wait(60)  # a hang guard only, not a time limit
        assert code == 0, proc.output()
        if blocked:
            assert "did not return" in proc.output()
    finally:
        for fd in writers:
            os.close(fd)
        proc.kill9()
