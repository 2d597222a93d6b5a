"""The agent's durable spool: every report stays on disk until the aggregator acknowledges it.

SQLite in WAL mode survives SIGKILL of the agent (and, with synchronous=FULL, power loss). The spool
also owns the agent's identity for delivery: `agent_instance` (random, made once per spool) and the
sequence counter, so numbering continues across restarts and (host, instance, sequence) stays unique.

Bounded by bytes and by age; when a bound forces a drop, the oldest reports go first and the drop is
counted durably (`dropped_total`), reported to the aggregator and exported, never silent.

A full filesystem is an edge the spool keeps working at, not a crash:
- the database is capped (`max_page_count`) a little below the free space, so SQLite says "full"
  cleanly before the filesystem does, and the WAL is checkpointed and truncated often;
- a small reserve file is kept beside the database and released when a write still finds the disk
  full, so deleting acknowledged reports (which needs WAL space) can always be applied;
- when a new report does not fit, the oldest unacknowledged reports are dropped to make room, each
  counted once; a report that fits nowhere is counted as dropped too;
- acknowledged sequences are remembered in memory until their DELETE succeeds: they are never handed
  out again, and never counted as drops, even while the disk refuses the DELETE.

A rewound spool (restored from a snapshot, meta rewritten) reuses sequence numbers the aggregator
already holds; `restart_instance` gives it a new `agent_instance` and restamps the reports stored
under the old one (lazily, when they are read, so a full disk needs only one meta row for it).
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from eptwatch.v1 import report_pb2

log = logging.getLogger("eptwatch.agent.uplink.spool")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS reports (seq INTEGER PRIMARY KEY, created REAL NOT NULL, size INTEGER NOT NULL, payload BLOB NOT NULL);
"""

# Released when the disk is full so acks (DELETEs need WAL space) and the drop count can be written.
RESERVE_BYTES = 256 * 1024
# WAL pages before an automatic checkpoint; small so the WAL stays far below a small filesystem.
_WAL_AUTOCHECKPOINT_PAGES = 32
# Acked reports deleted per transaction: bounds the WAL one ack batch needs.
_DELETE_CHUNK = 200
# Attempts to make room for one report (each drops a few of the oldest) before it counts as lost.
_ROOM_ATTEMPTS = 64


class SpoolFull(Exception):
    """The report could not be stored even after making room; it is counted in dropped_total."""


def _is_full(exc: BaseException) -> bool:
    if isinstance(exc, sqlite3.Error) and getattr(exc, "sqlite_errorcode", None) == 13:  # SQLITE_FULL
        return True
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "database or disk is full" in str(exc)


@dataclass(frozen=True)
class SpoolStats:
    depth: int
    bytes: int  # payload bytes of the reports held (recomputed from the table after any failure)
    dropped_total: int
    oldest_age_seconds: float | None
    file_bytes: int = 0  # database + WAL + shared-memory files as the filesystem holds them


class Spool:
    def __init__(self, path: Path, max_bytes: int, max_age_seconds: float, clock: Callable[[], float] = time.time,
                 reserve_bytes: int = RESERVE_BYTES) -> None:
        if max_bytes <= 0 or max_age_seconds <= 0:
            raise ValueError("spool bounds must be positive")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.reserve_path = path.with_name(path.name + ".reserve")
        self.reserve_bytes = reserve_bytes
        self.max_bytes = max_bytes
        self.max_age_seconds = max_age_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._closed = False
        # Acked but not yet deleted (the DELETE failed, e.g. on a full disk): never sent again, never a drop.
        self._acked: set[int] = set()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(f"PRAGMA wal_autocheckpoint={_WAL_AUTOCHECKPOINT_PAGES}")
        self._page_size = int(self._db.execute("PRAGMA page_size").fetchone()[0])
        # After a checkpoint the WAL is cut back to this, not to 0: the space it keeps is reused by the
        # next writes, which on a full disk could not get it back.
        self._db.execute(f"PRAGMA journal_size_limit={_WAL_AUTOCHECKPOINT_PAGES * self._page_size}")
        self._db.executescript(_SCHEMA)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            if self._meta("agent_instance") is None:
                self._set_meta("agent_instance", secrets.token_hex(8))
                self._set_meta("next_sequence", "1")
                self._set_meta("dropped_total", "0")
            self._db.execute("COMMIT")
        self.agent_instance = str(self._meta("agent_instance"))
        self._restamp_below = int(self._meta("restamp_below") or 0)
        self._bytes = self._sum_bytes()
        # Kept in memory too (like _bytes): the delivery task reads it for every message it sends, and
        # must not wait for the lock a sample's append holds through its fsync.
        self._dropped = int(self._meta("dropped_total") or 0)
        self._ensure_reserve()

    # --- small helpers (called with the lock held) ---

    def _meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def _set_meta(self, key: str, value: str) -> None:
        self._db.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value", (key, value))

    def _sum_bytes(self) -> int:
        return int(self._db.execute("SELECT coalesce(sum(size), 0) FROM reports").fetchone()[0])

    def _rollback(self) -> None:
        # SQLite rolls a transaction back by itself on some errors (SQLITE_FULL among them): a second
        # ROLLBACK would fail with "cannot rollback - no transaction is active" and hide the first error.
        if self._db.in_transaction:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error:
                log.warning("spool: rollback failed", exc_info=True)

    def _ensure_reserve(self) -> None:
        """Keep the reserve file allocated when there is room for it (quietly not, when there is not)."""
        if self.reserve_bytes <= 0:
            return
        try:
            if self.reserve_path.stat().st_size >= self.reserve_bytes:
                return
        except FileNotFoundError:
            pass
        try:
            st = os.statvfs(self.path.parent)
        except OSError:
            return
        if st.f_bavail * st.f_frsize < self.reserve_bytes + self._headroom_bytes():
            return  # not yet: taking the last free bytes would only make the next write fail
        try:
            fd = os.open(self.reserve_path, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, self.reserve_bytes)  # really allocated, unlike a sparse file
            finally:
                os.close(fd)
        except OSError:
            self._release_reserve()

    def _release_reserve(self) -> bool:
        try:
            os.unlink(self.reserve_path)
        except FileNotFoundError:
            return False
        log.warning("spool: the disk is full; released the %d-byte reserve beside %s", self.reserve_bytes, self.path)
        self._cap_pages()
        return True

    def _cap_pages(self) -> None:
        """Cap the database a little below the filesystem's free space (SQLite then says "full" cleanly)."""
        try:
            st = os.statvfs(self.path.parent)
        except OSError:
            return
        free_bytes = st.f_bavail * st.f_frsize
        pages = int(self._db.execute("PRAGMA page_count").fetchone()[0])
        extra = max(0, (free_bytes - self._headroom_bytes()) // self._page_size)
        self._db.execute(f"PRAGMA max_page_count={max(pages, pages + extra, 2)}")

    def _headroom_bytes(self) -> int:
        """Free space kept for the WAL (twice its checkpoint size) besides the reserve file."""
        return 2 * _WAL_AUTOCHECKPOINT_PAGES * self._page_size + 4 * self._page_size

    def _write(self, work: Callable[[], None], use_reserve: bool = True) -> None:
        """Run `work` in one IMMEDIATE transaction; on a full disk release the reserve and try once more.
        New reports never spend the reserve (use_reserve=False): it is for acks, drops and the drop count."""
        for attempt in (0, 1):
            try:
                self._db.execute("BEGIN IMMEDIATE")
                work()
                self._db.execute("COMMIT")
                return
            except BaseException as exc:
                self._rollback()
                if attempt == 0 and use_reserve and _is_full(exc) and self._release_reserve():
                    continue
                raise

    # --- public API ---

    @property
    def dropped_total(self) -> int:
        return self._dropped

    def append(self, build: Callable[[int], bytes]) -> int:
        """Allocate the next sequence number, build the report with it, and store it, atomically.

        On a full disk the oldest reports are dropped (counted) until the new one fits; if it never
        fits it is counted as dropped and SpoolFull is raised."""
        with self._lock:
            if self._closed:
                raise SpoolFull("the spool is closed")
            self._delete_acked()
            self._cap_pages()
            for _ in range(_ROOM_ATTEMPTS):
                out: dict[str, int] = {}

                def work() -> None:
                    seq = int(self._meta("next_sequence") or 1)
                    payload = build(seq)
                    self._db.execute("INSERT INTO reports VALUES (?, ?, ?, ?)", (seq, self._clock(), len(payload), payload))
                    self._set_meta("next_sequence", str(seq + 1))
                    out["seq"], out["size"] = seq, len(payload)
                    out["dropped"] = self._enforce_bounds(self._bytes + len(payload))

                try:
                    self._write(work, use_reserve=False)
                except BaseException as exc:
                    self._bytes = self._sum_bytes()
                    if not _is_full(exc):
                        raise
                    if not self._drop_oldest_for_room(out.get("size", 0)):
                        break
                    continue
                self._dropped += out["dropped"]
                self._bytes = self._sum_bytes()
                self._ensure_reserve()
                return out["seq"]
            # Nothing left to drop and the report still does not fit: it is lost, and counted.
            self._dropped += 1
            self._persist_dropped()
            raise SpoolFull(f"{self.path}: the disk is full and the spool holds nothing more to drop; the report is lost (counted)")

    def _persist_dropped(self) -> None:
        try:
            self._write(lambda: self._set_meta("dropped_total", str(self._dropped)))
        except sqlite3.Error as exc:
            log.warning("spool: could not persist dropped_total=%d: %s", self._dropped, exc)

    def _drop_oldest_for_room(self, want_bytes: int) -> bool:
        """Delete acked leftovers first, then the oldest unacked reports (counted); False if none left."""
        rows = self._db.execute("SELECT seq, size FROM reports ORDER BY seq LIMIT 64").fetchall()
        if not rows:
            return False
        target = max(2 * want_bytes, 4 * self._page_size)  # a few pages: drop little, but not one by one
        chosen: list[int] = []
        counted = 0
        freed = 0
        for seq, size in rows:
            chosen.append(int(seq))
            if int(seq) not in self._acked:
                counted += 1
            freed += int(size)
            if freed >= target:
                break

        def work() -> None:
            self._db.executemany("DELETE FROM reports WHERE seq=?", [(s,) for s in chosen])
            if counted:
                self._set_meta("dropped_total", str(self._dropped + counted))

        try:
            self._write(work)
        except sqlite3.Error as exc:
            if not _is_full(exc):
                raise
            log.error("spool: the disk is full and even dropping the oldest reports failed: %s", exc)
            return False
        self._dropped += counted
        self._acked.difference_update(chosen)
        if counted:
            log.warning("spool: disk full; dropped the %d oldest report(s) to make room (dropped_total=%d)", counted, self._dropped)
        return True

    def _enforce_bounds(self, held_bytes: int) -> int:
        """Drops what the bounds force out (oldest first) and counts it durably; returns how many.
        Acknowledged leftovers go without being counted: they were delivered."""
        dropped = 0
        cutoff = self._clock() - self.max_age_seconds
        rows = self._db.execute("SELECT seq, size FROM reports WHERE created < ? ORDER BY seq", (cutoff,)).fetchall()
        for seq, size in rows:
            self._db.execute("DELETE FROM reports WHERE seq=?", (seq,))
            held_bytes -= size
            if seq not in self._acked:
                dropped += 1
        while held_bytes > self.max_bytes:
            row = self._db.execute("SELECT seq, size FROM reports ORDER BY seq LIMIT 1").fetchone()
            if row is None:
                break
            self._db.execute("DELETE FROM reports WHERE seq=?", (row[0],))
            held_bytes -= row[1]
            if row[0] not in self._acked:
                dropped += 1
        if dropped:
            self._set_meta("dropped_total", str(self._dropped + dropped))
        return dropped

    def expire(self) -> None:
        """Apply the age bound without appending (an agent that cannot sample still ages its spool)."""
        with self._lock:
            if self._closed:
                return
            self._delete_acked()
            out: dict[str, int] = {}

            def work() -> None:
                out["dropped"] = self._enforce_bounds(self._bytes)

            try:
                self._write(work)
            finally:
                self._bytes = self._sum_bytes()
            self._dropped += out["dropped"]

    def pending(self, after_seq: int, limit: int, max_bytes: int) -> list[tuple[int, bytes]]:
        """Oldest first, sequences above `after_seq`, at most `limit` reports and about `max_bytes`.
        Acknowledged reports still on disk are skipped; reports made under an earlier agent instance
        are restamped with the current one."""
        out: list[tuple[int, bytes]] = []
        total = 0
        with self._lock:
            if self._closed:
                return []
            acked = set(self._acked)
            rows = self._db.execute("SELECT seq, payload FROM reports WHERE seq > ? ORDER BY seq LIMIT ?",
                                    (after_seq, limit + len(acked))).fetchall()
            instance, restamp_below = self.agent_instance, self._restamp_below
        for seq, payload in rows:
            if seq in acked:
                continue
            if len(out) >= limit or out and total + len(payload) > max_bytes:
                break
            data = bytes(payload)
            if seq < restamp_below:
                data = restamp(data, instance)
            out.append((int(seq), data))
            total += len(data)
        return out

    def ack(self, seqs: Iterable[int]) -> None:
        """Forget acknowledged reports: at once in memory, on disk in chunks (retried later if the disk refuses)."""
        seqs = list(seqs)
        if not seqs:
            return
        with self._lock:
            self._acked.update(seqs)
            if not self._closed:
                self._delete_acked()

    def _delete_acked(self) -> None:
        pending = sorted(self._acked)
        for i in range(0, len(pending), _DELETE_CHUNK):
            chunk = pending[i:i + _DELETE_CHUNK]

            def work() -> None:
                self._db.executemany("DELETE FROM reports WHERE seq=?", [(s,) for s in chunk])

            try:
                self._write(work)
            except sqlite3.Error as exc:
                log.warning("spool: %d acknowledged report(s) stay on disk for now (never resent): %s", len(pending) - i, exc)
                break
            self._acked.difference_update(chunk)
        self._bytes = self._sum_bytes()

    @property
    def next_sequence(self) -> int:
        with self._lock:
            return int(self._meta("next_sequence") or 1)

    def restart_instance(self, high_water_sequence: int) -> str | None:
        """The aggregator holds `high_water_sequence` for our instance. If our next sequence is not above
        it the spool was rewound: start a new agent instance (reports stored so far are restamped when
        read) and return its id; otherwise None."""
        with self._lock:
            if self._closed:
                return None
            next_seq = int(self._meta("next_sequence") or 1)
            if high_water_sequence < next_seq:
                return None
            new = secrets.token_hex(8)

            def work() -> None:
                self._set_meta("agent_instance", new)
                self._set_meta("restamp_below", str(next_seq))

            self._write(work)
            old, self.agent_instance, self._restamp_below = self.agent_instance, new, next_seq
        log.warning("spool rewound: the aggregator holds sequence %d of agent instance %s but our next sequence is %d; "
                    "continuing as new agent instance %s", high_water_sequence, old, next_seq, new)
        return new

    def stats(self) -> SpoolStats:
        with self._lock:
            if self._closed:
                return SpoolStats(0, 0, self._dropped, None, 0)
            depth, oldest = self._db.execute("SELECT count(*), min(created) FROM reports").fetchone()
            depth = int(depth) - len(self._acked)
        return SpoolStats(max(0, depth), self._bytes, self._dropped, None if oldest is None else max(0.0, self._clock() - oldest),
                          self.file_bytes())

    def file_bytes(self) -> int:
        total = 0
        for suffix in ("", "-wal", "-shm"):
            try:
                total += os.stat(f"{self.path}{suffix}").st_size
            except OSError:
                pass
        return total

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._db.close()


def restamp(payload: bytes, agent_instance: str) -> bytes:
    """The report with its agent_instance replaced (sequence and content kept)."""
    r = report_pb2.HostReport.FromString(payload)
    r.agent_instance = agent_instance
    return r.SerializeToString()
