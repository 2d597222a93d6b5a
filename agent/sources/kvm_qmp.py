"""KVM's per-VM huge-mapping stats through QEMU's QMP ``query-stats``: the counters without debugfs.

Why this exists
---------------
Per-VM counters normally come from debugfs ``kvm/<pid>-<fd>/``. Without debugfs (not mounted, kernel
lockdown) ``KVM_GET_STATS_FD`` on the VM fd is no way round: KVM answers VM ioctls only to the VM's own
process (``kvm_vm_ioctl``: ``kvm->mm != current->mm`` -> EIO), so from outside QEMU it always fails. QEMU itself
can ask, and since 7.1 it exposes the same binary stats through QMP::

    -> {"execute": "query-stats", "arguments": {"target": "vm", "providers": [{"provider": "kvm"}]}}
    <- {"return": [{"provider": "kvm", "stats": [{"name": "pages_2m", "value": 508}, ...]}]}

The values are the kernel's own (identical to debugfs for an idle guest).

Where the monitor is
--------------------
Only what QEMU's command line names is used (``find_qmp_sockets``): ``-qmp unix:PATH,server=on,...``
(or the legacy ``server,nowait``) and ``-chardev socket,id=X,path=PATH,server=on`` with
``-mon chardev=X,mode=control``. A chardev passed as an inherited fd (libvirt's ``fd=N``) has no path to
connect to, and libvirt keeps its monitor connected anyway.

A QMP monitor serves one client at a time: while someone else (libvirt, a management agent, the test
harness) holds it, QEMU does not accept, the kernel still completes our connect (listen backlog) and no
greeting ever arrives. So the greeting has a short deadline (``timeout``, 1 s by default) after which the
monitor is reported busy; nothing here blocks longer than a few times ``timeout``.

The socket is opened through ``/proc/PID/root`` (QEMU may live in another mount namespace) with an
``O_PATH`` fd and connected as ``/proc/self/fd/N``, which also lifts the 107-byte sun_path limit. The
listening socket's peer credentials must name the QEMU pid, so a stale path reused by another process
is never attributed to this VM.
"""

from __future__ import annotations

import codecs
import errno
import json
import os
import socket
import stat
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eptwatch.agent.sources.discovery import parse_cmdline, split_qemu_opts
from eptwatch.agent.sources.hostroot import HostReadError, HostRoot
from eptwatch.agent.sources.kvm_debugfs import CounterScope, KvmCounterValues
from eptwatch.agent.sources.status import ParseError

__all__ = [
    "DEFAULT_BACKOFF_MAX_INTERVALS",
    "DEFAULT_TIMEOUT_SECONDS",
    "STAT_NAMES",
    "QmpBackoff",
    "QmpSocket",
    "QmpUnavailable",
    "find_qmp_sockets",
    "parse_query_stats",
    "query_vm_stats",
    "read_qmp_counters",
]

# The stats eptwatch needs. lpages is 5.14's combined 2M+1G count; the others are >= 5.15.
STAT_NAMES: tuple[str, ...] = ("pages_4k", "pages_2m", "pages_1g", "nx_lpage_splits", "lpages")
DEFAULT_TIMEOUT_SECONDS = 1.0
# A VM whose monitor failed is not asked again for 1, 2, 4, ... sampling intervals, at most this many.
DEFAULT_BACKOFF_MAX_INTERVALS = 32
# QMP replies here are ~1 KiB; anything near this is not a reply we asked for.
_MAX_REPLY_BYTES = 1024 * 1024
_U64_MAX = 2**64 - 1

# Stable reason strings (callers and tests compare against them); specifics go into ``detail``.
REASON_NO_SOCKET = "no QMP unix socket on QEMU's command line"
REASON_SOCKET_MISSING = "QMP socket file does not exist"
REASON_NOT_A_SOCKET = "QMP path is not a socket"
REASON_PERMISSION = "permission denied"
REASON_REFUSED = "nobody listens on the QMP socket (stale socket file)"
REASON_BUSY = "monitor busy: another client holds it (QEMU serves one client per monitor; libvirt keeps its own)"
REASON_NOT_OWNER = "QMP socket belongs to another process"
REASON_TIMEOUT = "QEMU did not answer in time"
REASON_PROTOCOL = "QMP protocol error"
REASON_NO_QUERY_STATS = "QEMU has no query-stats (needs QEMU 7.1+)"
REASON_QMP_ERROR = "query-stats failed"
REASON_NO_STATS = "query-stats has no pages_2m or lpages stat (KVM older than 5.14?)"
REASON_CMDLINE = "QEMU's command line unreadable"
REASON_NONE_ANSWERED = "no QMP monitor answered"


class QmpUnavailable(Exception):
    """Stats could not be obtained over QMP. ``reason`` is one of REASON_*, ``detail`` names the socket/step.

    Not a dataclass: raising assigns ``__traceback__``, which a frozen dataclass refuses.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{detail}: {reason}" if detail else reason)
        self.reason = reason
        self.detail = detail


# --- the reply -------------------------------------------------------------------------------------


def parse_query_stats(reply: object, name: str) -> dict[str, int | None]:
    """The kvm provider's VM-wide STAT_NAMES from a ``query-stats`` reply. Pure.

    ``reply`` is the command's ``return`` value (a list of StatsResult) or the whole response object
    ``{"return": [...]}``. A stat that is absent is None (not 0). Raises ParseError on anything that is
    not the documented shape: the values are compared against smaps, so a value from the wrong place
    must never come out.
    """
    if isinstance(reply, dict):
        if "return" not in reply:
            raise ParseError(name, f"expected a QMP response with 'return', got keys {sorted(map(str, reply))[:8]}")
        reply = reply["return"]
    if not isinstance(reply, list):
        raise ParseError(name, f"expected a list of StatsResult, got {type(reply).__name__}")
    out: dict[str, int | None] = dict.fromkeys(STAT_NAMES)
    seen: set[str] = set()
    for i, entry in enumerate(reply):
        where = f"return[{i}]"
        if not isinstance(entry, dict):
            raise ParseError(name, f"{where}: expected an object, got {type(entry).__name__}")
        provider = entry.get("provider")
        if not isinstance(provider, str):
            raise ParseError(name, f"{where}.provider: expected a string, got {type(provider).__name__}")
        stats = entry.get("stats")
        if not isinstance(stats, list):
            raise ParseError(name, f"{where}.stats: expected a list, got {type(stats).__name__}")
        qom_path = entry.get("qom-path")
        if qom_path is not None and not isinstance(qom_path, str):
            raise ParseError(name, f"{where}.qom-path: expected a string, got {type(qom_path).__name__}")
        # Only the kvm provider's VM-wide result counts; a qom-path marks a per-vCPU result.
        wanted = provider == "kvm" and qom_path is None
        for j, st in enumerate(stats):
            swhere = f"{where}.stats[{j}]"
            if not isinstance(st, dict):
                raise ParseError(name, f"{swhere}: expected an object, got {type(st).__name__}")
            stat_name = st.get("name")
            if not isinstance(stat_name, str):
                raise ParseError(name, f"{swhere}.name: expected a string, got {type(stat_name).__name__}")
            if "value" not in st:
                raise ParseError(name, f"{swhere} ({stat_name}): no value")
            if not wanted or stat_name not in out:
                continue  # other stats may be histograms or booleans: not ours to judge
            if stat_name in seen:
                raise ParseError(name, f"{swhere}: stat {stat_name} appears twice")
            seen.add(stat_name)
            value = st["value"]
            # bool is an int in Python; a boolean stat is not a counter.
            if isinstance(value, bool) or not isinstance(value, int):
                raise ParseError(name, f"{swhere} ({stat_name}): expected an unsigned integer, got {type(value).__name__}")
            if not 0 <= value <= _U64_MAX:
                raise ParseError(name, f"{swhere} ({stat_name}): value {value} is not a u64")
            out[stat_name] = value
    return out


# --- the command line ------------------------------------------------------------------------------


@dataclass(frozen=True)
class QmpSocket:
    path: str  # as written on QEMU's command line (relative to QEMU's cwd when not absolute)
    origin: str  # which options named it, for status messages


_TRUE = {"on", "yes", "true", "y"}


def _flag(opts: dict[str, str], key: str) -> bool:
    # QemuOpts booleans: "server" alone means server=on.
    return opts.get(key, "off").lower() in _TRUE


def _opts(parts: list[str], implied: str | None = None) -> dict[str, str]:
    out: dict[str, str] = {}
    for i, part in enumerate(parts):
        k, sep, v = part.partition("=")
        if sep:
            out[k] = v
        elif i == 0 and implied is not None:
            out[implied] = part
        elif part.startswith("no") and len(part) > 2:
            out[part[2:]] = "off"  # legacy "nowait", "nodelay"
        else:
            out[part] = "on"
    return out


def find_qmp_sockets(argv: Sequence[str]) -> tuple[list[QmpSocket], list[str]]:
    """The QMP server sockets QEMU's argv names, in command-line order, and notes on monitors that
    cannot be reached by path (client-mode sockets, fd-passed chardevs, non-unix transports). Pure."""
    found: list[tuple[int, QmpSocket]] = []  # (argv position, socket): command-line order at the end
    notes: list[str] = []
    # QEMU creates all chardevs before the monitors, so a -chardev may follow the -mon that uses it.
    chardevs: dict[str, dict[str, str]] = {}  # id -> options of socket chardevs
    monitors: list[tuple[int, str]] = []  # (argv position, chardev id) of -mon ...,mode=control
    i = 1
    while i < len(argv):
        arg = argv[i]
        opt = arg[1:] if arg.startswith("--") else arg
        value = argv[i + 1] if i + 1 < len(argv) else None
        if value is None or opt not in ("-qmp", "-qmp-pretty", "-chardev", "-mon"):
            i += 1
            continue
        pos, i = i, i + 2
        if opt in ("-qmp", "-qmp-pretty"):
            if not value.startswith("unix:"):
                notes.append(f"{opt} {value.split(',', 1)[0]}: not a unix socket")
                continue
            parts = split_qemu_opts(value[len("unix:") :])
            o = _opts(parts[1:])
            if not parts[0]:
                continue
            if not _flag(o, "server"):
                notes.append(f"{opt} unix:{parts[0]}: QEMU is the client (no server=on)")
            elif _flag(o, "abstract"):
                notes.append(f"{opt} unix:{parts[0]}: abstract socket not supported")
            else:
                found.append((pos, QmpSocket(parts[0], opt)))
        elif opt == "-chardev":
            parts = split_qemu_opts(value)
            if parts[0] == "socket":
                o = _opts(parts[1:])
                if "id" in o:
                    chardevs[o["id"]] = o
        else:  # -mon [chardev=]X[,mode=control]
            o = _opts(split_qemu_opts(value), implied="chardev")
            if o.get("mode") == "control" and "chardev" in o:
                monitors.append((pos, o["chardev"]))
    for pos, cid in monitors:
        dev = chardevs.get(cid)
        if dev is None:
            notes.append(f"-mon chardev={cid}: not a socket chardev on the command line")
        elif "path" not in dev:
            how = f"fd={dev['fd']} (passed by the parent, e.g. libvirt)" if "fd" in dev else "no path"
            notes.append(f"QMP monitor chardev {cid}: {how}: not reachable by path")
        elif not _flag(dev, "server"):
            notes.append(f"QMP monitor chardev {cid}: QEMU is the client (no server=on)")
        elif _flag(dev, "abstract"):
            notes.append(f"QMP monitor chardev {cid}: abstract socket not supported")
        else:
            found.append((pos, QmpSocket(dev["path"], f"-chardev id={cid} -mon mode=control")))
    return [sock for _, sock in sorted(found, key=lambda f: f[0])], notes


# --- one conversation ------------------------------------------------------------------------------


class _Conn:
    """A QMP conversation with deadlines; messages are decoded as a JSON stream (``-qmp-pretty``
    spreads one message over several lines, so newline framing is not enough)."""

    def __init__(self, sock: socket.socket, label: str) -> None:
        self.sock = sock
        self.label = label
        self.buf = ""
        self.received = 0
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.json = json.JSONDecoder()

    def read_msg(self, deadline: float, on_timeout: str) -> dict[str, Any]:
        while True:
            text = self.buf.lstrip()
            if text:
                try:
                    msg, end = self.json.raw_decode(text)
                except json.JSONDecodeError:
                    # Incomplete, unless it cannot even start an object: then it is not QMP at all.
                    # (Garbage after a "{" ends at the size cap or the deadline.)
                    if not text.startswith("{"):
                        raise QmpUnavailable(REASON_PROTOCOL, f"{self.label}: not a QMP JSON stream: {text[:40]!r}") from None
                except (ValueError, RecursionError) as exc:
                    # Complete JSON that Python will not build: an integer past the 4,300-digit
                    # conversion limit (ValueError), or arrays nested past the recursion limit.
                    raise QmpUnavailable(REASON_PROTOCOL, f"{self.label}: unreadable JSON: {str(exc)[:80]}") from None
                else:
                    self.buf = text[end:]
                    if not isinstance(msg, dict):
                        raise QmpUnavailable(REASON_PROTOCOL, f"{self.label}: expected a JSON object, got {type(msg).__name__}")
                    return msg
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._timed_out(on_timeout)
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except (socket.timeout, TimeoutError):
                raise self._timed_out(on_timeout) from None
            except OSError as exc:
                raise QmpUnavailable(REASON_PROTOCOL, f"{self.label}: recv: {exc.strerror or exc}") from None
            if not chunk:
                raise QmpUnavailable(REASON_PROTOCOL, f"{self.label}: QEMU closed the connection")
            self.received += len(chunk)
            if self.received > _MAX_REPLY_BYTES:
                raise QmpUnavailable(REASON_PROTOCOL, f"{self.label}: more than {_MAX_REPLY_BYTES} bytes without a complete reply")
            self.buf += self.decoder.decode(chunk)

    def _timed_out(self, reason: str) -> QmpUnavailable:
        # Silence before the greeting is a monitor with another client; half a message is not.
        if reason == REASON_BUSY and self.buf.strip():
            return QmpUnavailable(REASON_PROTOCOL, f"{self.label}: incomplete message instead of the QMP greeting")
        return QmpUnavailable(reason, self.label)

    def execute(self, cmd: str, args: dict[str, Any] | None, deadline: float) -> dict[str, Any]:
        """Send one command; return its response (``return`` or ``error``), skipping events."""
        req_id = f"eptwatch-{cmd}"
        msg: dict[str, Any] = {"execute": cmd, "id": req_id}
        if args:
            msg["arguments"] = args
        self.sock.settimeout(max(0.001, deadline - time.monotonic()))
        try:
            self.sock.sendall(json.dumps(msg).encode() + b"\n")
        except (socket.timeout, TimeoutError):
            raise QmpUnavailable(REASON_TIMEOUT, f"{self.label}: sending {cmd}") from None
        except OSError as exc:
            raise QmpUnavailable(REASON_PROTOCOL, f"{self.label}: sending {cmd}: {exc.strerror or exc}") from None
        while True:
            reply = self.read_msg(deadline, REASON_TIMEOUT)
            if "event" in reply:
                continue
            if reply.get("id") != req_id:
                continue  # not ours (e.g. a reply to a command someone else sent before a reconnect)
            if "return" in reply or "error" in reply:
                return reply
            raise QmpUnavailable(REASON_PROTOCOL, f"{self.label}: {cmd}: response without return or error")


def _peer_pid(sock: socket.socket) -> int | None:
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid: int = struct.unpack("3i", raw)[0]
    return pid


def _open_socket_path(path: Path, label: str) -> int:
    """An O_PATH fd on the socket inode: the open follows /proc/PID/root into QEMU's mount namespace."""
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            raise QmpUnavailable(REASON_SOCKET_MISSING, label) from None
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise QmpUnavailable(REASON_PERMISSION, f"{label}: open") from None
        raise QmpUnavailable(REASON_PROTOCOL, f"{label}: open: {exc.strerror or exc}") from None
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        os.close(fd)
        raise QmpUnavailable(REASON_PROTOCOL, f"{label}: fstat: {exc.strerror or exc}") from None
    if not stat.S_ISSOCK(mode):
        os.close(fd)
        raise QmpUnavailable(REASON_NOT_A_SOCKET, label)
    return fd


def query_vm_stats(
    path: Path,
    label: str,
    *,
    expected_pid: int | None,
    self_fd_dir: Path = Path("/proc/self/fd"),
    timeout: float = DEFAULT_TIMEOUT_SECONDS,
) -> dict[str, int | None]:
    """Connect to one QMP socket, negotiate, run ``query-stats`` (vm, kvm) and parse it.

    ``path`` is what to open (e.g. /proc/PID/root/run/qmp.sock); ``label`` names it in messages.
    A connect that gets no greeting within ``timeout`` is a busy monitor (REASON_BUSY); the two
    commands together get ``2 * timeout``. When ``expected_pid`` is given, the listener must be that
    process. Raises QmpUnavailable; never blocks much longer than ``3 * timeout``.
    """
    opath = _open_socket_path(path, label)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        deadline = time.monotonic() + timeout
        sock.settimeout(timeout)
        try:
            sock.connect(str(self_fd_dir / str(opath)))
        except (socket.timeout, TimeoutError, BlockingIOError):
            # EAGAIN: the listen backlog is full, i.e. QEMU has stopped accepting (someone holds it).
            raise QmpUnavailable(REASON_BUSY, f"{label}: connect") from None
        except OSError as exc:
            if exc.errno == errno.ECONNREFUSED:
                raise QmpUnavailable(REASON_REFUSED, label) from None
            if exc.errno in (errno.EACCES, errno.EPERM):
                raise QmpUnavailable(REASON_PERMISSION, f"{label}: connect") from None
            raise QmpUnavailable(REASON_PROTOCOL, f"{label}: connect: {exc.strerror or exc}") from None
        finally:
            os.close(opath)
        peer = _peer_pid(sock)
        if expected_pid is not None and peer is not None and peer != expected_pid:
            raise QmpUnavailable(REASON_NOT_OWNER, f"{label}: listener is pid {peer}, not QEMU pid {expected_pid}")
        conn = _Conn(sock, label)
        greeting = conn.read_msg(deadline, REASON_BUSY)
        if not isinstance(greeting.get("QMP"), dict):
            raise QmpUnavailable(REASON_PROTOCOL, f"{label}: expected the QMP greeting, got {str(greeting)[:120]}")
        deadline = time.monotonic() + 2 * timeout
        caps = conn.execute("qmp_capabilities", None, deadline)
        if "error" in caps:
            raise QmpUnavailable(REASON_PROTOCOL, f"{label}: qmp_capabilities: {_error_text(caps)}")
        reply = conn.execute("query-stats", {"target": "vm", "providers": [{"provider": "kvm"}]}, deadline)
    finally:
        sock.close()
    if "error" in reply:
        err = reply["error"]
        cls = err.get("class") if isinstance(err, dict) else None
        if cls == "CommandNotFound":
            raise QmpUnavailable(REASON_NO_QUERY_STATS, label)
        raise QmpUnavailable(REASON_QMP_ERROR, f"{label}: {_error_text(reply)}")
    try:
        return parse_query_stats(reply, f"{label}: query-stats")
    except ParseError as exc:
        raise QmpUnavailable(REASON_PROTOCOL, str(exc)) from None


def _error_text(reply: dict[str, Any]) -> str:
    err = reply.get("error")
    if isinstance(err, dict):
        return f"{err.get('class')}: {str(err.get('desc'))[:200]}"
    return str(err)[:200]


# --- for the sampler -------------------------------------------------------------------------------


@dataclass
class QmpBackoff:
    """Per-VM backoff for QMP: after a failed attempt the VM's monitors are left alone for 1, 2, 4, ...
    sampling intervals (at most ``max_intervals``); a successful attempt resets it.

    A busy monitor (libvirt holds it) costs up to ``timeout`` per attempt and stays busy; asking every
    interval would spend that on every sample, and every abandoned connect stays queued in QEMU's listen
    backlog. The sampler keeps one per (pid, start time), so a new process behind a reused pid starts
    afresh. ``max_intervals=0`` disables the backoff.
    """

    max_intervals: int = DEFAULT_BACKOFF_MAX_INTERVALS
    failures: int = 0  # consecutive failed attempts
    skip_left: int = 0  # intervals still to skip
    last_failure: str = ""

    def skip(self) -> bool:
        """True (and one interval used up) when this interval is to be skipped."""
        if self.skip_left > 0:
            self.skip_left -= 1
            return True
        return False

    def failed(self, why: str) -> int:
        """Record a failed attempt; returns how many intervals are skipped next."""
        self.failures += 1
        self.last_failure = why
        self.skip_left = min(self.max_intervals, 1 << min(self.failures - 1, 30))
        return self.skip_left

    def succeeded(self) -> None:
        self.failures, self.skip_left, self.last_failure = 0, 0, ""

    def failure_note(self) -> str:
        if self.skip_left == 0:
            return ""
        return f"backing off: QMP not asked for the next {self.skip_left} interval(s) ({self.failures} failure(s) in a row)"

    def skip_note(self) -> str:
        return (f"backing off after {self.failures} failure(s) in a row: QMP not asked this interval "
                f"({self.skip_left} more interval(s) to skip); last failure: {self.last_failure}")


def read_qmp_counters(
    root: HostRoot, pid: int, timeout: float = DEFAULT_TIMEOUT_SECONDS
) -> tuple[KvmCounterValues, tuple[str, ...]]:
    """The VM's KVM counters via the first QMP socket on QEMU ``pid``'s command line that answers.

    Returns the counters and notes about sockets that did not answer (e.g. a busy libvirt monitor).
    Only meaningful on a live root (it connects to sockets). Raises QmpUnavailable.
    """
    cmdline = root.proc(pid, "cmdline")
    try:
        argv = parse_cmdline(root.read_bytes(cmdline, limit=1024 * 1024))
    except HostReadError as exc:
        raise QmpUnavailable(REASON_CMDLINE, str(exc)) from None
    sockets, notes = find_qmp_sockets(argv)
    if not sockets:
        raise QmpUnavailable(REASON_NO_SOCKET, f"pid {pid}" + (f" ({'; '.join(notes)})" if notes else ""))
    failures: list[QmpUnavailable] = []
    for s in sockets:
        # Through QEMU's root and cwd: right even when QEMU runs in its own mount namespace.
        rel = s.path if s.path.startswith("/") else None
        base = root.proc(pid, "root") if rel is not None else root.proc(pid, "cwd")
        target = base / (rel.lstrip("/") if rel is not None else s.path)
        label = f"QMP {s.path} ({s.origin}) of pid {pid}"
        try:
            values = query_vm_stats(target, label, expected_pid=pid, self_fd_dir=root.proc("self", "fd"), timeout=timeout)
        except QmpUnavailable as exc:
            failures.append(exc)
            continue
        if values.get("pages_2m") is None and values.get("lpages") is None:
            failures.append(QmpUnavailable(REASON_NO_STATS, label))
            continue
        counters = KvmCounterValues(
            naming="pages_Nx" if values["pages_2m"] is not None else "lpages",
            scope=CounterScope.QMP_QUERY_STATS,
            pages_4k=values["pages_4k"],
            pages_2m=values["pages_2m"],
            pages_1g=values["pages_1g"],
            large_pages=values["lpages"],
            nx_lpage_splits=values["nx_lpage_splits"],
            path=s.path,
        )
        return counters, tuple(f"skipped {f}" for f in failures)
    reasons = {f.reason for f in failures}
    reason = reasons.pop() if len(reasons) == 1 else REASON_NONE_ANSWERED
    raise QmpUnavailable(reason, "; ".join(str(f) for f in failures))
