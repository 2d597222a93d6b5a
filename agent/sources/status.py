"""Per-source outcomes: a collector that fails reports its failure as data.

`UNAVAILABLE` is the quiet "this host does not have it" (debugfs not mounted, kernel too old);
`ERROR` is a source that exists but could not be read or made sense of. Neither is ever a zero.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class SourceState(enum.Enum):
    OK = "ok"
    PARTIAL = "partial"
    UNAVAILABLE = "unavailable"
    ERROR = "error"


@dataclass(frozen=True)
class SourceStatus:
    source: str
    state: SourceState
    reason: str = ""
    path: str = ""

    @property
    def usable(self) -> bool:
        return self.state in (SourceState.OK, SourceState.PARTIAL)


class ParseError(ValueError):
    """Malformed input to a pure parser; the message names the input, the line and the expectation."""

    def __init__(self, name: str, message: str, line: int | None = None) -> None:
        where = f"{name}:{line}" if line is not None else name
        super().__init__(f"{where}: {message}")
        self.name = name
        self.line = line
