"""eptwatch aggregator: fleet state, rollups per kernel, regressed-kernel detection."""
