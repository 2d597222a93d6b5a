"""Keeping a replica's fleet view current from a shared store (PostgreSQL).

With a shared store every replica answers for the whole fleet, not just for the hosts whose streams it
carries: a follower task asks the store for the hosts whose latest report changed since the last ingest
id it saw (`PgStore.follow_page`, without its own process's commits) every FOLLOW_INTERVAL_SECONDS and puts them into the fleet state.
Staleness bound: a report committed by any replica is in every replica's fleet view at most
FOLLOW_INTERVAL_SECONDS plus one poll's duration after its commit (documented as 2 s).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import Iterable
from typing import Protocol

from google.protobuf.message import DecodeError

from eptwatch.server.fleet.state import FleetState, HostSummary, summarise
from eptwatch.server.store.postgres import FollowedHost, PgReportReader, decode_summary

log = logging.getLogger("eptwatch.server.fleet.follow")

FOLLOW_INTERVAL_SECONDS = 0.5
STALENESS_BOUND_SECONDS = 2.0  # what the docs promise: FOLLOW_INTERVAL_SECONDS plus a poll, with room
FOLLOW_BATCH = 10_000  # rows per query; a longer list of changes is read in several queries at once
_ERROR_LOG_EVERY_SECONDS = 30.0
# The fleet rollups go to Prometheus from one replica only (the others would double every sum): the one
# holding this lease, renewed at every poll. After a holder dies another takes over within the TTL.
FLEET_EXPORT_LEASE = "fleet-metrics-exporter"
FLEET_EXPORT_LEASE_TTL_SECONDS = 5.0
# How often the lease is renewed or asked for: well inside the holder's local validity (TTL / 2), and a
# query fewer at most polls (each costs the follower's thread a round trip and a GIL hand-off).
FLEET_EXPORT_LEASE_RENEW_SECONDS = 1.0


class Followable(Protocol):
    writer_id: str  # the process, as the writer of the hosts rows its ingest commits

    def follow_page(self, after_ingest_id: int, after_host_id: str | None, limit: int,
                    skip_writer: str | None = ...) -> tuple[list[FollowedHost], tuple[int, str] | None, bool]: ...

    def ingest_high_water(self) -> int: ...

    def hold_lease(self, name: str, holder: str, ttl_seconds: float) -> bool: ...

    def report_reader(self) -> PgReportReader: ...


class SharedFleetState(FleetState):
    """The fleet state of a replica on a shared store, where departures are the store's (`PgDepartedLog`).
    Every stream that starts carrying a host tells the store (`on_departed(host, None)`), and a stream
    that ends cleanly asks it to depart the host (`on_departed(host, when)`), which it does only if no
    stream elsewhere started carrying the host since: an agent that rotates to another replica is not
    departed, one that stops is. What the store then says arrives through the follower
    (`apply_followed`), here as on every other replica, within the staleness bound."""

    def _returned(self, host_id: str, tell: bool = True) -> None:
        super()._returned(host_id, False)  # the store hears of streams starting instead (_first_stream)

    def _first_stream(self, host_id: str) -> None:
        if self._on_departed is not None:
            self._on_departed(host_id, None)

    def _last_stream_closed(self, host_id: str) -> None:
        # Not departed here: the store decides (another replica may carry the host now), and says so
        # through the follower.
        if self._on_departed is not None:
            self._on_departed(host_id, self._clock())

    def apply_followed(self, summary: HostSummary | None, host_id: str, departed_at: float | None) -> None:
        """A change of a host's row in the store: its latest report (None: the one held already) and
        whether it is departed. Never told back to the store, except where this replica carries a
        live stream of a host the store says departed: the agent rotated here, and the other replica's
        departure landed after this one's return; writing the return again settles it."""
        if summary is not None:
            self.put(summary, tell_return=False)
        with self._lock:
            if departed_at is None:
                if host_id in self._departed:
                    self._departed.discard(host_id)
                    self._count_again(host_id)
            elif host_id in self._streams:
                if self._on_departed is not None:
                    self._on_departed(host_id, None)
            else:
                self._depart(host_id)
            self._view = None


class StoreFollower:
    def __init__(self, store: Followable, fleet: FleetState, interval_seconds: float = FOLLOW_INTERVAL_SECONDS) -> None:
        self.store = store
        self.fleet = fleet
        self.interval_seconds = interval_seconds
        self.cursor = 0  # the last change applied to the fleet view: (ingest id, host id)
        self.cursor_host: str | None = None  # None: every change with ingest id `cursor` is applied
        self.hosts_followed_total = 0  # changes put into the fleet view (others' commits, mostly)
        self.polls_failed_total = 0
        self._last_error_log = 0.0
        self.holder_id = uuid.uuid4().hex  # this process, as a lease holder
        self._lease_until = 0.0  # monotonic time until which this process holds the export lease
        self._lease_asked = float("-inf")  # monotonic time of the last renewal (or attempt)

    def exports_fleet(self) -> bool:
        """Whether this replica exports the fleet rollups to Prometheus now. The local expiry is half the
        TTL, so a holder gives up before another can take over: two exporters overlap, at worst, by
        nothing but a renewal in flight."""
        return time.monotonic() < self._lease_until

    def renew_lease(self) -> None:
        started = time.monotonic()
        self._lease_asked = started
        if self.store.hold_lease(FLEET_EXPORT_LEASE, self.holder_id, FLEET_EXPORT_LEASE_TTL_SECONDS):
            self._lease_until = started + FLEET_EXPORT_LEASE_TTL_SECONDS / 2
        else:
            self._lease_until = 0.0

    def poll_and_renew(self) -> int:
        """One round of the follower's task (blocking: one thread hop for both): the changes since the
        cursor, and the lease when FLEET_EXPORT_LEASE_RENEW_SECONDS have passed since it was last asked
        for. A holder thus renews at least every RENEW + one poll interval (1.5 s), inside its local
        validity (2.5 s); after a holder dies another replica takes over within the TTL plus that."""
        n = self.poll_once()
        if time.monotonic() - self._lease_asked >= FLEET_EXPORT_LEASE_RENEW_SECONDS:
            self.renew_lease()
        return n

    def start_at_high_water(self) -> None:
        """Call before loading the hosts: changes committed after this are followed, none missed."""
        self.cursor = self.store.ingest_high_water()

    def poll_once(self) -> int:
        """Apply every change since the cursor (blocking: run it in a thread); how many hosts changed."""
        n = 0
        while True:
            # This process's own commits are skipped by the store: ingest put them into the fleet view
            # already (with the summary and receive time of the row, see PgStore._settle_latest).
            changes, last, full = self.store.follow_page(self.cursor, self.cursor_host, FOLLOW_BATCH, self.store.writer_id)
            for ch in changes:
                self._apply(ch)
            n += len(changes)
            if last is not None:
                self.cursor, self.cursor_host = last
            if not full:
                return n

    def _apply(self, h: FollowedHost) -> None:
        cur = self.fleet.get(h.host_id)
        summary: HostSummary | None = None
        if cur is not None and (cur.agent_instance, cur.sequence, cur.sample_time) == (h.agent_instance, h.sequence, h.sample_time):
            # This replica applied it itself (or the change is a departure or return): only the receive
            # time is taken from the store, so that every replica judges staleness on the same instant
            # (the committing transaction's).
            if cur.received != h.received:
                summary = dataclasses.replace(cur, received=h.received)
        else:
            try:
                # The committing replica's summary where it left one: no report to parse and walk here.
                summary = decode_summary(h)
                if summary is None:
                    r = h.report() if h.report_bytes is not None else self.store.report_reader().latest(h.host_id)
                    if r is None:
                        return  # the row is gone (deleted by hand)
                    summary = summarise(r, h.received, h.spool_dropped_total)
            except (ValueError, DecodeError) as exc:
                # One bad row costs only its host: the cursor moves on past it.
                log.warning("followed report of host %r not loaded: %s", h.host_id[:80], exc)
                return
            self.hosts_followed_total += 1
        if isinstance(self.fleet, SharedFleetState):
            self.fleet.apply_followed(summary, h.host_id, h.departed_at)
        elif summary is not None:
            self.fleet.put(summary)

    async def run(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.poll_and_renew)
            except Exception as exc:  # noqa: BLE001 - the store may be away for a while; keep following
                self.polls_failed_total += 1
                now = time.monotonic()
                if now - self._last_error_log >= _ERROR_LOG_EVERY_SECONDS:
                    self._last_error_log = now
                    log.warning("following the shared store failed (the fleet view may fall behind): %s", str(exc).strip())
            await asyncio.sleep(self.interval_seconds)
