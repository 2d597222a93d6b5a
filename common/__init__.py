"""What the agent and the aggregator share, and nothing else: each program imports this package and
never the other's. `config` (typed YAML configuration, start-up checks, ConfigError), `httpserve`
(the small threaded HTTP server for /metrics, health and JSON), `wire` (the JSON form of the wire
messages in `eptwatch.v1`).
"""

# A constant, not importlib.metadata: that import alone costs start-up time in both programs. A test
# checks it against pyproject.toml's [project] version.
__version__ = "0.1.0"
