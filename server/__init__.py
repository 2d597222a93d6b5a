"""eptwatch aggregator: fleet state, rollups per kernel, regressed-kernel detection."""

from eptwatch.common import __version__

__all__ = ["__version__"]
