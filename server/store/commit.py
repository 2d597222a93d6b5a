"""What both stores share: the records ingest hands them and gets back, how a transaction decides
exactly-once (`plan_commit`), how the writer thread gathers a group (`GroupCommitWriter`, `drain`) and
wakes its waiters (`wake_waiters`), the failure reasons, and the small queued writer their departed logs use.
Store-agnostic: no SQL here."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from eptwatch.v1 import ingest_pb2, report_pb2

T = TypeVar("T")

# Why a commit failed (the reason label of eptwatch_server_store_commit_failures_total).
DISK_FULL = "disk_full"  # SQLITE_FULL: the state directory's filesystem is full
DATABASE = "database"  # any other error of SQLite or of its file (I/O, corruption, read-only)
REPORT = "report"  # one report could not be written; it alone was refused


class StoreError(Exception):
    """The state store could not commit: nothing in the failed transaction was stored."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason  # DISK_FULL or DATABASE


@dataclass(frozen=True)
class Incoming:
    report: report_pb2.HostReport
    # The report serialised, as stored. None: the writer serialises it, and only if it becomes the
    # host's stored latest report (in a replayed backlog, most are superseded within the transaction).
    payload: bytes | None = None
    spool_dropped_total: int = 0
    # The report's validate.ReportTotals from the ingest checks, if they ran: a store that keeps a summary
    # beside the report (PostgreSQL, for other replicas to follow) makes it without walking the report again.
    totals: Any = None


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
    problem: str = ""  # the stored bytes do not decode: `report` is then empty but for the row's identity


@dataclass(frozen=True)
class ApplyResult:
    status: int  # ingest_pb2.AckStatus
    became_latest: bool  # this report is now the host's latest state
    high_water_sequence: int = 0  # DUPLICATE: the (host, instance)'s mark, so an agent can tell a rewind
    reason: str = ""  # REJECTED: why the report could not be stored
    # A store that summarises the host's stored report itself (PostgreSQL: the summary other replicas follow)
    # hands it to ingest with the result, so that the report is not summarised twice: fleet.HostSummary.
    summary: Any = None


def sample_seconds(report: report_pb2.HostReport) -> float:
    return report.sample_time.seconds + report.sample_time.nanos / 1e9


Job = tuple[list[Incoming], asyncio.AbstractEventLoop, asyncio.Future[list[ApplyResult]]]


def drain(jobs_queue: queue.SimpleQueue[T | None] | queue.Queue[T | None], first: T, limit: float,
          size: Callable[[T], int]) -> tuple[list[T], int, bool]:
    """`first` and what else is queued now, until the sizes reach `limit`; (items, their total size,
    whether the stop marker (None) was met: it is taken off the queue, and nothing after it)."""
    items = [first]
    total = size(first)
    while total < limit:
        try:
            nxt = jobs_queue.get_nowait()
        except queue.Empty:
            break
        if nxt is None:
            return items, total, True
        items.append(nxt)
        total += size(nxt)
    return items, total, False


def _job_size(job: Job) -> int:
    return len(job[0])


class QueueThread(Generic[T]):
    """A daemon thread that takes items off a queue in batches (`drain`) until it meets the stop marker:
    `_stop_thread` queues that marker after everything queued before it and waits, so what was queued is
    handled first. Subclasses handle a batch in `_handle`."""

    _queue: queue.SimpleQueue[T | None] | queue.Queue[T | None]
    _thread: threading.Thread | None = None

    def _start_thread(self, name: str) -> None:
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _stop_thread(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            stop = self._handle(first)
            if stop:
                return

    def _handle(self, first: T) -> bool:
        """Handle `first` and what gathered behind it; True where the stop marker was met."""
        raise NotImplementedError


@dataclass
class CommitPlan:
    """What one transaction will write and answer, decided before it writes (see plan_commit)."""

    results: list[list[ApplyResult]]  # per message, per report
    marks: dict[tuple[str, str], int]  # (host, instance) -> new high-water mark, kept only if it commits
    latest: dict[str, float]  # host -> sample time of the report its row will hold
    agents: dict[tuple[str, str], list[int]]  # key -> [last_sequence, applied, spool_dropped_total]
    hosts: dict[str, tuple[Incoming, float]]  # host -> the report to store and its sample time
    latest_slots: dict[str, list[tuple[int, int]]]  # host -> (message, index) of results said latest


def plan_commit(batches: Sequence[Sequence[Incoming]], known_marks: Mapping[tuple[str, str], int],
                known_latest: Mapping[str, float]) -> CommitPlan:
    """Exactly-once, decided the same way by both stores: per (host, instance) a report at or below the
    high-water mark is DUPLICATE (its ack carries the mark, so an agent can tell its spool was
    rewound); one above it is APPLIED, and the hosts row keeps the report with the newest sample time
    (ties: the later one). The results equal applying the reports one by one in order."""
    marks: dict[tuple[str, str], int] = {}
    latest: dict[str, float] = {}
    agents: dict[tuple[str, str], list[int]] = {}
    hosts: dict[str, tuple[Incoming, float]] = {}
    latest_slots: dict[str, list[tuple[int, int]]] = {}
    applied = ApplyResult(ingest_pb2.ACK_STATUS_APPLIED, False)
    applied_latest = ApplyResult(ingest_pb2.ACK_STATUS_APPLIED, True)
    duplicates: dict[int, ApplyResult] = {}  # by high-water mark: one object per mark, not per report
    results: list[list[ApplyResult]] = []
    for b, batch in enumerate(batches):
        res: list[ApplyResult] = []
        for item in batch:
            r = item.report
            host, seq = r.host_id, r.sequence
            key = (host, r.agent_instance)
            last = marks.get(key)
            if last is None:
                last = known_marks.get(key, 0)
            if seq <= last:
                dup = duplicates.get(last)
                if dup is None:
                    dup = duplicates[last] = ApplyResult(ingest_pb2.ACK_STATUS_DUPLICATE, False, last)
                res.append(dup)
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
            if cur is None or st >= cur:
                latest[host] = st
                hosts[host] = (item, st)
                latest_slots.setdefault(host, []).append((b, len(res)))
                res.append(applied_latest)
            else:
                res.append(applied)
        results.append(res)
    return CommitPlan(results, marks, latest, agents, hosts, latest_slots)


class GroupCommitWriter(QueueThread[Job]):
    """The writer thread both stores run: `submit` queues a message's reports from the event loop, the
    thread takes what has gathered (`drain`) and hands it to `_commit_group`, which must wake every
    job's waiter (a result or an exception each); `_stop_writer` lets what is queued commit, then stops.

    Group commit (like PostgreSQL's commit_delay): after a transaction's first message the writer waits
    for more to share its round trip, fsync and wake-up. How long depends on who waits for the acks:
    - `gather_delay` while every queued message is `submit`ted without `hurry`: a paced agent's one
      report, whose ack nobody waits on (its next report comes an interval later). Measured with 4
      processes on one PostgreSQL (docs/benchmarks.md): 50 ms instead of 5 holds 8 reports per commit
      instead of 2, and cut CPU per report by 12 to 20% in the aggregator, about 45% in PostgreSQL.
    - `commit_delay` (shorter) as soon as a message comes with `hurry`: its stream sent it before an
      earlier one was acknowledged (a replayed backlog, a busy host), so the commit's latency bounds
      that stream's throughput."""

    _max_batch: int
    _commit_delay: float
    _gather_delay: float

    def _init_writer(self, max_batch: int, commit_delay_seconds: float, gather_delay_seconds: float) -> None:
        for what, value in (("commit delay", commit_delay_seconds), ("gather delay", gather_delay_seconds)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{what}: expected 0 to 1 s, got {value!r}")
        self._max_batch = max_batch
        self._commit_delay = commit_delay_seconds
        self._gather_delay = max(gather_delay_seconds, commit_delay_seconds)
        self._gathers = self._gather_delay > commit_delay_seconds  # else `hurry` changes nothing
        self._queue = queue.SimpleQueue()  # a put from the event loop is cheap
        self._hurry = threading.Event()  # a queued message's stream waits on its ack: commit soon
        self._thread = None

    def submit(self, items: Sequence[Incoming], hurry: bool = False,
               loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Future[list[ApplyResult]]:
        """Queue `items` for the next transaction; the future resolves (await it) once it has committed.
        `hurry`: the sender waits on this message's ack (see the class doc). `loop`: the running loop,
        where the caller has it at hand (asking for it costs a getpid() system call on Python 3.11)."""
        if loop is None:
            loop = asyncio.get_running_loop()
        fut: asyncio.Future[list[ApplyResult]] = loop.create_future()
        self._queue.put((list(items), loop, fut))
        if hurry and self._gathers and not self._hurry.is_set():
            self._hurry.set()
        return fut

    def _start_writer(self, name: str) -> None:
        self._start_thread(name)

    def _stop_writer(self) -> None:
        self._stop_thread()

    def _handle(self, first: Job) -> bool:
        self._wait_for_more()
        jobs, count, stop = drain(self._queue, first, self._max_batch, _job_size)  # up to max_batch reports
        self._commit_group(jobs, count)
        return stop

    def _wait_for_more(self) -> None:
        """The group-commit wait after a transaction's first message (see the class doc)."""
        if self._gather_delay <= 0.0:
            return
        started = time.monotonic()
        if self._gathers and not self._hurry.is_set():
            self._hurry.wait(self._gather_delay)  # returns early when a hurried message is queued
        # Cleared before the queue is drained: a hurried message queued after this commits with the next
        # group, which then waits the short delay only.
        self._hurry.clear()
        left = self._commit_delay - (time.monotonic() - started)
        if left > 0.0:
            time.sleep(left)

    def _commit_group(self, jobs: list[Job], count: int) -> None:
        raise NotImplementedError


class QueuedWrites(QueueThread[tuple[str, float | None]]):
    """A small writer thread fed by a queue: `record` only queues, the thread writes what has gathered
    in one batch (in order) through `_write_batch`, and `close` writes what is queued, then stops. Both stores'
    departed logs use it, so that a departure never waits on the ingest path."""

    _thread_name = "eptwatch-queued-writer"

    def __init__(self) -> None:
        self._queue = queue.Queue()
        self._thread = None

    def start(self) -> None:
        self._start_thread(self._thread_name)

    def record(self, host_id: str, departed_at: float | None) -> None:
        """Queue a departure (`departed_at`) or a return (None); written in order."""
        self._queue.put((host_id, departed_at))

    def close(self) -> None:
        """Writes what is queued, then stops."""
        self._stop_thread()

    def _handle(self, first: tuple[str, float | None]) -> bool:
        items, _, stop = drain(self._queue, first, float("inf"), _one)
        self._write_batch(items)
        return stop

    def _write_batch(self, items: list[tuple[str, float | None]]) -> None:
        raise NotImplementedError


def _one(_: object) -> int:
    return 1


def wake_waiters(jobs: list[tuple[list[Incoming], asyncio.AbstractEventLoop, asyncio.Future[list[ApplyResult]]]],
          values: list, setter: Callable[[asyncio.Future[list[ApplyResult]], Any], None]) -> None:
    """Resolve every job's future on its own loop: one wake-up per loop, not one per job."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[list[ApplyResult]], Any]]] = {}
    for (_, loop, fut), value in zip(jobs, values):
        by_loop.setdefault(loop, []).append((fut, value))
    for loop, pairs in by_loop.items():
        try:
            loop.call_soon_threadsafe(_resolve_on_loop, pairs, setter)
        except RuntimeError:
            pass  # that loop is closed: nobody is waiting any more


def _resolve_on_loop(pairs: list[tuple[asyncio.Future[list[ApplyResult]], Any]],
             setter: Callable[[asyncio.Future[list[ApplyResult]], Any], None]) -> None:
    for fut, value in pairs:
        setter(fut, value)


def set_result(fut: asyncio.Future[list[ApplyResult]], value: list[ApplyResult]) -> None:
    if not fut.done():
        fut.set_result(value)


def set_exception(fut: asyncio.Future[list[ApplyResult]], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
