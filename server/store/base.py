"""What the aggregator needs from its durable store, and the choice of implementation.

Two stores implement it: `store.Store` (SQLite in a state directory: embedded, the default, one process)
and `store_pg.PgStore` (PostgreSQL: several aggregator processes or replicas share it). `--state` picks
one: a `postgresql://` (or `postgres://`) URL means PostgreSQL, anything else is a directory.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from eptwatch.server.store.commit import AgentRecord, ApplyResult, Incoming, StoredHost
from eptwatch.v1 import report_pb2

__all__ = ["AgentRecord", "ApplyResult", "Incoming", "LatestReports", "StoreBase", "StoredHost", "is_postgres_url",
           "open_store", "redact_dsn"]


class LatestReports(Protocol):
    """A host's latest full report, read from the store (per-VM detail is not kept in memory)."""

    def latest(self, host_id: str) -> report_pb2.HostReport | None: ...


class StoreBase(Protocol):
    """The durable state: per-(host, agent instance) high-water marks and each host's latest report.

    Contract (both implementations): `submit` resolves its future only after the transaction holding its
    reports is durable, with one ApplyResult per report in order: APPLIED if its sequence is above the
    instance's high-water mark, DUPLICATE (with that mark) otherwise, exactly as if the reports were
    applied one by one; a report the database refuses is REJECTED alone, with its reason. A failure of
    the store itself fails the future with a StoreError, and nothing in it was stored. `hurry`: the
    sender waits on the ack, so the group commit waits the short delay only (GroupCommitWriter).
    """

    commits_total: int  # transactions committed by this process (a /metrics counter)
    reports_committed_total: int
    commit_failures_total: dict[str, int]  # by reason (store.DISK_FULL, DATABASE, REPORT)

    def load_hosts(self) -> list[StoredHost]: ...

    def load_agents(self) -> list[AgentRecord]: ...

    def start(self) -> None: ...

    def close(self) -> None: ...

    def submit(self, items: Sequence[Incoming], hurry: bool = False,
               loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Future[list[ApplyResult]]: ...

    def report_reader(self) -> LatestReports: ...


_URL = re.compile(r"(?i)^postgres(?:ql)?://")
# The password of a URL (user:PASSWORD@) or of a key/value DSN (password=...): never logged.
_URL_PASSWORD = re.compile(r"^(?P<scheme>[A-Za-z]+://)(?P<user>[^:@/]*):[^@/]*@")
_KV_PASSWORD = re.compile(r"(?i)(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)")
_QUERY_PASSWORD = re.compile(r"(?i)([?&]password=)[^&]*")


def is_postgres_url(state: str) -> bool:
    return bool(_URL.match(state))


def redact_dsn(dsn: str) -> str:
    """The DSN with any password replaced by `***`: safe for logs and error messages."""
    if "://" in dsn:
        out = _URL_PASSWORD.sub(lambda m: f"{m.group('scheme')}{m.group('user')}:***@", dsn)
        return _QUERY_PASSWORD.sub(r"\1***", out)
    return _KV_PASSWORD.sub(r"\1***", dsn)


def open_store(state: str, *, synchronous: str = "FULL", commit_delay_seconds: float = 0.0,
               gather_delay_seconds: float = 0.0) -> StoreBase:
    """The store `--state` names: PostgreSQL for a postgresql:// URL, else SQLite in that directory."""
    if is_postgres_url(state):
        from eptwatch.server.store.postgres import (
            PgStore,  # imported only when asked for: the SQLite default needs no driver
        )

        return PgStore(state, commit_delay_seconds=commit_delay_seconds, gather_delay_seconds=gather_delay_seconds)
    from eptwatch.server.store.sqlite import Store

    return Store(Path(state), synchronous=synchronous, commit_delay_seconds=commit_delay_seconds,
                 gather_delay_seconds=gather_delay_seconds)
