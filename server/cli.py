"""eptwatch-server command line."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    # The aggregator lands with the streaming work; until then say so plainly rather than pretend.
    print("eptwatch-server: the aggregator is not part of this release yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
