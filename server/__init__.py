"""eptwatch aggregator: fleet state, rollups per kernel, regressed-kernel detection.

The folders follow a report through the aggregator (tests/test_imports.py keeps the boundaries):

- `ingest/`: reports in: agent authentication (`auth`), the Ingest servicer and the checks a report
  must pass (`validate`, with its compiled walk `_reportscan`).
- `store/`: durable state: the interface (`base`), SQLite (`sqlite`, the default) and PostgreSQL
  (`postgres`, shared by replicas).
- `fleet/`: the fleet view: latest state per host, rollups and verdicts (`state`), and how a replica
  follows a shared store (`follow`).
- `faces/`: the read side: gRPC Query, the HTTP routes, /metrics, the fleet page and host pages.

`app` assembles them, `cli` is eptwatch-server, `demo` and `simulate` are the demo fleet.
"""

from eptwatch.common import __version__

__all__ = ["__version__"]
