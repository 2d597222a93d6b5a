"""Moved to eptwatch.common.httpserve (the aggregator uses it too); kept so old imports still work."""

from eptwatch.common.httpserve import IDLE_TIMEOUT_SECONDS, MAX_CONNECTIONS, HttpServer, Route, split_hostport

__all__ = ["IDLE_TIMEOUT_SECONDS", "MAX_CONNECTIONS", "HttpServer", "Route", "split_hostport"]
