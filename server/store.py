"""Durable aggregator state: SQLite in WAL mode, written by one thread with group commit.

Exactly-once application: an agent instance numbers its reports 1, 2, 3, ... and sends them in order
(resending from its oldest unacknowledged one after a reconnect), so a per-(host, instance) high-water
mark decides "new" versus "duplicate". The mark, the applied count and the host's latest report are
updated in one transaction, and a report is acknowledged only after that transaction commits: an
acknowledged report survives a SIGKILL, and a report that was not acknowledged is sent again and
applied then.

Group commit: stream handlers enqueue batches; the writer thread takes everything queued, applies it
in one transaction and one fsync, then wakes every waiter. Under load, batches grow and the fsync cost
is shared. The writer waits `commit_delay_seconds` after a transaction's first batch for more to
join it (0: a lone report commits at once).
"""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eptwatch.v1 import ingest_pb2, report_pb2

if TYPE_CHECKING:
    from .query import ReportReader

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS agents (
    host_id TEXT NOT NULL,
    agent_instance TEXT NOT NULL,
    last_sequence INTEGER NOT NULL,
    applied_total INTEGER NOT NULL,
    spool_dropped_total INTEGER NOT NULL DEFAULT 0,
    last_seen REAL NOT NULL,
    PRIMARY KEY (host_id, agent_instance)
);
CREATE TABLE IF NOT EXISTS hosts (
    host_id TEXT PRIMARY KEY,
    agent_instance TEXT NOT NULL,
    sequence INTEGER NOT NULL,
    sample_time REAL NOT NULL,
    received REAL NOT NULL,
    report BLOB NOT NULL
);
"""


@dataclass(frozen=True)
class Incoming:
    report: report_pb2.HostReport
    # The report serialised, as stored. None: the writer serialises it, and only if it becomes the
    # host's stored latest report (in a replayed backlog, most are superseded within the transaction).
    payload: bytes | None = None
    spool_dropped_total: int = 0


@dataclass(frozen=True)
class AgentRecord:
    host_id: str
    agent_instance: str
    last_sequence: int
    applied_total: int
    spool_dropped_total: int
    last_seen: float


@dataclass(frozen=True)
class StoredHost:
    host_id: str
    agent_instance: str
    sequence: int
    sample_time: float
    received: float
    report: report_pb2.HostReport


@dataclass(frozen=True)
class ApplyResult:
    status: int  # ingest_pb2.AckStatus
    became_latest: bool  # this report is now the host's latest state


def sample_seconds(report: report_pb2.HostReport) -> float:
    return report.sample_time.seconds + report.sample_time.nanos / 1e9


class Store:
    """Owns the SQLite file. `apply` is awaited from the event loop; all SQL runs on the writer thread."""

    def __init__(self, state_dir: Path, synchronous: str = "FULL", max_batch: int = 2000,
                 commit_delay_seconds: float = 0.0) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.path = state_dir / "eptwatch.sqlite3"
        if synchronous not in ("FULL", "NORMAL", "EXTRA"):
            raise ValueError(f"synchronous: expected FULL, NORMAL or EXTRA, got {synchronous!r}")
        self._synchronous = synchronous
        self._max_batch = max_batch
        if not 0.0 <= commit_delay_seconds <= 1.0:
            raise ValueError(f"commit delay: expected 0 to 1 s, got {commit_delay_seconds!r}")
        self._commit_delay = commit_delay_seconds
        self._queue: queue.Queue[tuple[list[Incoming], asyncio.AbstractEventLoop, asyncio.Future[list[ApplyResult]]] | None] = queue.Queue()
        self._marks: dict[tuple[str, str], int] = {}
        self._latest: dict[str, float] = {}  # host -> sample_time of its stored report (writer thread)
        self._thread: threading.Thread | None = None
        self._conn = self._connect()
        self.commits_total = 0
        self.reports_committed_total = 0

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed transaction survives power loss, not just a process kill.
        conn.execute(f"PRAGMA synchronous={self._synchronous}")
        conn.executescript(_SCHEMA)
        row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if row is None:
            conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        elif int(row[0]) != SCHEMA_VERSION:
            raise RuntimeError(f"{self.path}: schema version {row[0]}, this aggregator understands {SCHEMA_VERSION}")
        return conn

    # --- loading (before serving) ---

    def load_hosts(self) -> list[StoredHost]:
        out = []
        for host_id, inst, seq, st, rcv, blob in self._conn.execute(
            "SELECT host_id, agent_instance, sequence, sample_time, received, report FROM hosts"
        ):
            r = report_pb2.HostReport()
            r.ParseFromString(blob)
            out.append(StoredHost(host_id, inst, seq, st, rcv, r))
        return out

    def load_agents(self) -> list[AgentRecord]:
        rows = self._conn.execute(
            "SELECT host_id, agent_instance, last_sequence, applied_total, spool_dropped_total, last_seen FROM agents"
        ).fetchall()
        return [AgentRecord(*r) for r in rows]

    def report_reader(self) -> ReportReader:
        """Read-only connections beside the writer (WAL), for a host's full latest report."""
        from .query import ReportReader  # query builds on the store, not the other way round

        return ReportReader(self.path)

    # --- the writer thread ---

    def start(self) -> None:
        for host_id, inst, last in self._conn.execute("SELECT host_id, agent_instance, last_sequence FROM agents"):
            self._marks[(host_id, inst)] = last
        for host_id, st in self._conn.execute("SELECT host_id, sample_time FROM hosts"):
            self._latest[host_id] = st
        self._thread = threading.Thread(target=self._run, name="eptwatch-store-writer", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        self._conn.close()

    def submit(self, items: Sequence[Incoming]) -> asyncio.Future[list[ApplyResult]]:
        """Queue `items` for the next transaction; the future resolves (await it) once it has committed."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[list[ApplyResult]] = loop.create_future()
        self._queue.put((list(items), loop, fut))
        return fut

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            jobs = [first]
            count = len(first[0])
            stop = False
            if self._commit_delay:
                # Group commit (like PostgreSQL's commit_delay): under a light load each commit would hold
                # a report or two; waiting a little lets one fsync and one wake-up serve more of them.
                # (Under a heavy load the wait costs latency only: the batch is capped at _max_batch.)
                time.sleep(self._commit_delay)
            while count < self._max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                jobs.append(nxt)
                count += len(nxt[0])
            try:
                results = self._commit([j[0] for j in jobs])
            except BaseException as exc:  # noqa: BLE001 - every waiter must hear of the failure
                _wake(jobs, [exc] * len(jobs), _set_exception)
            else:
                _wake(jobs, results, _set_result)
            if stop:
                return

    def _commit(self, batches: list[list[Incoming]]) -> list[list[ApplyResult]]:
        """One transaction for everything queued. Per (host, instance) one agents row and per host one
        hosts row are written, however many of its reports the transaction holds; the results are the
        same as applying the reports one by one in order."""
        now = time.time()
        marks: dict[tuple[str, str], int] = {}  # changes to self._marks, kept only if the transaction commits
        latest: dict[str, float] = {}  # likewise for self._latest
        agents: dict[tuple[str, str], list[int]] = {}  # key -> [last_sequence, applied, spool_dropped_total]
        hosts: dict[str, tuple[Incoming, float]] = {}  # host -> the report to store and its sample time
        known_marks, known_latest = self._marks, self._latest
        applied = ApplyResult(ingest_pb2.ACK_STATUS_APPLIED, False)
        applied_latest = ApplyResult(ingest_pb2.ACK_STATUS_APPLIED, True)
        duplicate = ApplyResult(ingest_pb2.ACK_STATUS_DUPLICATE, False)
        results: list[list[ApplyResult]] = []
        for batch in batches:
            res: list[ApplyResult] = []
            for item in batch:
                r = item.report
                host, seq = r.host_id, r.sequence
                key = (host, r.agent_instance)
                last = marks.get(key)
                if last is None:
                    last = known_marks.get(key, 0)
                if seq <= last:
                    res.append(duplicate)
                    continue
                marks[key] = seq
                a = agents.get(key)
                if a is None:
                    agents[key] = [seq, 1, item.spool_dropped_total]
                else:
                    a[0] = seq
                    a[1] += 1
                    if item.spool_dropped_total > a[2]:
                        a[2] = item.spool_dropped_total
                st = sample_seconds(r)
                cur = latest.get(host)
                if cur is None:
                    cur = known_latest.get(host)
                # The hosts row keeps the report with the newest sample time (ties: the later one).
                if cur is None or st >= cur:
                    latest[host] = st
                    hosts[host] = (item, st)
                    res.append(applied_latest)
                else:
                    res.append(applied)
            results.append(res)
        if not agents:
            return results  # duplicates only: nothing to write
        host_rows = []
        for host, (item, st) in hosts.items():
            r = item.report
            payload = item.payload if item.payload is not None else r.SerializeToString()
            host_rows.append((host, r.agent_instance, r.sequence, st, now, payload))
        c = self._conn
        c.execute("BEGIN IMMEDIATE")
        try:
            c.executemany(
                "INSERT INTO agents VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(host_id, agent_instance) DO UPDATE SET "
                "last_sequence=excluded.last_sequence, applied_total=applied_total+excluded.applied_total, "
                "spool_dropped_total=max(spool_dropped_total, excluded.spool_dropped_total), last_seen=excluded.last_seen",
                [(h, i, seq, n, dropped, now) for (h, i), (seq, n, dropped) in agents.items()],
            )
            c.executemany(
                "INSERT INTO hosts VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(host_id) DO UPDATE SET "
                "agent_instance=excluded.agent_instance, sequence=excluded.sequence, sample_time=excluded.sample_time, "
                "received=excluded.received, report=excluded.report WHERE excluded.sample_time >= hosts.sample_time",
                host_rows,
            )
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise
        known_marks.update(marks)
        known_latest.update(latest)
        self.commits_total += 1
        self.reports_committed_total += sum(len(b) for b in batches)
        return results


def _wake(jobs: list[tuple[list[Incoming], asyncio.AbstractEventLoop, asyncio.Future[list[ApplyResult]]]],
          values: list, setter: Callable[[asyncio.Future[list[ApplyResult]], Any], None]) -> None:
    """Resolve every job's future on its own loop: one wake-up per loop, not one per job."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[list[ApplyResult]], Any]]] = {}
    for (_, loop, fut), value in zip(jobs, values):
        by_loop.setdefault(loop, []).append((fut, value))
    for loop, pairs in by_loop.items():
        try:
            loop.call_soon_threadsafe(_resolve, pairs, setter)
        except RuntimeError:
            pass  # that loop is closed: nobody is waiting any more


def _resolve(pairs: list[tuple[asyncio.Future[list[ApplyResult]], Any]],
             setter: Callable[[asyncio.Future[list[ApplyResult]], Any], None]) -> None:
    for fut, value in pairs:
        setter(fut, value)


def _set_result(fut: asyncio.Future[list[ApplyResult]], value: list[ApplyResult]) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future[list[ApplyResult]], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
