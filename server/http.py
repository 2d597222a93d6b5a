"""The aggregator's HTTP routes: health, readiness, /metrics (the fleet API and page join here)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from eptwatch.agent.httpserve import IDLE_TIMEOUT_SECONDS, MAX_CONNECTIONS
from eptwatch.agent.httpserve import HttpServer as _HttpServer

from .metrics import AggregatorCollector

if TYPE_CHECKING:
    from .app import Aggregator

TEXT = "text/plain; charset=utf-8"


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


class HttpServer(_HttpServer):
    def __init__(self, address: str, agg: Aggregator, idle_timeout_seconds: float = IDLE_TIMEOUT_SECONDS,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        self.agg = agg
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(AggregatorCollector(agg))
        super().__init__(address, self.route, idle_timeout_seconds=idle_timeout_seconds, max_connections=max_connections)

    def route(self, path: str, query: dict[str, list[str]]) -> tuple[int, str, bytes]:
        if path == "/healthz":
            return 200, TEXT, b"ok\n"
        if path == "/readyz":
            return (200, TEXT, b"ready\n") if self.agg.ready else (503, TEXT, b"loading\n")
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        found = self.agg.http_routes(path, query)
        if found is not None:
            return found  # type: ignore[no-any-return]
        return 404, "application/json", json_bytes({"error": f"no such path {path}"})
