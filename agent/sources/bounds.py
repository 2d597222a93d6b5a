"""Bounds on every integer the agent parses from procfs, sysfs, debugfs or a command line.

The host tree is outside input (a container's, or an attacker's under --root; any local user can
start a process named qemu-system-x86 with any argv). An integer is checked here before Python
builds it (int() of a 5,000-digit string raises ValueError past 4,300 digits, a float() of 400
digits is inf) and before it reaches the model or the wire (uint64/int32 fields fail to serialise
past their range). Out of range is a ParseError naming the input: a per-source error, never a crash.
"""

from __future__ import annotations

from eptwatch.agent.sources.status import ParseError

# A byte size of any one smaps field or of a VM's guest RAM: 4 PiB, far above any machine (x86-64
# 5-level paging addresses 2^57 virtual, but no host has 2^52 bytes of memory to map huge).
MAX_BYTES = 2**52
MAX_KB = MAX_BYTES // 1024
# pid_max is at most 2^22 on Linux (PID_MAX_LIMIT); fds are ints. Both travel as int32 on the wire.
MAX_PID = 2**31 - 1
MAX_FD = 2**31 - 1
# starttime (clock ticks since boot) and inode numbers are u64 in the kernel and on the wire.
MAX_U64 = 2**64 - 1
# A huge-mapping count above this is no count a machine can have (2^52 bytes in 2 MiB units is 2^31;
# a 4 KiB count of all of it is 2^40): the model calls such a reading implausible.
MAX_PLAUSIBLE_COUNT = 2**52


def parse_bounded(text: str, name: str, what: str, maximum: int, base: int = 10) -> int:
    """A non-negative integer in `base` (10 or 16) of at most `maximum`; ParseError otherwise.

    Digits are counted before int() so that no input, however long, costs more than a length check."""
    s = text.strip()
    digits = "0123456789abcdefABCDEF" if base == 16 else "0123456789"
    if not s or not s.isascii() or any(c not in digits for c in s):
        raise ParseError(name, f"{what}: expected a non-negative {'hexadecimal' if base == 16 else 'decimal'} integer, got {s[:40]!r}")
    significant = s.lstrip("0")
    max_digits = len(format(maximum, "x" if base == 16 else "d"))
    if len(significant) > max_digits:
        raise ParseError(name, f"{what}: {len(significant)}-digit value {s[:20]}... out of range (at most {maximum})")
    value = int(significant or "0", base)
    if value > maximum:
        raise ParseError(name, f"{what}: value {value} out of range (at most {maximum})")
    return value


def small_decimal(text: str, maximum: int) -> int | None:
    """`text` as a decimal integer if it is all digits and at most `maximum`, else None (for names
    such as /proc/<pid> or fd/<n>, where an out-of-range name is simply not a pid or fd)."""
    if not text or not text.isascii() or not text.isdigit() or len(text.lstrip("0")) > len(str(maximum)):
        return None
    value = int(text)
    return value if value <= maximum else None
