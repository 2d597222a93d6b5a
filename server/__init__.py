"""eptwatch aggregator: fleet state, rollups per kernel, regressed-kernel detection."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("eptwatch")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
