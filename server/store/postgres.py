"""Durable aggregator state in PostgreSQL, shared by several aggregator processes or replicas.

Same contract as the SQLite store (`storebase.StoreBase`): stream handlers submit batches, one writer
thread per process applies everything queued in one transaction (group commit), and a report is
acknowledged only after that transaction has committed.

Exactly-once across processes is the database's job, not memory's, and a commit takes one of two ways.
The usual one (`_commit_fast`, an agent this process has committed or read before): ONE autocommitted
statement, one round trip. The process plans the reports against the mark it last knew for each agent
and the statement moves each mark by compare-and-set (`UPDATE agents ... WHERE last_sequence = <the
mark planned against>`): the database re-checks that condition on the row's newest version, so of two
replicas planning from the same mark only one moves it. An agent whose mark had moved (its stream was
on another replica meanwhile) moves nothing and writes nothing in that statement, and goes the other way:
a transaction (`_commit_locked`) that locks the `agents` rows of every agent it carries, in key order,
with SELECT ... FOR UPDATE, decides APPLIED/DUPLICATE against the marks it read under that lock, and
writes the new marks before it commits; so do agents this process has not seen yet. An agent whose
stream moves to another replica in the middle of a backlog is resent from its oldest unacknowledged
report; the other replica reads the mark the first one committed and answers DUPLICATE for what was
already applied. Marks only grow, so a report at or below the mark a process knows is a DUPLICATE
without asking the database.

Following the store: every transaction that stores a host's latest report stamps its `hosts` rows with
an ingest id from the one-row `ingest_clock` table, incremented in the same transaction just before the
commit. The row lock orders those transactions, so ids become visible in increasing order: a reader
that has seen id N will never later find a new row with an id <= N (`reports_since`). The price is that
the final step of every commit (a few row writes and the commit itself) is serialised across replicas.

SQL stays within what PostgreSQL-compatible distributed databases (CockroachDB, YugabyteDB) also accept:
plain tables, INSERT ... ON CONFLICT, SELECT ... FOR UPDATE (with a correlated scalar subquery), UPDATE ...
FROM / RETURNING, unnest of arrays, data-modifying CTEs (each table modified once per statement) read by
later ones and by a final UNION ALL, GREATEST;
no advisory locks, no PL/pgSQL, no triggers, no LISTEN/NOTIFY. Serialization failures and deadlocks
(which those databases, and PostgreSQL at first contact of two agents, may report) are retried.
"""

from __future__ import annotations

import json
import logging
import struct
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import psycopg
from psycopg import errors as pg_errors
from psycopg.adapt import Dumper
from psycopg.pq import Format
from psycopg_pool import ConnectionPool

from eptwatch.server.fleet.state import HostSummary, summarise
from eptwatch.server.fleet.state import _shared as shared  # interned like the summaries ingest makes
from eptwatch.server.store.base import redact_dsn
from eptwatch.server.store.commit import (
    DATABASE,
    REPORT,
    AgentRecord,
    ApplyResult,
    CommitPlan,
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

log = logging.getLogger("eptwatch.server.store.postgres")

SCHEMA_VERSION = 1
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS agents (
        host_id TEXT NOT NULL,
        agent_instance TEXT NOT NULL,
        last_sequence BIGINT NOT NULL,
        applied_total BIGINT NOT NULL,
        spool_dropped_total BIGINT NOT NULL DEFAULT 0,
        last_seen DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (host_id, agent_instance)
    )""",
    """CREATE TABLE IF NOT EXISTS hosts (
        host_id TEXT PRIMARY KEY,
        agent_instance TEXT NOT NULL,
        sequence BIGINT NOT NULL,
        sample_time DOUBLE PRECISION NOT NULL,
        received DOUBLE PRECISION NOT NULL,
        report BYTEA NOT NULL,
        ingest_id BIGINT NOT NULL
    )""",
    # When the host's agent closed its stream cleanly (it stopped), NULL while it reports; and a count of
    # the streams that started carrying the host, on any replica. Written by PgDepartedLog (see there);
    # a change of departed_at is stamped with an ingest id like a report, so followers see it. Added to
    # version 1 in place (idempotent ALTERs, which CockroachDB and YugabyteDB accept as well).
    "ALTER TABLE hosts ADD COLUMN IF NOT EXISTS departed_at DOUBLE PRECISION",
    "ALTER TABLE hosts ADD COLUMN IF NOT EXISTS stream_epoch BIGINT NOT NULL DEFAULT 0",
    # The host's summary as the committing replica made it (JSON, `encode_summary`): followers on other
    # replicas take it instead of parsing and walking the report. NULL where the writer had none.
    "ALTER TABLE hosts ADD COLUMN IF NOT EXISTS summary TEXT",
    # Which process wrote the row's report (`PgStore.writer_id`, new at every start; NULL: a departure or
    # return, or a row from before the column): a follower skips its own process's writes, which its
    # fleet view holds already.
    "ALTER TABLE hosts ADD COLUMN IF NOT EXISTS writer TEXT",
    "CREATE INDEX IF NOT EXISTS hosts_by_ingest_id ON hosts (ingest_id)",
    "CREATE TABLE IF NOT EXISTS ingest_clock (id INT PRIMARY KEY, last_id BIGINT NOT NULL)",
    "INSERT INTO ingest_clock (id, last_id) VALUES (1, 0) ON CONFLICT (id) DO NOTHING",
    # Leases: one replica does what must be done once (export the fleet rollups to Prometheus).
    "CREATE TABLE IF NOT EXISTS leases (name TEXT PRIMARY KEY, holder TEXT NOT NULL, expires DOUBLE PRECISION NOT NULL)",
)
# Transient conflicts between concurrent transactions: the whole transaction is run again.
_RETRYABLE = (pg_errors.SerializationFailure, pg_errors.DeadlockDetected)
_T = TypeVar("_T")
RETRIES = 8
# The statements of a commit take their rows as arrays (unnest), so each is one fixed text: prepared once
# per connection, whatever the batch; CockroachDB and YugabyteDB accept unnest of several arrays too.
# The locking way (`_commit_locked`: agents this process has not seen, or whose marks moved meanwhile) is
# four round trips: BEGIN, _LOCK_MARKS, _WRITE (or _UPDATE_MARKS alone when no report becomes a host's
# latest), COMMIT; the usual way is one (_FAST_COMMIT, below). Each statement costs the writer about 60 to 100 us of CPU in psycopg and the
# socket, so the marks and the hosts' latest sample times are read together, and the marks, the ingest
# clock and the hosts rows are written together.
#
# _LOCK_MARKS locks the agents rows (FOR UPDATE: only the table in FROM; the hosts table is read by a
# scalar subquery, never locked) and reads each agent's mark and its host's latest sample time. Under
# READ COMMITTED a row lock waited for returns the row's newest version, so the marks are current; the
# sample time may be from before a concurrent commit of another agent instance of the same host. That is
# harmless: the upsert below decides on the row as it is (`WHERE excluded.sample_time >=
# hosts.sample_time`), and RETURNING tells which hosts it stored (see _apply).
_LOCK_MARKS = ("SELECT host_id, agent_instance, last_sequence, (SELECT h.sample_time FROM hosts h WHERE h.host_id = agents.host_id) "
               "FROM agents WHERE (host_id, agent_instance) IN "
               "(SELECT k.h, k.i FROM unnest(%b::text[], %b::text[]) AS k(h, i)) ORDER BY host_id, agent_instance FOR UPDATE")
_MARKS_SET = ("UPDATE agents SET last_sequence = v.s, applied_total = agents.applied_total + v.n, "
              "spool_dropped_total = GREATEST(agents.spool_dropped_total, v.d), last_seen = %s "
              "FROM unnest(%b::text[], %b::text[], %b::bigint[], %b::bigint[], %b::bigint[]) AS v(h, i, s, n, d) "
              "WHERE agents.host_id = v.h AND agents.agent_instance = v.i")
_UPDATE_MARKS = _MARKS_SET
# The marks, the ingest clock and the hosts rows in one statement (data-modifying CTEs, which CockroachDB
# and YugabyteDB accept as long as no table is modified twice). The clock row is taken before any hosts
# row: the insert reads the clock's new id, so PostgreSQL runs that UPDATE before it inserts a row (and
# the marks' UPDATE, which nothing reads, after it: those rows are locked already). That is the order
# PgDepartedLog takes them in (clock, then hosts rows). With no clock row (deleted by hand), nothing is
# inserted: _apply then checks for the row.
# The hosts upsert both ways share: each host's row takes the commit's report (received, ingest id from
# the clock `c`, writer) unless the row holds a newer one. `{where}` narrows the rows (the fast path's to
# the agents whose marks moved).
_HOSTS_UPSERT = (
    "INSERT INTO hosts (host_id, agent_instance, sequence, sample_time, received, ingest_id, report, summary, writer) "
    "SELECT v.h, v.i, v.s, v.st, %s, c.last_id, v.r, v.j, %s "
    "FROM c, unnest(%b::text[], %b::text[], %b::bigint[], %b::float8[], %b::bytea[], %b::text[]) AS v(h, i, s, st, r, j) "
    "{where}ON CONFLICT (host_id) DO UPDATE SET "
    "agent_instance = excluded.agent_instance, sequence = excluded.sequence, sample_time = excluded.sample_time, "
    "received = excluded.received, report = excluded.report, ingest_id = excluded.ingest_id, summary = excluded.summary, "
    "departed_at = NULL, writer = excluded.writer WHERE excluded.sample_time >= hosts.sample_time RETURNING host_id")
_WRITE = (
    f"WITH m AS ({_MARKS_SET}), "
    "c AS (UPDATE ingest_clock SET last_id = last_id + 1 WHERE id = 1 RETURNING last_id) "
    + _HOSTS_UPSERT.format(where=""))
# The fast path (`PgStore._commit_fast`): the whole commit in ONE autocommitted statement, one round trip.
# The database decides exactly-once by compare-and-set on each agent's mark: a mark moves only from the
# value this process last committed or read for it (`PgStore._marks`), and the reports the process
# planned as APPLIED are those above that value. Under READ COMMITTED an UPDATE that waited for a row a
# concurrent transaction changed re-checks its WHERE on the newest version (EvalPlanQual), so of two
# replicas planning from the same old mark only the first moves it; the other's agent comes back
# without a row in `m`, writes nothing (its hosts rows join `m`), and goes through the locking path
# (_LOCK_MARKS) in a transaction of its own. Locks are taken in the order agents rows, clock row, hosts
# rows, as in the locking path: the clock's UPDATE waits for `m` to finish (its count), the hosts insert
# reads the clock's new id. The last SELECT says which marks moved (kind 0), which hosts rows were
# written (1), and, if any mark moved, divides by the number of clock rows: without the clock row the
# statement fails (division by zero) and nothing of it is stored.
_FAST_COMMIT = (
    "WITH m AS (UPDATE agents SET last_sequence = v.s, applied_total = agents.applied_total + v.n, "
    "spool_dropped_total = GREATEST(agents.spool_dropped_total, v.d), last_seen = %s "
    "FROM unnest(%b::text[], %b::text[], %b::bigint[], %b::bigint[], %b::bigint[], %b::bigint[]) AS v(h, i, e, s, n, d) "
    "WHERE agents.host_id = v.h AND agents.agent_instance = v.i AND agents.last_sequence = v.e "
    "RETURNING agents.host_id, agents.agent_instance), "
    "c AS (UPDATE ingest_clock SET last_id = last_id + 1 WHERE id = 1 AND (SELECT count(*) FROM m) > 0 RETURNING last_id), "
    "w AS (" + _HOSTS_UPSERT.format(where="WHERE (v.h, v.i) IN (SELECT m.host_id, m.agent_instance FROM m) ") + ") "
    "SELECT 0, m.host_id, m.agent_instance FROM m "
    "UNION ALL SELECT 1, w.host_id, NULL FROM w "
    "UNION ALL SELECT 2 / (SELECT count(*) FROM c), NULL, NULL FROM (SELECT 1 FROM m LIMIT 1) AS moved")


# --- arrays in PostgreSQL's binary wire format (array_send/array_recv) ---
# psycopg's generic list dumper is pure Python: it inspects every element to choose a type, then dumps
# each one with its own call (a third of the writer's CPU at 5 reports per commit, profiled). A commit's
# arrays each hold one known type, so they are encoded here in one pass. The format is the protocol's,
# which CockroachDB and YugabyteDB speak too; psycopg already sent these arrays in binary.
class PgArray:
    __slots__ = ("data",)
    oid = 0  # the array type's

    def __init__(self, data: bytes) -> None:
        self.data = data


class TextArray(PgArray):
    __slots__ = ()
    oid = 1009


class Int8Array(PgArray):
    __slots__ = ()
    oid = 1016


class Float8Array(PgArray):
    __slots__ = ()
    oid = 1022


class ByteaArray(PgArray):
    __slots__ = ()
    oid = 1001


class _PgArrayDumper(Dumper):
    format = Format.BINARY

    def dump(self, obj: PgArray) -> bytes:  # type: ignore[override]
        return obj.data


_DUMPERS: tuple[tuple[type[PgArray], type[Dumper]], ...] = tuple(
    (cls, type(f"{cls.__name__}Dumper", (_PgArrayDumper,), {"oid": cls.oid}))
    for cls in (TextArray, Int8Array, Float8Array, ByteaArray))
_I32 = struct.Struct("!i")
_NULL = _I32.pack(-1)
_INT8_MIN, _INT8_MAX = -(1 << 63), (1 << 63) - 1


def _array_header(n: int, element_oid: int, has_null: bool) -> bytes:
    if not n:
        return struct.pack("!iii", 0, 0, element_oid)  # no dimensions: '{}'
    return struct.pack("!iiiii", 1, int(has_null), element_oid, n, 1)  # one dimension, lower bound 1


def _varlena_array(values: Sequence[bytes | None], element_oid: int) -> bytes:
    n = len(values)
    if None not in values:
        pack = _I32.pack
        present = cast("Sequence[bytes]", values)
        return b"".join([_array_header(n, element_oid, False), *[x for b in present for x in (pack(len(b)), b)]])
    parts: list[bytes] = [_array_header(n, element_oid, True)]
    for b in values:
        if b is None:
            parts.append(_NULL)
        else:
            parts.append(_I32.pack(len(b)))
            parts.append(b)
    return b"".join(parts)


def text_array(values: Sequence[str | None]) -> TextArray:
    """text[] (NULL for None). The bytes are UTF-8, the client encoding the connections use (PostgreSQL's
    default); the server checks them, as it checks text sent by psycopg (a NUL is refused: DataError)."""
    return TextArray(_varlena_array([None if v is None else v.encode() for v in values], 25))


def bytea_array(values: Sequence[bytes]) -> ByteaArray:
    return ByteaArray(_varlena_array(values, 17))


def int8_array(values: Sequence[int]) -> Int8Array:
    """bigint[]. A value beyond BIGINT is a DataError, as the server would raise for psycopg's numeric
    array: the commit's error isolation then refuses the report that carries it, alone."""
    for v in values:
        if type(v) is not int or not _INT8_MIN <= v <= _INT8_MAX:
            raise pg_errors.NumericValueOutOfRange(f"bigint out of range: {v!r}"[:200])
    n = len(values)
    return Int8Array(_array_header(n, 20, False) + struct.pack("!" + "iq" * n, *[x for v in values for x in (8, v)]))


def float8_array(values: Sequence[float]) -> Float8Array:
    n = len(values)
    return Float8Array(_array_header(n, 701, False) + struct.pack("!" + "id" * n, *[x for v in values for x in (8, v)]))


READER_POOL_SIZE = 4



@dataclass(frozen=True)
class FollowedHost:
    """A host's stored latest report as a follower sees it: `ingest_id` orders the changes. The report
    is parsed only if asked for: a replica already holds the reports it committed itself."""

    ingest_id: int
    host_id: str
    agent_instance: str
    sequence: int
    sample_time: float
    received: float
    report_bytes: bytes | None  # None when the row has a summary (read the report with `report_reader` if need be)
    spool_dropped_total: int  # of the agent instance that sent the report
    departed_at: float | None = None  # when its agent closed its stream cleanly; None: it reports
    summary: str | None = None  # encode_summary's JSON, as the committing replica made it

    def report(self) -> report_pb2.HostReport | None:
        if self.report_bytes is None:
            return None
        r = report_pb2.HostReport()
        r.ParseFromString(self.report_bytes)
        return r


def encode_summary(h: HostSummary, row_sample_time: float) -> str:
    """A host's summary for the `summary` column, without what the row holds anyway; `row_sample_time`
    (the row's sample_time) ties it to its report: a summary that does not match its row is not used."""
    return json.dumps([h.agent_instance, h.sequence, row_sample_time, h.sample_time, h.kernel_release, h.era, h.labels,
                       h.agent_version, h.vms, h.capacity_2m, h.observed_2m, h.lost_2m, h.lost_explained_2m,
                       h.lost_unexplained_2m, h.known_bug_vms, h.causes, h.problem, h.lost_by_cause], separators=(",", ":"))


def _pairs(v: object, kind: type) -> tuple[tuple[Any, Any], ...]:
    if type(v) is not list:
        raise ValueError("expected a list")
    out = []
    for p in v:
        if type(p) is not list or len(p) != 2 or type(p[0]) is not kind or type(p[1]) is not kind:
            raise ValueError(f"expected pairs of {kind.__name__}")
        out.append((p[0], p[1]))
    return tuple(out)


def decode_summary(f: FollowedHost) -> HostSummary | None:
    """The summary of a followed row, or None where it has none, it does not match its row (the row
    was written by hand, say) or it does not decode: then the report itself is summarised. Never raises."""
    if f.summary is None:
        return None
    try:
        d = json.loads(f.summary)
        if type(d) is not list or len(d) != 18:
            return None
        (inst, seq, row_st, st, kernel, era, labels, version, vms, capacity, observed, lost, explained, unexplained, known_bug,
         causes, problem, by_cause) = d
        if (inst, seq, row_st) != (f.agent_instance, f.sequence, f.sample_time) or type(st) not in (int, float):
            return None
        # Every follower decodes every other replica's rows: the types are checked by two chained
        # comparisons rather than a call per field (bool is no int here: type(True) is bool).
        if not (int is type(era) is type(vms) is type(capacity) is type(observed) is type(lost) is type(explained)
                is type(unexplained) is type(known_bug) and str is type(kernel) is type(version) is type(problem)):
            return None
        return HostSummary(
            host_id=f.host_id, agent_instance=f.agent_instance, sequence=f.sequence, sample_time=float(st), received=f.received,
            kernel_release=shared(kernel), era=era, labels=shared(_pairs(labels, str)), agent_version=shared(version),
            vms=vms, capacity_2m=capacity, observed_2m=observed, lost_2m=lost, lost_explained_2m=explained,
            lost_unexplained_2m=unexplained, known_bug_vms=known_bug, causes=shared(_pairs(causes, int)),
            spool_dropped_total=f.spool_dropped_total, problem=problem, lost_by_cause=_pairs(by_cause, int))
    except (ValueError, TypeError, RecursionError):
        return None


class PgStore(GroupCommitWriter):
    """Owns a writer connection and a small pool for reads. `submit` from the event loop; SQL runs on
    the writer thread (writes) or the caller's thread (reads, through the pool)."""

    def __init__(self, dsn: str, max_batch: int = 2000, commit_delay_seconds: float = 0.0,
                 gather_delay_seconds: float = 0.0) -> None:
        self._init_writer(max_batch, commit_delay_seconds, gather_delay_seconds)
        self._dsn = dsn
        self.where = redact_dsn(dsn)  # what logs and errors may say
        # (host, instance) -> its mark as this process last committed or read it (writer thread only). The
        # rows exist (they are never deleted but by hand) and marks only grow, so a report at or below it is
        # a DUPLICATE; a commit planned against it moves it only if the database still holds that value.
        self._marks: dict[tuple[str, str], int] = {}
        # host -> the agent instance whose mark `_marks` holds. An agent that restarts reports as a new
        # instance: its host's old entry is dropped then, so the cache grows with hosts, not with restarts
        # (the old instance, should it send again, goes the locking way once).
        self._instance_of: dict[str, str] = {}
        self.writer_id = uuid.uuid4().hex  # this process, in the hosts rows it writes (followers skip their own)
        self.commits_total = 0
        self.reports_committed_total = 0
        self.retries_total = 0
        self.commit_failures_total: dict[str, int] = {}  # by reason: DATABASE, REPORT (as the SQLite store)
        self._conn = self._connect()
        self._create_schema()
        self._pool = ConnectionPool(dsn, min_size=1, max_size=READER_POOL_SIZE, kwargs={"autocommit": True},
                                    name="eptwatch-readers", open=False)
        self._pool.open()

    def _connect(self) -> psycopg.Connection[Any]:
        try:
            conn = psycopg.connect(self._dsn, autocommit=True, connect_timeout=10, application_name="eptwatch-server")
        except psycopg.Error as exc:
            # libpq's messages name host and port, never the password; the DSN is shown redacted.
            raise RuntimeError(f"PostgreSQL store {self.where}: cannot connect: {str(exc).strip()}") from None
        try:
            # An ack promises a durable commit, whatever the server's or role's default says.
            conn.execute("SET synchronous_commit = on")
        except psycopg.Error:
            pass  # a compatible database without the setting commits durably anyway (CockroachDB, YugabyteDB)
        for cls, dumper in _DUMPERS:
            conn.adapters.register_dumper(cls, dumper)
        return conn

    def _create_schema(self) -> None:
        # Replicas starting together race on CREATE ... IF NOT EXISTS (PostgreSQL may then report a unique
        # violation in its catalogue): the loser tries again and finds the tables.
        for attempt in range(5):
            try:
                with self._conn.transaction():
                    for stmt in _SCHEMA:
                        self._conn.execute(stmt)
                    row = self._conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
                    if row is None:
                        self._conn.execute("INSERT INTO meta (key, value) VALUES ('schema_version', %s) ON CONFLICT (key) DO NOTHING",
                                           (str(SCHEMA_VERSION),))
                    elif int(row[0]) != SCHEMA_VERSION:
                        raise RuntimeError(f"PostgreSQL store {self.where}: schema version {row[0]}, "
                                           f"this aggregator understands {SCHEMA_VERSION}")
                return
            except (pg_errors.UniqueViolation, pg_errors.DuplicateTable, pg_errors.DuplicateObject, *_RETRYABLE):
                if attempt == 4:
                    raise
                time.sleep(0.05 * (attempt + 1))
            except psycopg.Error as exc:
                raise RuntimeError(f"PostgreSQL store {self.where}: cannot create the schema: {str(exc).strip()}") from None

    # --- reads (any thread) ---

    def load_hosts(self) -> list[StoredHost]:
        with self._pool.connection() as c:
            rows = c.execute("SELECT host_id, agent_instance, sequence, sample_time, received, report FROM hosts").fetchall()
        return [_stored_host(row) for row in rows]

    def load_agents(self) -> list[AgentRecord]:
        with self._pool.connection() as c:
            rows = c.execute("SELECT host_id, agent_instance, last_sequence, applied_total, spool_dropped_total, last_seen "
                             "FROM agents").fetchall()
        return [AgentRecord(*r) for r in rows]

    def reports_since(self, after_ingest_id: int, limit: int = 10_000, after_host_id: str | None = None) -> list[FollowedHost]:
        """Hosts whose stored latest report changed after `after_ingest_id` (after the change of host
        `after_host_id` within that ingest id, if given), in
        (ingest id, host id) order, at most `limit`: ask again from the last one's (ingest_id, host_id)
        for more (one transaction stamps all its hosts with one id, so a page may end inside it). A host
        changed several times shows only its current row. See the module doc for why a follower that
        asks from the last change it has seen misses nothing."""
        return self.follow_page(after_ingest_id, after_host_id, limit)[0]

    def follow_page(self, after_ingest_id: int, after_host_id: str | None, limit: int,
                    skip_writer: str | None = None) -> tuple[list[FollowedHost], tuple[int, str] | None, bool]:
        """One page of `reports_since`, without the rows whose report the process `skip_writer` wrote
        (a follower's own process: its fleet view holds them already); (the changes, the (ingest id, host
        id) of the page's last row, skipped or not: the next page starts after it; whether the page was
        full: more may follow)."""
        if after_host_id is None:
            where, args = "h.ingest_id > %s", (skip_writer, after_ingest_id, limit)
        else:
            where, args = "(h.ingest_id, h.host_id) > (%s, %s)", (skip_writer, after_ingest_id, after_host_id, limit)  # type: ignore[assignment]
        with self._pool.connection() as c:
            # A skipped row is read for its key only: its report, summary and agent are not sent.
            rows = c.execute(
                "SELECT h.ingest_id, h.host_id, h.writer IS NOT NULL AND h.writer = %s AS own, h.agent_instance, h.sequence, "
                "h.sample_time, h.received, CASE WHEN h.summary IS NULL THEN h.report END, "
                "COALESCE(a.spool_dropped_total, 0), h.departed_at, h.summary FROM hosts h LEFT JOIN agents a "
                "ON a.host_id = h.host_id AND a.agent_instance = h.agent_instance "
                f"WHERE {where} ORDER BY h.ingest_id, h.host_id LIMIT %s", args,
            ).fetchall()
        if not rows:
            return [], None, False
        last = rows[-1]
        return ([FollowedHost(int(iid), h, inst, int(seq), float(st), float(rcv), None if blob is None else bytes(blob), int(dropped),
                              None if gone is None else float(gone), summary)
                 for iid, h, own, inst, seq, st, rcv, blob, dropped, gone, summary in rows if not own],
                (int(last[0]), last[1]), len(rows) >= limit)

    def ingest_high_water(self) -> int:
        """The highest ingest id committed: every change up to it is visible now, so a follower that
        loads the hosts after reading this and then follows from it misses nothing."""
        with self._pool.connection() as c:
            row = c.execute("SELECT last_id FROM ingest_clock WHERE id = 1").fetchone()
        return int(row[0]) if row else 0

    def hold_lease(self, name: str, holder: str, ttl_seconds: float) -> bool:
        """Take or renew the lease `name` for `holder` for `ttl_seconds`; whether `holder` holds it now.
        A plain conditional upsert judged on the database's clock (replicas' clocks may differ); a
        holder that stops renewing loses the lease `ttl_seconds` after its last renewal."""
        with self._pool.connection() as c:
            row = c.execute(
                "INSERT INTO leases (name, holder, expires) VALUES (%s, %s, EXTRACT(EPOCH FROM now()) + %s) "
                "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires = excluded.expires "
                "WHERE leases.holder = excluded.holder OR leases.expires < EXTRACT(EPOCH FROM now()) RETURNING holder",
                (name, holder, ttl_seconds),
            ).fetchone()
        return row is not None and row[0] == holder

    def report_reader(self) -> PgReportReader:
        return PgReportReader(self._pool)

    # --- the writer thread ---

    def start(self) -> None:
        self._start_writer("eptwatch-pgstore-writer")

    def close(self) -> None:
        self._stop_writer()
        self._pool.close()
        self._conn.close()

    def _commit_group(self, jobs: list[Job], count: int) -> None:
        try:
            results = self._commit([j[0] for j in jobs])
        except (psycopg.DataError, psycopg.IntegrityError) as exc:
            # A value the database refuses (an integer beyond BIGINT, say) fails the whole group:
            # commit each message alone, and a failing message's reports one by one, so that the bad
            # report alone is REJECTED (as the SQLite store does).
            log.warning("PostgreSQL store %s: a group commit of %d message(s) failed (%s): retrying one at a time",
                        self.where, len(jobs), str(exc).strip())
            for job in jobs:
                self._commit_alone(job)
        except BaseException as exc:  # noqa: BLE001 - every waiter must hear of the failure
            self._fail(jobs, exc, count)
        else:
            wake_waiters(jobs, results, set_result)

    def _commit_alone(self, job: Job) -> None:
        try:
            try:
                results = self._commit([job[0]]) if len(job[0]) > 1 else None
            except (psycopg.DataError, psycopg.IntegrityError):
                results = None
            if results is None:
                results = [self._per_report(job[0])]
        except BaseException as exc:  # noqa: BLE001 - its waiter must hear of the failure
            self._fail([job], exc, len(job[0]))
        else:
            wake_waiters([job], results, set_result)

    def _per_report(self, batch: list[Incoming]) -> list[ApplyResult]:
        """A message's reports in a transaction each; one the database refuses is REJECTED."""
        res: list[ApplyResult] = []
        for item in batch:
            try:
                res.extend(self._commit([[item]])[0])
            except (psycopg.DataError, psycopg.IntegrityError) as exc:
                self.commit_failures_total[REPORT] = self.commit_failures_total.get(REPORT, 0) + 1
                r = item.report
                reason = f"could not be stored: {type(exc).__name__}: {str(exc).strip()}"[:500]
                log.warning("report %s/%s/%d %s", r.host_id[:80], r.agent_instance[:64], r.sequence, reason)
                res.append(ApplyResult(ingest_pb2.ACK_STATUS_REJECTED, False, reason=reason))
        return res

    def _fail(self, jobs: list[Job], exc: BaseException, count: int) -> None:
        """The database, not a report, is at fault: nothing acknowledged, every waiter told why."""
        self.commit_failures_total[DATABASE] = self.commit_failures_total.get(DATABASE, 0) + 1
        log.warning("PostgreSQL store %s: commit of %d reports failed: %s", self.where, count, str(exc).strip())
        if isinstance(exc, psycopg.Error):
            exc = StoreError(DATABASE, f"PostgreSQL {self.where}: {type(exc).__name__}: {str(exc).strip()}")
        wake_waiters(jobs, [exc] * len(jobs), set_exception)

    def _commit(self, batches: list[list[Incoming]]) -> list[list[ApplyResult]]:
        """Commit a group: what it can in one statement (`_commit_fast`), the rest in a transaction that
        locks the marks (`_commit_locked`). Each report's result is what applying the group's reports
        one by one in order would give: reports of different agents do not affect each other's result,
        and an agent's reports all go the same way, in their order."""
        if self._conn.closed or self._conn.broken:
            self._conn = self._connect()  # the server restarted or the connection dropped: a new session
        marks = self._marks
        # The fast path takes an agent whose mark this process knows, of a host that only this agent
        # instance reports for in the group (two instances of one host in one group compete for its row:
        # that rare case, at an agent's restart, goes the locking way).
        instance_of: dict[str, str] = {}
        slow_hosts: set[str] = set()
        for b in batches:
            for item in b:
                r = item.report
                host = r.host_id
                if instance_of.setdefault(host, r.agent_instance) != r.agent_instance or (host, r.agent_instance) not in marks:
                    slow_hosts.add(host)
        if not slow_hosts:
            results, failed = self._retrying(lambda: self._commit_fast(batches))
            if not failed:
                return results
            slow_hosts = {h for h, _ in failed}
        else:
            planned_slow = frozenset(slow_hosts)  # `part` holds a result for every other report, in order
            fast = [[item for item in b if item.report.host_id not in planned_slow] for b in batches]
            part, failed = self._retrying(lambda: self._commit_fast(fast))
            results = [self._scatter(b, p, lambda h: h not in planned_slow) for b, p in zip(batches, part)]
            slow_hosts.update(h for h, _ in failed)  # their results above are void: replaced below
        # The agents whose marks moved meanwhile (another replica applied some of their reports) or that
        # this process has not seen yet: lock, read, decide, write.
        slow = [[item for item in b if item.report.host_id in slow_hosts] for b in batches]
        locked = self._retrying(lambda: self._commit_locked(slow))
        return [self._scatter(b, p, slow_hosts.__contains__, into=r) for b, p, r in zip(batches, locked, results)]

    @staticmethod
    def _scatter(batch: list[Incoming], part: list[ApplyResult], take: Callable[[str], bool],
                 into: list[ApplyResult] | None = None) -> list[ApplyResult]:
        """`into` (a message's results) with the results `part` of its reports whose host `take`s, in order."""
        out = list(into) if into is not None else [ApplyResult(ingest_pb2.ACK_STATUS_UNSPECIFIED, False)] * len(batch)
        it = iter(part)
        for k, item in enumerate(batch):
            if take(item.report.host_id):
                out[k] = next(it)
        return out

    def _retrying(self, attempt: Callable[[], _T]) -> _T:
        """`attempt` again after a serialization failure or deadlock (nothing of it was stored)."""
        for n in range(RETRIES):
            try:
                return attempt()
            except _RETRYABLE:
                self.retries_total += 1
                if n == RETRIES - 1:
                    raise
                time.sleep(0.01 * (n + 1))
        raise AssertionError("unreachable")

    def _commit_fast(self, batches: list[list[Incoming]]) -> tuple[list[list[ApplyResult]], set[tuple[str, str]]]:
        """The group in one autocommitted statement (_FAST_COMMIT), planned against the marks this process
        knows. Returns the results and the agents whose marks had moved meanwhile: nothing of theirs was
        written, and their results here are void (the caller commits them again the locking way)."""
        now = time.time()
        marks = self._marks
        plan = plan_commit(batches, marks, {})  # each host's newest in the group; the upsert decides against the row
        results = plan.results
        if not plan.agents:
            # Every report is at or below a mark the database committed: marks only grow, so DUPLICATE.
            return results, set()
        rows = sorted(plan.agents.items())
        host_arrays, summaries = self._host_arrays(plan, now)
        try:
            out = self._conn.execute(_FAST_COMMIT, (
                now, text_array([h for (h, _), _ in rows]), text_array([i for (_, i), _ in rows]),
                int8_array([marks[k] for k, _ in rows]), int8_array([v[0] for _, v in rows]),
                int8_array([v[1] for _, v in rows]), int8_array([v[2] for _, v in rows]),
                now, self.writer_id, *host_arrays), binary=True).fetchall()
        except pg_errors.DivisionByZero:
            raise RuntimeError(f"PostgreSQL store {self.where}: the ingest_clock row is missing") from None
        moved = {(h, i) for kind, h, i in out if kind == 0}
        failed = set(plan.agents).difference(moved)
        for key in moved:
            self._remember(key, plan.marks[key])
        for key in failed:
            marks.pop(key, None)  # read again, under its row lock, by the locking path
        self.commits_total += 1
        self.reports_committed_total += sum(1 for b in batches for item in b
                                            if (item.report.host_id, item.report.agent_instance) not in failed)
        self._settle_latest(plan, {h for kind, h, _ in out if kind == 1}, summaries)
        return results, failed

    def _remember(self, key: tuple[str, str], mark: int) -> None:
        """Cache an agent's committed mark, dropping its host's other instance (one per host is kept)."""
        host, instance = key
        old = self._instance_of.get(host)
        if old != instance:
            if old is not None:
                self._marks.pop((host, old), None)
            self._instance_of[host] = instance
        self._marks[key] = mark

    def _commit_locked(self, batches: list[list[Incoming]]) -> list[list[ApplyResult]]:
        with self._conn.transaction():
            results, reports, marks = self._apply(batches)
        for key, mark in marks.items():  # only marks a committed transaction wrote or read
            self._remember(key, mark)
        self.commits_total += 1
        self.reports_committed_total += reports
        return results

    def _apply(self, batches: list[list[Incoming]]) -> tuple[list[list[ApplyResult]], int, dict[tuple[str, str], int]]:
        """Inside one transaction: lock the marks, decide, write. The results are the same as applying the
        reports one by one in order against the marks and latest reports committed before. Also returns
        every agent's mark as this transaction leaves it."""
        c = self._conn
        now = time.time()
        keys = sorted({(i.report.host_id, i.report.agent_instance) for b in batches for i in b})
        new_keys = [k for k in keys if k not in self._marks]
        if new_keys:
            self._insert_marks(new_keys, now)
        known_marks, known_latest = self._lock_marks(keys)
        missing = [k for k in keys if k not in known_marks]
        if missing:
            # Only if a row this process thought existed is gone (deleted by hand): make and lock it now.
            self._insert_marks(missing, now)
            more_marks, more_latest = self._lock_marks(missing)
            known_marks.update(more_marks)
            known_latest.update(more_latest)

        plan = plan_commit(batches, known_marks, known_latest)
        results, agents, hosts = plan.results, plan.agents, plan.hosts
        known_marks.update(plan.marks)
        if not agents:
            return results, sum(len(b) for b in batches), known_marks  # all duplicates: nothing to write
        # One statement per transaction, whatever the number of agents (arrays, not a row per call): the
        # statement is prepared once per connection, and no Python call is made per row.
        rows = sorted(agents.items())
        marks = (now, text_array([h for (h, _), _ in rows]), text_array([i for (_, i), _ in rows]),
                 int8_array([v[0] for _, v in rows]), int8_array([v[1] for _, v in rows]), int8_array([v[2] for _, v in rows]))
        if not hosts:
            c.execute(_UPDATE_MARKS, marks)  # applied, but none newer than its host's stored report: no clock
            return results, sum(len(b) for b in batches), known_marks
        host_arrays, summaries = self._host_arrays(plan, now)
        # Last, so that the clock row is held for as short a time as possible: taking it orders the commits
        # that stamp ingest ids (see the module doc). Binary: the reports go as they are, not escaped into text.
        stored = {h for (h,) in c.execute(_WRITE, (*marks, now, self.writer_id, *host_arrays), binary=True).fetchall()}
        if not stored and c.execute("SELECT 1 FROM ingest_clock WHERE id = 1").fetchone() is None:
            raise RuntimeError(f"PostgreSQL store {self.where}: the ingest_clock row is missing")
        self._settle_latest(plan, stored, summaries)
        return results, sum(len(b) for b in batches), known_marks

    @staticmethod
    def _host_arrays(plan: CommitPlan, now: float) -> tuple[tuple[PgArray, ...], dict[str, HostSummary]]:
        """The hosts rows a commit upserts, as arrays (host, instance, sequence, sample time, report,
        summary), and the summaries made for them (their reports' ingest totals, received `now`)."""
        cols: tuple[list[str], list[str], list[int], list[float], list[bytes], list[str | None]] = ([], [], [], [], [], [])
        summaries: dict[str, HostSummary] = {}
        for host, (item, st) in sorted(plan.hosts.items()):
            r = item.report
            cols[0].append(host)
            cols[1].append(r.agent_instance)
            cols[2].append(r.sequence)
            cols[3].append(st)
            cols[4].append(item.payload if item.payload is not None else r.SerializeToString())
            if item.totals is None:
                cols[5].append(None)
            else:
                summaries[host] = summary = summarise(r, now, item.spool_dropped_total, item.totals)
                cols[5].append(encode_summary(summary, st))
        return ((text_array(cols[0]), text_array(cols[1]), int8_array(cols[2]), float8_array(cols[3]), bytea_array(cols[4]),
                 text_array(cols[5])), summaries)

    @staticmethod
    def _settle_latest(plan: CommitPlan, stored: set[str], summaries: dict[str, HostSummary]) -> None:
        """Correct the plan's results by what the hosts upsert did (`stored`: the hosts whose row now holds
        this commit's report)."""
        results = plan.results
        for host, slots in plan.latest_slots.items():
            if host not in stored:
                # Another replica committed a newer report of the host after we read its sample time (or
                # before, on the fast path, which reads none): ours is applied (its mark moved) but is not
                # the host's latest state.
                for b, i in slots:
                    results[b][i] = ApplyResult(ingest_pb2.ACK_STATUS_APPLIED, False)
            elif host in summaries:
                # The stored report's summary goes with its result, so that ingest puts it into the fleet
                # view as it is (received: this transaction's time, as in the row) instead of making it again.
                b, i = slots[-1]
                results[b][i] = ApplyResult(ingest_pb2.ACK_STATUS_APPLIED, True, summary=summaries[host])

    def _insert_marks(self, keys: list[tuple[str, str]], now: float) -> None:
        """A mark row to lock for agents never seen: concurrent first inserts of the same agent on two
        replicas meet here, and the second waits for the first to commit."""
        self._conn.execute(
            "INSERT INTO agents (host_id, agent_instance, last_sequence, applied_total, spool_dropped_total, last_seen) "
            "SELECT k.h, k.i, 0, 0, 0, %s FROM unnest(%b::text[], %b::text[]) AS k(h, i) ON CONFLICT (host_id, agent_instance) DO NOTHING",
            (now, text_array([h for h, _ in keys]), text_array([i for _, i in keys])),
        )

    def _lock_marks(self, keys: list[tuple[str, str]]) -> tuple[dict[tuple[str, str], int], dict[str, float]]:
        """Lock the marks of `keys` (sorted: every transaction locks in the same order) and read them, with
        the sample time of each host's stored latest report (see _LOCK_MARKS)."""
        rows = self._conn.execute(_LOCK_MARKS, (text_array([h for h, _ in keys]), text_array([i for _, i in keys]))).fetchall()
        return {(h, i): int(last) for h, i, last, _ in rows}, {h: float(st) for h, _, _, st in rows if st is not None}


class _DepartedMeanwhile(Exception):
    """A host whose stream starts here was departed by another replica in the middle of the write."""


class PgDepartedLog(QueuedWrites):
    """Which hosts departed (their agent closed its stream cleanly), in the shared store: the same role as
    the SQLite store's DepartedLog (durable across restarts; `record` only queues, a small thread of its
    own writes, never on the ingest path), and every replica sees it.

    An agent that rotates closes its stream on one replica and opens one on another at once; only an agent
    that stops should show as departed. So every stream that starts carrying a host says so (`record(host,
    None)`: the host's `stream_epoch` goes up, and a departure is cleared), and a clean end departs the host
    only if no stream started carrying it since this replica's own did (`stream_epoch` unchanged). Both
    replicas' writes may land in either order and the result is the same. A departure or return is stamped
    with an ingest id, as a report is, so followers on the other replicas pick it up within the staleness
    bound. Where even that is undone (a host new to the store, whose row did not exist yet when its stream
    started), the replica carrying the live stream settles it when it sees the departure
    (`SharedFleetState.apply_followed`). A lost write (the process killed before it lands) costs only how
    one host is shown until it reports."""

    def __init__(self, store: PgStore) -> None:
        super().__init__()
        self._store = store
        self.path = store.where  # what logs may say
        # host -> the stream_epoch this replica's stream of it set (0: the row did not exist yet).
        # Only the writer thread touches it.
        self._epochs: dict[str, int] = {}
        self.writes_failed_total = 0

    def load(self) -> dict[str, float]:
        """host -> when it departed."""
        with self._store._pool.connection() as c:
            rows = c.execute("SELECT host_id, departed_at FROM hosts WHERE departed_at IS NOT NULL").fetchall()
        return {h: float(at) for h, at in rows}

    _thread_name = "eptwatch-pg-departed-writer"

    def _write_batch(self, items: list[tuple[str, float | None]]) -> None:
        self.write(items)

    def write(self, items: Sequence[tuple[str, float | None]]) -> None:
        """Apply stream starts and departures in one transaction; a host's last word wins."""
        carried = sorted({h for h, at in items if at is None})
        departs = sorted((h, at) for h, at in dict(items).items() if at is not None)
        try:
            clock = False
            for attempt in range(RETRIES):
                try:
                    epochs = self._write(carried, departs, clock)
                    break
                except _DepartedMeanwhile:
                    clock = True  # again, taking the clock first (never after the rows: see _write)
                except _RETRYABLE:
                    if attempt == RETRIES - 1:
                        raise
                    time.sleep(0.01 * (attempt + 1))
        except (psycopg.Error, RuntimeError) as exc:
            self.writes_failed_total += 1
            log.warning("PostgreSQL store %s: %d departure(s) and stream start(s) not recorded: %s", self.path, len(items),
                        str(exc).strip())
            return
        self._epochs.update(epochs)
        for h, _ in departs:
            self._epochs.pop(h, None)

    def _write(self, carried: list[str], departs: list[tuple[str, float]], clock: bool) -> dict[str, int]:
        epochs: dict[str, int] = {}
        with self._store._pool.connection() as c, c.transaction():
            need_clock = clock or bool(departs) or (bool(carried) and c.execute(
                "SELECT 1 FROM hosts WHERE host_id = ANY(%s) AND departed_at IS NOT NULL LIMIT 1", (carried,)).fetchone() is not None)
            ingest_id = 0
            if need_clock:
                # The clock first, then the rows: the order the ingest writer takes them in.
                row = c.execute("UPDATE ingest_clock SET last_id = last_id + 1 WHERE id = 1 RETURNING last_id").fetchone()
                if row is None:
                    raise RuntimeError("the ingest_clock row is missing")
                ingest_id = int(row[0])
            if carried:
                if need_clock:  # some host returns: its row changes for followers
                    rows = c.execute("UPDATE hosts SET stream_epoch = stream_epoch + 1, departed_at = NULL, ingest_id = "
                                     "CASE WHEN departed_at IS NULL THEN ingest_id ELSE %s END, writer = CASE WHEN departed_at IS NULL "
                                     "THEN writer END WHERE host_id = ANY(%s) "
                                     "RETURNING host_id, stream_epoch", (ingest_id, carried)).fetchall()
                else:  # nothing a follower shows changes: no ingest id, no wait for the clock row
                    rows = c.execute("UPDATE hosts SET stream_epoch = stream_epoch + 1 WHERE host_id = ANY(%s) AND departed_at IS NULL "
                                     "RETURNING host_id, stream_epoch", (carried,)).fetchall()
                    if len(rows) < len(carried):
                        got = {r[0] for r in rows}
                        if c.execute("SELECT 1 FROM hosts WHERE host_id = ANY(%s) LIMIT 1",
                                     ([h for h in carried if h not in got],)).fetchone() is not None:
                            # Another replica departed one of them since the check above: it returns now,
                            # which followers must see (a new ingest id, so the clock row).
                            raise _DepartedMeanwhile
                epochs = {h: 0 for h in carried}  # no row yet: the report that makes it starts at 0
                epochs.update((h, int(e)) for h, e in rows)
            unknown = [(at, ingest_id, h) for h, at in departs if h not in epochs and h not in self._epochs]
            known = [(at, ingest_id, h, epochs.get(h, self._epochs.get(h))) for h, at in departs if h in epochs or h in self._epochs]
            if known:
                # Only if no stream started carrying the host since ours did: a rotating agent is no departure.
                c.cursor().executemany("UPDATE hosts SET departed_at = %s, ingest_id = %s, writer = NULL WHERE host_id = %s AND stream_epoch = %s", known)
            if unknown:
                c.cursor().executemany("UPDATE hosts SET departed_at = %s, ingest_id = %s, writer = NULL WHERE host_id = %s", unknown)
        return epochs


class PgReportReader:
    """A host's latest full report, read through the store's reader pool."""

    def __init__(self, pool: ConnectionPool[Any]) -> None:
        self._pool = pool

    def latest(self, host_id: str) -> report_pb2.HostReport | None:
        with self._pool.connection() as c:
            row = c.execute("SELECT report FROM hosts WHERE host_id = %s", (host_id,)).fetchone()
        if row is None:
            return None
        r = report_pb2.HostReport()
        r.ParseFromString(bytes(row[0]))
        return r


def _stored_host(row: Sequence[Any]) -> StoredHost:
    host_id, inst, seq, st, rcv, blob = row
    r = report_pb2.HostReport()
    r.ParseFromString(bytes(blob))
    return StoredHost(host_id, inst, int(seq), float(st), float(rcv), r)
