"""A small threaded HTTP server for /metrics, health and JSON: shared by agent and aggregator.

Handlers only read immutable snapshots, so a plain ThreadingHTTPServer thread is enough and keeps the
event loop free of HTTP work. A thread per connection is bounded two ways: a connection that sends
nothing for `idle_timeout_seconds` is closed, and past `max_connections` at once a new connection gets
503 and is closed without a thread (silent connections would otherwise each hold a thread forever).
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from eptwatch.common.config import ConfigError, parse_hostport

log = logging.getLogger("eptwatch.http")

Route = Callable[[str, dict[str, list[str]]], tuple[int, str, bytes]]

IDLE_TIMEOUT_SECONDS = 30.0  # scrapers and browsers send their request at once; only a stuck or hostile peer waits
MAX_CONNECTIONS = 128  # concurrent connections (one thread each): far above a few scrapers and dashboards
_BUSY = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 5\r\n"
         b"Connection: close\r\nRetry-After: 1\r\n\r\nbusy\n")


class _BoundedServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with a cap on handler threads; counts what it refused and timed out."""

    daemon_threads = True
    # listen() backlog: socketserver's default of 5 leaves a burst of connections waiting in SYN retries
    # (seconds each) instead of being accepted and answered (served, or 503 at the cap).
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], max_connections: int) -> None:
        self._slots = threading.BoundedSemaphore(max_connections)
        self._count_lock = threading.Lock()
        self.connections_active = 0
        self.connections_peak = 0  # most served at once
        self.connections_refused_total = 0  # answered 503 at the cap
        self.connections_timed_out_total = 0  # closed for sending nothing within the idle timeout
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            with self._count_lock:
                self.connections_refused_total += 1
            try:
                request.setblocking(False)  # the accept loop never waits on a peer
                request.send(_BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        with self._count_lock:
            self.connections_active += 1
            self.connections_peak = max(self.connections_peak, self.connections_active)
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release()

    def _release(self) -> None:
        with self._count_lock:
            self.connections_active -= 1
        self._slots.release()

    def timed_out(self) -> None:
        with self._count_lock:
            self.connections_timed_out_total += 1

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A peer that vanished or stalled mid-response: its own loss, not a traceback on stderr.
        log.debug("HTTP connection from %s failed", client_address, exc_info=True)


def split_hostport(value: str) -> tuple[str, int]:
    host, port = parse_hostport(value, "address")
    return host or "0.0.0.0", port


class _BoundedServer6(_BoundedServer):
    address_family = socket.AF_INET6  # http.server binds IPv4 only unless told


class HttpServer:
    def __init__(self, address: str, route: Route, idle_timeout_seconds: float = IDLE_TIMEOUT_SECONDS,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        if not idle_timeout_seconds > 0 or max_connections < 1:
            raise ValueError(f"HTTP server: idle timeout must be > 0 s and connections >= 1, got {idle_timeout_seconds!r}, "
                             f"{max_connections!r}")

        class Handler(BaseHTTPRequestHandler):
            server_version = "eptwatch"
            timeout = idle_timeout_seconds  # socket timeout set in setup(): an idle or stalled peer is closed

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                url = urlsplit(self.path)
                try:
                    code, ctype, body = route(url.path, parse_qs(url.query))
                except Exception:  # noqa: BLE001 - a handler bug answers 500, never kills the server
                    log.exception("HTTP %s failed", url.path)
                    code, ctype, body = 500, "text/plain; charset=utf-8", b"internal error\n"
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                log.debug("%s %s", self.address_string(), format % args)

            def log_error(self, format: str, *args: Any) -> None:  # noqa: A002
                # http.server's only sign of its idle timeout is this message ("Request timed out: ...").
                if format.startswith("Request timed out"):
                    httpd.timed_out()
                self.log_message(format, *args)

        host, port = split_hostport(address)
        try:
            httpd = self.httpd = (_BoundedServer6 if ":" in host else _BoundedServer)((host, port), Handler, max_connections)
        except OSError as exc:  # '[Errno 98] Address already in use' alone does not say which address
            raise ConfigError(f"cannot listen on {address} (HTTP): {exc.strerror or exc}") from None
        self.port: int = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="eptwatch-http", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
