"""A small threaded HTTP server for /metrics, health and JSON: shared by agent and aggregator.

Handlers only read immutable snapshots, so a plain ThreadingHTTPServer thread is enough and keeps the
event loop free of HTTP work.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from .config import ConfigError, parse_hostport

log = logging.getLogger("eptwatch.http")

Route = Callable[[str, dict[str, list[str]]], tuple[int, str, bytes]]


def split_hostport(value: str) -> tuple[str, int]:
    host, port = parse_hostport(value, "address")
    return host or "0.0.0.0", port


class _Server6(ThreadingHTTPServer):
    address_family = socket.AF_INET6  # http.server binds IPv4 only unless told


class HttpServer:
    def __init__(self, address: str, route: Route) -> None:
        class Handler(BaseHTTPRequestHandler):
            server_version = "eptwatch"

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

        host, port = split_hostport(address)
        try:
            self.httpd = (_Server6 if ":" in host else ThreadingHTTPServer)((host, port), Handler)
        except OSError as exc:  # '[Errno 98] Address already in use' alone does not say which address
            raise ConfigError(f"cannot listen on {address} (HTTP): {exc.strerror or exc}") from None
        self.httpd.daemon_threads = True
        self.port: int = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="eptwatch-http", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
