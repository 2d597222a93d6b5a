"""Host labels from a file in the Kubernetes downward-API format: one `key="value"` per line."""

from __future__ import annotations

import json

from eptwatch.agent.sources.status import ParseError


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_labels_file(text: str, name: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        key, sep, raw = line.partition("=")
        if not sep or not key.strip():
            raise ParseError(name, f"expected key=\"value\", got {line[:80]!r}", lineno)
        raw = raw.strip()
        if raw.startswith('"'):
            try:
                value = json.loads(raw)  # the downward API quotes and escapes like JSON strings
            except json.JSONDecodeError:
                raise ParseError(name, f"bad quoted value {raw[:80]!r}", lineno) from None
            if not isinstance(value, str):
                raise ParseError(name, f"expected a string value, got {raw[:80]!r}", lineno)
        else:
            value = raw
        for part in (key, value):
            # A JSON escape can spell a lone surrogate ("\\ud800"), which no report can carry: refuse it
            # here, by line, rather than fail the encoding of every report this agent makes.
            if not _is_utf8(part):
                raise ParseError(name, f"not encodable as UTF-8: {part[:80]!r}", lineno)
        out[key.strip()] = value
    return out
