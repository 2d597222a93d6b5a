"""The agent's durable spool: every report stays on disk until the aggregator acknowledges it.

SQLite in WAL mode survives SIGKILL of the agent (and, with synchronous=FULL, power loss). The spool
also owns the agent's identity for delivery: `agent_instance` (random, made once per spool) and the
sequence counter, so numbering continues across restarts and (host, instance, sequence) stays unique.

Bounded by bytes and by age; when a bound forces a drop, the oldest reports go first and the drop is
counted durably (`dropped_total`), reported to the aggregator and exported, never silent.
"""

from __future__ import annotations

import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS reports (seq INTEGER PRIMARY KEY, created REAL NOT NULL, size INTEGER NOT NULL, payload BLOB NOT NULL);
"""


@dataclass(frozen=True)
class SpoolStats:
    depth: int
    bytes: int
    dropped_total: int
    oldest_age_seconds: float | None


class Spool:
    def __init__(self, path: Path, max_bytes: int, max_age_seconds: float, clock: Callable[[], float] = time.time) -> None:
        if max_bytes <= 0 or max_age_seconds <= 0:
            raise ValueError("spool bounds must be positive")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.max_bytes = max_bytes
        self.max_age_seconds = max_age_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            if self._meta("agent_instance") is None:
                self._set_meta("agent_instance", secrets.token_hex(8))
                self._set_meta("next_sequence", "1")
                self._set_meta("dropped_total", "0")
            self._db.execute("COMMIT")
        self.agent_instance = str(self._meta("agent_instance"))
        self._bytes = int(self._db.execute("SELECT coalesce(sum(size), 0) FROM reports").fetchone()[0])
        # Kept in memory too (like _bytes): the delivery task reads it for every message it sends, and
        # must not wait for the lock a sample's append holds through its fsync.
        self._dropped = int(self._meta("dropped_total") or 0)

    def _meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def _set_meta(self, key: str, value: str) -> None:
        self._db.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value", (key, value))

    @property
    def dropped_total(self) -> int:
        return self._dropped

    def append(self, build: Callable[[int], bytes]) -> int:
        """Allocate the next sequence number, build the report with it, and store it, atomically."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                seq = int(self._meta("next_sequence") or 1)
                payload = build(seq)
                self._db.execute("INSERT INTO reports VALUES (?, ?, ?, ?)", (seq, self._clock(), len(payload), payload))
                self._set_meta("next_sequence", str(seq + 1))
                self._bytes += len(payload)
                dropped = self._enforce_bounds()
                self._db.execute("COMMIT")
                self._dropped += dropped
            except BaseException:
                self._db.execute("ROLLBACK")
                self._bytes = int(self._db.execute("SELECT coalesce(sum(size), 0) FROM reports").fetchone()[0])
                raise
        return seq

    def _enforce_bounds(self) -> int:
        """Drops what the bounds force out (oldest first) and counts it durably; returns how many."""
        dropped = 0
        cutoff = self._clock() - self.max_age_seconds
        rows = self._db.execute("SELECT seq, size FROM reports WHERE created < ? ORDER BY seq", (cutoff,)).fetchall()
        for seq, size in rows:
            self._db.execute("DELETE FROM reports WHERE seq=?", (seq,))
            self._bytes -= size
            dropped += 1
        while self._bytes > self.max_bytes:
            row = self._db.execute("SELECT seq, size FROM reports ORDER BY seq LIMIT 1").fetchone()
            if row is None:
                break
            self._db.execute("DELETE FROM reports WHERE seq=?", (row[0],))
            self._bytes -= row[1]
            dropped += 1
        if dropped:
            self._set_meta("dropped_total", str(self._dropped + dropped))
        return dropped

    def expire(self) -> None:
        """Apply the age bound without appending (an agent that cannot sample still ages its spool)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            dropped = self._enforce_bounds()
            self._db.execute("COMMIT")
            self._dropped += dropped

    def pending(self, after_seq: int, limit: int, max_bytes: int) -> list[tuple[int, bytes]]:
        """Oldest first, sequences above `after_seq`, at most `limit` reports and about `max_bytes`."""
        out: list[tuple[int, bytes]] = []
        total = 0
        with self._lock:
            rows = self._db.execute("SELECT seq, payload FROM reports WHERE seq > ? ORDER BY seq LIMIT ?", (after_seq, limit)).fetchall()
        for seq, payload in rows:
            if out and total + len(payload) > max_bytes:
                break
            out.append((int(seq), bytes(payload)))
            total += len(payload)
        return out

    def ack(self, seqs: list[int]) -> None:
        if not seqs:
            return
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            for seq in seqs:
                row = self._db.execute("DELETE FROM reports WHERE seq=? RETURNING size", (seq,)).fetchone()
                if row is not None:
                    self._bytes -= int(row[0])
            self._db.execute("COMMIT")

    def stats(self) -> SpoolStats:
        with self._lock:
            depth, oldest = self._db.execute("SELECT count(*), min(created) FROM reports").fetchone()
        return SpoolStats(int(depth), self._bytes, self._dropped, None if oldest is None else max(0.0, self._clock() - oldest))

    def close(self) -> None:
        with self._lock:
            self._db.close()
