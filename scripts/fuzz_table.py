"""Turn `pytest --hypothesis-show-statistics` output into the Markdown table of docs/fuzzing.md.

    python scripts/fuzz_table.py OUTPUT...

Each OUTPUT is what one pytest run printed (`make fuzz > out.txt`, or one file per test). For every
test in the statistics: inputs run (hypothesis's passing + failing count; "invalid" inputs, rejected
by the strategy before reaching the test, are shown apart), seconds in the generate phase, and the
result. Nothing is estimated: a test that did not report statistics is not listed.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

_TEST = re.compile(r"^(tests/\S+::\S+):$", re.M)
_PHASE = re.compile(r"during generate phase \(([\d.]+) seconds\):\n.*?\n\s+- (\d+) passing, (\d+) failing, and (\d+) invalid", re.S)
_STOP = re.compile(r"Stopped because (.*)")


def rows(text: str) -> list[tuple[str, int, int, int, float, str]]:
    out = []
    starts = [(m.start(), m.group(1)) for m in _TEST.finditer(text)]
    for i, (pos, test) in enumerate(starts):
        block = text[pos:starts[i + 1][0] if i + 1 < len(starts) else len(text)]
        phase = _PHASE.search(block)
        if phase is None:
            continue
        seconds, passing, failing, invalid = float(phase.group(1)), *map(int, phase.groups()[1:])
        stop = _STOP.search(block)
        out.append((test, passing, failing, invalid, seconds, stop.group(1) if stop else ""))
    return out


def main(paths: list[str]) -> int:
    print("| test | inputs run | invalid (rejected by the strategy) | generate phase | result |")
    print("|---|---:|---:|---:|---|")
    for path in paths:
        for test, passing, failing, invalid, seconds, stop in rows(Path(path).read_text(errors="replace")):
            result = "pass" if failing == 0 else f"**{failing} failing**"
            print(f"| `{test}` | {passing + failing:,} | {invalid:,} | {seconds:,.0f} s | {result} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
