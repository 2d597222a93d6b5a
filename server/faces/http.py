"""The aggregator's HTTP routes: health, readiness, /metrics (the fleet API and page join here)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from eptwatch.common.httpserve import IDLE_TIMEOUT_SECONDS, MAX_CONNECTIONS
from eptwatch.common.httpserve import HttpServer as _HttpServer

TEXT = "text/plain; charset=utf-8"
# The fleet page and the JSON API: a response, or None for a path they do not serve.
Routes = Callable[[str, dict[str, list[str]]], tuple[int, str, bytes] | None]


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


class HttpServer(_HttpServer):
    """Takes what it serves as arguments (readiness, the app's routes, a metrics registry), never the
    Aggregator itself: http -> app would close an import loop (app builds this server)."""

    def __init__(self, address: str, *, ready: Callable[[], bool], routes: Routes, registry: CollectorRegistry,
                 idle_timeout_seconds: float = IDLE_TIMEOUT_SECONDS, max_connections: int = MAX_CONNECTIONS) -> None:
        self.ready = ready
        self.routes = routes
        self.registry = registry
        super().__init__(address, self.route, idle_timeout_seconds=idle_timeout_seconds, max_connections=max_connections)

    def route(self, path: str, query: dict[str, list[str]]) -> tuple[int, str, bytes]:
        if path == "/healthz":
            return 200, TEXT, b"ok\n"
        if path == "/readyz":
            return (200, TEXT, b"ready\n") if self.ready() else (503, TEXT, b"loading\n")
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        found = self.routes(path, query)
        if found is not None:
            return found
        return 404, "application/json", json_bytes({"error": f"no such path {path}"})
