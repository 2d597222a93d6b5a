"""Assembles the aggregator: store, fleet state, gRPC (ingest, health, reflection), HTTP."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from eptwatch.common.config import (
    MAX_SECONDS,
    ConfigError,
    check_port_free,
    is_loopback_host,
    parse_hostport,
)
from eptwatch.common.wire import message_to_dict
from eptwatch.server.faces.hostpage import host_page_response
from eptwatch.server.faces.http import HttpServer, json_bytes
from eptwatch.server.faces.metrics import AggregatorCollector
from eptwatch.server.faces.page import render_fleet_page
from eptwatch.server.faces.query import (
    MAX_LIMIT,
    MAX_OFFSET,
    QueryError,
    QueryServicer,
    fleet_pb,
    host_detail,
    list_hosts,
    list_kernels,
)
from eptwatch.server.fleet.state import FleetConfig, FleetState, summarise
from eptwatch.server.ingest.auth import TlsFiles, TokenTable
from eptwatch.server.ingest.servicer import INGEST_SERVICE, IngestServicer
from eptwatch.server.store.base import is_postgres_url, open_store
from eptwatch.server.store.sqlite import DepartedLog, Store
from eptwatch.v1 import query_pb2, query_pb2_grpc

if TYPE_CHECKING:
    from eptwatch.server.fleet.follow import Followable, StoreFollower
    from eptwatch.server.store.postgres import PgDepartedLog, PgStore

log = logging.getLogger("eptwatch.server")

QUERY_SERVICE = query_pb2.DESCRIPTOR.services_by_name["Query"].full_name
_DIGITS = re.compile(r"[0-9]{1,20}")  # ASCII only: str.isdigit() also takes "²", which int() refuses
# Query parameters each JSON path understands: any other is refused by name (a misspelt filter must not
# silently return everything).
_PARAMS = {"/api/v1/fleet": (), "/api/v1/kernels": ("era", "verdict"),
           "/api/v1/hosts": ("kernel", "label", "status", "cause", "limit", "offset")}


def check_hostport(value: str, key: str) -> str:
    parse_hostport(value, key)
    return value


@dataclass(frozen=True)
class ServerConfig:
    listen: str = "127.0.0.1:9861"
    http: str = "127.0.0.1:9862"
    state_dir: str = "/var/lib/eptwatch"
    tokens_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    # Both must be said out loud: an aggregator is never accidentally open.
    insecure_plaintext: bool = False
    insecure_no_auth: bool = False
    # The insecure flags are for loopback; serving them on another address must be asked for too
    # (the Helm chart does, behind its own NetworkPolicy and values that say so).
    insecure_allow_non_loopback: bool = False
    max_concurrent_streams: int = 20000
    stream_idle_timeout_seconds: float = 300.0
    max_message_bytes: int = 16 * 1024 * 1024
    sqlite_synchronous: str = "FULL"
    # Group commit: how long the store waits after the first report of a transaction for more to join it,
    # when a stream waits on the ack (commit delay), and when none does (gather: paced agents).
    store_commit_delay_seconds: float = 0.005
    store_commit_gather_seconds: float = 0.05
    shutdown_grace_seconds: float = 10.0
    # Fleet view (rollups, staleness)
    report_interval_seconds: float = 30.0
    stale_after_intervals: float = 4.0
    rollup_labels: tuple[str, ...] = ()  # host label keys rolled up on /metrics (bounded cardinality)
    top_n_worst_hosts: int = 10
    regression_min_hosts: int = 3
    regression_unexplained_ratio: float = 0.05
    regression_margin_vs_best: float = 0.02
    page_title: str = "eptwatch fleet"
    # HTTP (/metrics, API, page): a connection that sends nothing for this long is closed, and at most
    # this many are served at once (one thread each); beyond that a connection gets 503 and is closed.
    http_idle_timeout_seconds: float = 30.0
    http_max_connections: int = 128

    def __post_init__(self) -> None:
        check_hostport(self.listen, "listen")
        check_hostport(self.http, "http")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        if not self.tls_cert and not self.insecure_plaintext:
            raise ValueError("no TLS configured: give tls_cert and tls_key, or insecure_plaintext: true (loopback demos and tests only)")
        if not self.tokens_file and not self.insecure_no_auth:
            raise ValueError("no tokens_file: agents must authenticate; give tokens_file, or insecure_no_auth: true (loopback demos and tests only)")
        insecure = [f for f in ("insecure_plaintext", "insecure_no_auth") if getattr(self, f)]
        listen_host, _ = parse_hostport(self.listen, "listen")
        if insecure and not self.insecure_allow_non_loopback and not is_loopback_host(listen_host):
            raise ValueError(f"listen: {self.listen} is not a loopback address and {' and '.join(insecure)} {'are' if len(insecure) > 1 else 'is'} set; listen on "
                             "127.0.0.1 or [::1], configure TLS and tokens, or add insecure_allow_non_loopback: true "
                             "(--insecure-allow-non-loopback)")
        # gRPC channel arguments are C ints: anything beyond 2^31-1 is refused (or wraps) inside the core.
        for name in ("max_concurrent_streams", "max_message_bytes"):
            if not 0 < getattr(self, name) <= 2**31 - 1:
                raise ValueError(f"{name}: expected an integer from 1 to 2147483647, got {getattr(self, name)}")
        for name in ("stream_idle_timeout_seconds", "report_interval_seconds", "stale_after_intervals"):
            if not 0 < getattr(self, name) <= MAX_SECONDS:
                raise ValueError(f"{name}: expected a positive number up to {MAX_SECONDS:.0f}, got {getattr(self, name)}")
        if not 0 <= self.shutdown_grace_seconds <= MAX_SECONDS:
            raise ValueError(f"shutdown_grace_seconds: expected 0 to {MAX_SECONDS:.0f}, got {self.shutdown_grace_seconds}")
        if not 0 <= self.top_n_worst_hosts <= 10_000:
            raise ValueError(f"top_n_worst_hosts: expected 0 to 10000, got {self.top_n_worst_hosts}")
        if not 1 <= self.regression_min_hosts <= 2**31 - 1:
            raise ValueError(f"regression_min_hosts: expected 1 or more, got {self.regression_min_hosts}")
        for name in ("regression_unexplained_ratio", "regression_margin_vs_best"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name}: expected a ratio between 0 and 1")
        if not 0 < self.http_idle_timeout_seconds <= 3600:
            raise ValueError(f"http_idle_timeout_seconds: expected more than 0 and at most 3600, got {self.http_idle_timeout_seconds!r}")
        if not 1 <= self.http_max_connections <= 65536:
            raise ValueError(f"http_max_connections: expected 1 to 65536, got {self.http_max_connections!r}")
        if self.sqlite_synchronous not in ("FULL", "NORMAL", "EXTRA"):
            raise ValueError(f"sqlite_synchronous: expected FULL, NORMAL or EXTRA, got {self.sqlite_synchronous!r}")
        if not 0 <= self.store_commit_delay_seconds <= 1:
            raise ValueError("store_commit_delay_seconds: expected 0 to 1 (seconds)")
        if not 0 <= self.store_commit_gather_seconds <= 1:
            raise ValueError("store_commit_gather_seconds: expected 0 to 1 (seconds)")


def grpc_server_options(cfg: ServerConfig) -> list[tuple[str, int]]:
    return [
        # Oversized messages are refused by gRPC itself with RESOURCE_EXHAUSTED.
        ("grpc.max_receive_message_length", cfg.max_message_bytes),
        ("grpc.max_send_message_length", cfg.max_message_bytes),
        # Agents keep idle streams alive with pings every 30 s; allow that, refuse anything faster.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 20_000),
        ("grpc.http2.max_pings_without_data", 0),
        # Detect dead agents (half-open TCP) within a minute.
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        # Several aggregator processes on one host may share the port (one per core).
        ("grpc.so_reuseport", 1),
    ]


class Aggregator:
    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg
        # --state: a directory (SQLite) or a postgresql:// URL (a store several replicas share).
        self.store = open_store(cfg.state_dir, synchronous=cfg.sqlite_synchronous,
                                commit_delay_seconds=cfg.store_commit_delay_seconds,
                                gather_delay_seconds=cfg.store_commit_gather_seconds)
        self.follower: StoreFollower | None = None
        self._follow_task: asyncio.Task[None] | None = None
        self.departed: DepartedLog | PgDepartedLog
        self.fleet: FleetState
        if is_postgres_url(cfg.state_dir):
            from eptwatch.server.fleet.follow import SharedFleetState, StoreFollower
            from eptwatch.server.store.postgres import PgDepartedLog

            # A shared store: this replica serves the whole fleet by following what every replica commits,
            # departures included (they are kept in the store, where every replica sees them).
            self.departed = PgDepartedLog(cast("PgStore", self.store))
            self.fleet = SharedFleetState(self.fleet_config(), on_departed=self.departed.record)
            self.follower = StoreFollower(cast("Followable", self.store), self.fleet)
        else:
            # Departures are durable: a host whose agent stopped cleanly is still departed after a restart.
            self.departed = DepartedLog(cast(Store, self.store).path, cfg.sqlite_synchronous)
            self.fleet = FleetState(self.fleet_config(), on_departed=self.departed.record)
        self.reader = self.store.report_reader()
        tokens = TokenTable.from_file(Path(cfg.tokens_file)) if cfg.tokens_file else None
        self.ingest = IngestServicer(self.store, self.fleet, tokens, cfg.stream_idle_timeout_seconds)
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.http: HttpServer | None = None
        self.grpc_port = 0
        self.ready = False
        self.started_at = time.time()

    def fleet_config(self) -> FleetConfig:
        c = self.cfg
        return FleetConfig(stale_after_seconds=c.report_interval_seconds * c.stale_after_intervals, rollup_labels=c.rollup_labels,
                           top_n=c.top_n_worst_hosts, min_hosts=c.regression_min_hosts,
                           unexplained_ratio_threshold=c.regression_unexplained_ratio, margin_vs_best=c.regression_margin_vs_best)

    def http_routes(self, path: str, query: dict[str, list[str]]) -> tuple[int, str, bytes] | None:
        """The fleet page and the JSON API: the same messages as the gRPC Query service."""
        def one(name: str) -> str:
            return query.get(name, [""])[-1]

        def number(name: str, most: int) -> int:
            raw = one(name) or "0"
            if _DIGITS.fullmatch(raw) is None or int(raw) > most:
                raise QueryError(f"{name}: expected an integer from 0 to {most}, got {raw[:40]!r}")
            return int(raw)

        def js(msg: object) -> tuple[int, str, bytes]:
            return 200, "application/json", json_bytes(message_to_dict(msg))  # type: ignore[arg-type]

        try:
            known = _PARAMS.get(path, ())
            for name in query if path in _PARAMS or path.startswith("/api/v1/hosts/") else ():
                if name not in known:
                    raise QueryError(f"{name[:40]}: unknown query parameter for {path[:80]}"
                                     f"{' (known: ' + ', '.join(known) + ')' if known else ''}")
            if path == "/":
                return 200, "text/html; charset=utf-8", render_fleet_page(self.fleet.view(), title=self.cfg.page_title).encode()
            if path.startswith("/hosts/"):
                return host_page_response(self.fleet.view(), self.reader, path.removeprefix("/hosts/"), self.cfg.page_title)
            if path == "/api/v1/fleet":
                return js(fleet_pb(self.fleet.view()))
            if path == "/api/v1/kernels":
                return js(list_kernels(self.fleet.view(), query_pb2.ListKernelsRequest(era=one("era"), verdict=one("verdict"))))
            if path == "/api/v1/hosts":
                # Range-checked before they reach the uint32 fields (a larger value would raise there: HTTP 500).
                limit, offset = number("limit", MAX_LIMIT), number("offset", MAX_OFFSET)
                req = query_pb2.ListHostsRequest(kernel_release=one("kernel"), labels=query.get("label", []), status=one("status"),
                                                 cause=one("cause"), limit=limit, offset=offset)
                return js(list_hosts(self.fleet.view(), req))
            if path.startswith("/api/v1/hosts/"):
                host_id = path.removeprefix("/api/v1/hosts/")
                d = host_detail(self.fleet.view(), self.reader, host_id)
                if d is None:
                    return 404, "application/json", json_bytes({"error": f"no host {host_id[:80]!r}"})
                try:
                    return js(d)
                except ValueError as exc:
                    # The stored report holds what JSON cannot say (e.g. a timestamp past year 9999): the
                    # summary still answers, with the problem named; the binary report stays on gRPC GetHost.
                    d.ClearField("latest_report")
                    d.summary.problem = d.summary.problem or f"stored report not shown as JSON: {str(exc)[:200]}"
                    return js(d)
        except QueryError as exc:
            return 400, "application/json", json_bytes({"error": str(exc)})
        return None

    async def start(self) -> None:
        cfg = self.cfg
        self.server = grpc.aio.server(options=grpc_server_options(cfg), maximum_concurrent_rpcs=cfg.max_concurrent_streams,
                                      compression=grpc.Compression.Gzip)
        self.server.add_generic_rpc_handlers((self.ingest.handler(),))
        query_pb2_grpc.add_QueryServicer_to_server(QueryServicer(self.fleet.view, self.reader), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        for svc in ("", INGEST_SERVICE):
            await _set_health(self.health, svc, health_pb2.HealthCheckResponse.NOT_SERVING)
        reflection.enable_server_reflection(
            (INGEST_SERVICE, QUERY_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), self.server
        )
        # Before gRPC tries: its own failure is a RuntimeError with C-core lines on stderr.
        check_port_free(cfg.listen, "listen", reuse_port=True)
        creds: grpc.ServerCredentials | None = None
        if cfg.tls_cert and cfg.tls_key:
            cert, key, ca = TlsFiles(Path(cfg.tls_cert), Path(cfg.tls_key), Path(cfg.tls_client_ca) if cfg.tls_client_ca else None).read()
            creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)
        try:
            if creds is not None:
                self.grpc_port = self.server.add_secure_port(cfg.listen, creds)
            else:
                self.grpc_port = self.server.add_insecure_port(cfg.listen)
        except RuntimeError as exc:  # lost a race with another process since the check
            raise ConfigError(f"listen: cannot listen on {cfg.listen}: {exc}") from None
        if self.grpc_port == 0:
            raise ConfigError(f"listen: cannot listen on {cfg.listen}")
        # The collector and the HTTP layer get read-only views (callables, counters), not this object.
        registry = CollectorRegistry(auto_describe=False)
        registry.register(AggregatorCollector(ready=lambda: self.ready, fleet_view=self.fleet.view, hosts_held=lambda: len(self.fleet),
                                              ingest=self.ingest.counters, store=self.store,
                                              http=lambda: self.http.httpd if self.http is not None else None,
                                              follower=self.follower))
        self.http = HttpServer(cfg.http, ready=lambda: self.ready, routes=self.http_routes, registry=registry,
                               idle_timeout_seconds=cfg.http_idle_timeout_seconds, max_connections=cfg.http_max_connections)
        self.http.start()
        await self.server.start()
        # Load durable state before declaring readiness: an agent acknowledged earlier must find its
        # high-water mark, and the fleet view must not start empty after a restart.
        await asyncio.get_running_loop().run_in_executor(None, self._load)
        self.store.start()
        self.departed.start()
        if self.follower is not None:
            self._follow_task = asyncio.create_task(self.follower.run(), name="eptwatch-store-follower")
        for svc in ("", INGEST_SERVICE):
            await _set_health(self.health, svc, health_pb2.HealthCheckResponse.SERVING)
        self.ready = True
        log.info("serving gRPC on %s (port %d), HTTP on %s, %d hosts loaded", cfg.listen, self.grpc_port, cfg.http, len(self.fleet))

    def _load(self) -> None:
        if self.follower is not None:
            self.follower.start_at_high_water()  # before loading: what commits meanwhile is followed
        dropped = {(a.host_id, a.agent_instance): a.spool_dropped_total for a in self.store.load_agents()}
        for h in self.store.load_hosts():
            # Never raises: a stored report that cannot be evaluated (an aggregator with looser checks wrote
            # it) makes its host invalid, with the problem named, until its next report.
            summary = summarise(h.report, h.received, dropped.get((h.host_id, h.agent_instance), 0))
            if h.problem:
                summary = dataclasses.replace(summary, problem=h.problem)
            if summary.problem:
                log.warning("stored report of %r: host shown invalid: %s", h.host_id[:80], summary.problem)
            self.fleet.put(summary)
        self.fleet.mark_departed(self.departed.load())

    async def stop(self) -> None:
        self.ready = False
        if hasattr(self.health, "enter_graceful_shutdown"):
            res = self.health.enter_graceful_shutdown()
            if asyncio.iscoroutine(res):
                await res
        if self.server is not None:
            await self.server.stop(self.cfg.shutdown_grace_seconds)
        if self.http is not None:
            self.http.stop()
        self.departed.close()  # after the streams: their clean ends are queued by now
        if self._follow_task is not None:
            self._follow_task.cancel()
            await asyncio.gather(self._follow_task, return_exceptions=True)
        self.store.close()

    async def serve_forever(self) -> None:
        await self.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("shutting down: draining streams for up to %.0f s", self.cfg.shutdown_grace_seconds)
        await self.stop()


async def _set_health(h: object, service: str, status: int) -> None:
    res = h.set(service, status)  # type: ignore[attr-defined]
    if asyncio.iscoroutine(res):
        await res
