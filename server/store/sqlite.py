"""Durable aggregator state: SQLite in WAL mode, written by one thread with group commit.

Exactly-once application: an agent instance numbers its reports 1, 2, 3, ... and sends them in order
(resending from its oldest unacknowledged one after a reconnect), so a per-(host, instance) high-water
mark decides "new" versus "duplicate". The mark, the applied count and the host's latest report are
updated in one transaction, and a report is acknowledged only after that transaction commits: an
acknowledged report survives a SIGKILL, and a report that was not acknowledged is sent again and
applied then.

Group commit: stream handlers enqueue batches; the writer thread takes everything queued, applies it
in one transaction and one fsync, then wakes every waiter. Under load, batches grow and the fsync cost
is shared. The writer waits after a transaction's first batch for more to join it: `gather_delay_seconds`
while no queued message's sender waits on its ack, `commit_delay_seconds` once one does
(`GroupCommitWriter`; 0 and 0: a lone report commits at once).

Failure isolation: if a group's transaction fails for a reason that may lie in one report (a value
SQLite cannot hold, say), the group is retried one message at a time and a failing message one report
at a time, so that only the culprit is refused (REJECTED with the error) and every other report is
applied and acknowledged. A failure of the database itself (disk full, I/O error) is no report's
fault: every waiter gets a StoreError naming it, and nothing is acknowledged.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from pathlib import Path

from eptwatch.server.store.commit import (
    DATABASE,
    DISK_FULL,
    REPORT,
    AgentRecord,
    ApplyResult,
    GroupCommitWriter,
    Incoming,
    Job,
    QueuedWrites,
    StoredHost,
    StoreError,
    plan_commit,
    set_exception,
    set_result,
    wake_waiters,
)
from eptwatch.v1 import ingest_pb2, report_pb2

log = logging.getLogger("eptwatch.server.store.sqlite")

_SQLITE_FULL = 13


def _store_error(exc: sqlite3.Error) -> StoreError:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None and code & 0xFF == _SQLITE_FULL or "database or disk is full" in str(exc):
        return StoreError(DISK_FULL, f"disk full: the aggregator's state could not be written ({exc})")
    return StoreError(DATABASE, f"state database error: {exc}")

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


class Store(GroupCommitWriter):
    """Owns the SQLite file. `apply` is awaited from the event loop; all SQL runs on the writer thread."""

    def __init__(self, state_dir: Path, synchronous: str = "FULL", max_batch: int = 2000,
                 commit_delay_seconds: float = 0.0, gather_delay_seconds: float = 0.0) -> None:
        if synchronous not in ("FULL", "NORMAL", "EXTRA"):
            raise ValueError(f"synchronous: expected FULL, NORMAL or EXTRA, got {synchronous!r}")
        # SimpleQueue: a put from the event loop costs a tenth of queue.Queue's (no Condition in Python).
        self._init_writer(max_batch, commit_delay_seconds, gather_delay_seconds)
        state_dir.mkdir(parents=True, exist_ok=True)
        self.path = state_dir / "eptwatch.sqlite3"
        self._synchronous = synchronous
        self._marks: dict[tuple[str, str], int] = {}
        self._latest: dict[str, float] = {}  # host -> sample_time of its stored report (writer thread)
        self._instances: dict[str, str] = {}  # host -> agent instance of its stored report (writer thread)
        self._conn = self._connect()
        self.commits_total = 0
        self.reports_committed_total = 0
        self.commit_failures_total: dict[str, int] = {}  # by reason: DISK_FULL, DATABASE, REPORT

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
            try:
                r.ParseFromString(blob)
            except Exception as exc:  # noqa: BLE001 - one corrupt row costs only its host (shown invalid)
                r = report_pb2.HostReport(host_id=host_id, agent_instance=inst)
                out.append(StoredHost(host_id, inst, seq, st, rcv, r, f"stored report does not decode: {str(exc)[:200]}"))
                continue
            out.append(StoredHost(host_id, inst, seq, st, rcv, r))
        return out

    def load_agents(self) -> list[AgentRecord]:
        rows = self._conn.execute(
            "SELECT host_id, agent_instance, last_sequence, applied_total, spool_dropped_total, last_seen FROM agents"
        ).fetchall()
        return [AgentRecord(*r) for r in rows]

    def report_reader(self) -> ReportReader:
        """Read-only connections beside the writer (WAL), for a host's full latest report."""
        return ReportReader(self.path)

    # --- the writer thread ---

    def start(self) -> None:
        for host_id, inst, last in self._conn.execute("SELECT host_id, agent_instance, last_sequence FROM agents"):
            self._marks[(host_id, inst)] = last
        for host_id, st, inst in self._conn.execute("SELECT host_id, sample_time, agent_instance FROM hosts"):
            self._latest[host_id] = st
            self._instances[host_id] = inst
        self._start_writer("eptwatch-store-writer")

    def close(self) -> None:
        self._stop_writer()
        self._conn.close()

    def _commit_group(self, jobs: list[Job], count: int) -> None:
        values: list[list[ApplyResult] | BaseException]
        try:
            values = list(self._commit_isolated([j[0] for j in jobs]))
        except BaseException as exc:  # noqa: BLE001 - every waiter must hear of the failure
            values = [exc] * len(jobs)
        by_kind: dict[bool, list[int]] = {}
        for i, v in enumerate(values):
            by_kind.setdefault(isinstance(v, BaseException), []).append(i)
        for failed, idx in by_kind.items():
            wake_waiters([jobs[i] for i in idx], [values[i] for i in idx], set_exception if failed else set_result)

    def _failed(self, reason: str) -> None:
        self.commit_failures_total[reason] = self.commit_failures_total.get(reason, 0) + 1

    def _commit_isolated(self, batches: list[list[Incoming]]) -> list[list[ApplyResult] | BaseException]:
        """`_commit` of the whole group; if that fails for a reason that may be one report's, each
        message on its own, and a failing message's reports one by one (in order: the marks they
        leave are those of applying them in sequence). A StoreError fails every waiter still
        waiting: the database, not a report, is at fault."""
        try:
            return list(self._commit(batches))
        except StoreError as exc:
            self._failed(exc.reason)
            log.error("state store: %s: %d message(s) not stored, none acknowledged", exc, len(batches))
            return [exc] * len(batches)
        except Exception as exc:  # noqa: BLE001 - a report's value: find which one below
            log.warning("state store: a group commit of %d message(s) failed (%s: %s): retrying one message at a time",
                        len(batches), type(exc).__name__, exc)
        out: list[list[ApplyResult] | BaseException] = []
        for n, batch in enumerate(batches):
            try:
                if len(batches) > 1:
                    try:
                        out.append(self._commit([batch])[0])
                        continue
                    except StoreError:
                        raise
                    except Exception:  # noqa: BLE001 - this message holds the culprit
                        pass
                out.append(self._per_report(batch))
            except StoreError as exc:
                self._failed(exc.reason)
                log.error("state store: %s: %d message(s) not stored, none acknowledged", exc, len(batches) - n)
                out.extend([exc] * (len(batches) - n))
                break
        return out

    def _per_report(self, batch: list[Incoming]) -> list[ApplyResult]:
        """A message's reports in a transaction each; one that cannot be written is REJECTED."""
        res: list[ApplyResult] = []
        for item in batch:
            try:
                res.extend(self._commit([[item]])[0])
            except StoreError:
                raise
            except Exception as exc:  # noqa: BLE001 - this report is the culprit: it alone is refused
                self._failed(REPORT)
                r = item.report
                reason = f"could not be stored: {type(exc).__name__}: {exc}"[:500]
                log.warning("report %s/%s/%d %s", r.host_id[:80], r.agent_instance[:64], r.sequence, reason)
                res.append(ApplyResult(ingest_pb2.ACK_STATUS_REJECTED, False, reason=reason))
        return res

    def _commit(self, batches: list[list[Incoming]]) -> list[list[ApplyResult]]:
        """One transaction for everything queued. Per (host, instance) one agents row and per host one
        hosts row are written, however many of its reports the transaction holds; the results are the
        same as applying the reports one by one in order."""
        now = time.time()
        known_marks, known_latest = self._marks, self._latest
        plan = plan_commit(batches, self._marks, self._latest)
        results, marks, latest, agents, hosts = plan.results, plan.marks, plan.latest, plan.agents, plan.hosts
        if not agents:
            return results  # duplicates only: nothing to write
        host_rows = []
        for host, (item, st) in hosts.items():
            r = item.report
            payload = item.payload if item.payload is not None else r.SerializeToString()
            host_rows.append((host, r.agent_instance, r.sequence, st, now, payload))
        c = self._conn
        try:
            c.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise _store_error(exc) from exc
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
        except BaseException as exc:
            if c.in_transaction:  # SQLite may have rolled back itself (a full disk): then there is nothing to undo
                try:
                    c.execute("ROLLBACK")
                except sqlite3.Error as rollback_exc:
                    log.error("state store: rollback failed: %s", rollback_exc)
            if isinstance(exc, (sqlite3.OperationalError, sqlite3.DatabaseError)) and not isinstance(
                    exc, (sqlite3.IntegrityError, sqlite3.DataError)):
                raise _store_error(exc) from exc
            raise
        known_marks.update(marks)
        known_latest.update(latest)
        instances = self._instances
        for host, (item, _) in hosts.items():
            inst = item.report.agent_instance
            before = instances.get(host)
            if before != inst:
                instances[host] = inst
                if before is not None:  # a restarted agent, or one that moved on from a rewound spool
                    log.info("host %s: agent instance %s replaces %s", host[:80], inst[:64], before[:64])
        self.commits_total += 1
        self.reports_committed_total += sum(len(b) for b in batches)
        return results


_departed_log = logging.getLogger("eptwatch.server.store.sqlite")
_DEPARTED_SCHEMA = "CREATE TABLE IF NOT EXISTS departed (host_id TEXT PRIMARY KEY, departed_at REAL NOT NULL)"


class DepartedLog(QueuedWrites):
    """Which hosts departed (their agent closed its stream cleanly), durable across restarts, so that such a
    host comes back departed rather than fresh. Departures and returns are rare (agents stopping or
    rotating), so they are written by their own small thread on their own connection, never on the
    ingest path: `record` only queues. WAL lets this writer and the report writer take turns.
    A lost write (the process killed before it lands) costs only how one host is shown until it reports."""

    def __init__(self, db_path: Path, synchronous: str = "NORMAL") -> None:
        super().__init__()
        self.path = db_path
        self._conn = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False, timeout=30.0)
        self._conn.execute(f"PRAGMA synchronous={synchronous if synchronous in ('FULL', 'NORMAL', 'EXTRA') else 'NORMAL'}")
        self._conn.execute(_DEPARTED_SCHEMA)
        self.writes_failed_total = 0

    def load(self) -> dict[str, float]:
        """host -> when it departed."""
        return dict(self._conn.execute("SELECT host_id, departed_at FROM departed").fetchall())

    _thread_name = "eptwatch-departed-writer"

    def close(self) -> None:
        """Writes what is queued, then stops."""
        super().close()
        self._conn.close()

    def _write_batch(self, items: list[tuple[str, float | None]]) -> None:
        c = self._conn
        try:
            c.execute("BEGIN IMMEDIATE")
            try:
                for host_id, at in items:  # in order: a departure then a return leaves no row
                    if at is None:
                        c.execute("DELETE FROM departed WHERE host_id=?", (host_id,))
                    else:
                        c.execute("INSERT INTO departed VALUES (?, ?) ON CONFLICT(host_id) DO UPDATE SET departed_at=excluded.departed_at",
                                  (host_id, at))
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            self.writes_failed_total += 1
            _departed_log.warning("%s: %d departure(s) not recorded: %s", self.path, len(items), exc)


class ReportReader:
    """Reads a host's latest full report from the durable store: per-VM detail is not kept in memory.
    SQLite in WAL mode lets these read-only connections run beside the writer. The HTTP server runs each
    request on a new thread, so connections are pooled rather than kept per thread (one per request
    would be opened and left to the garbage collector)."""

    POOL = 4

    def __init__(self, db_path: Path) -> None:
        self.db_path = db_path
        self._pool: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    def _conn(self) -> sqlite3.Connection:
        with self._lock:
            if self._pool:
                return self._pool.pop()
        return sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, check_same_thread=False)

    def _release(self, c: sqlite3.Connection) -> None:
        with self._lock:
            if len(self._pool) < self.POOL:
                self._pool.append(c)
                return
        c.close()

    def latest(self, host_id: str) -> report_pb2.HostReport | None:
        c = self._conn()
        try:
            row = c.execute("SELECT report FROM hosts WHERE host_id=?", (host_id,)).fetchone()
        except BaseException:
            c.close()
            raise
        self._release(c)
        if row is None:
            return None
        r = report_pb2.HostReport()
        r.ParseFromString(row[0])
        return r
