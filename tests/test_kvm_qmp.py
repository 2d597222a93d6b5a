"""eptwatch.agent.sources.kvm_qmp: the query-stats parser, the QMP socket finder, the client, and the sampler's
per-VM backoff.

The client runs against a small in-process QMP server (a thread on a unix socket) that replays what
QEMU 7.2 sends; the real QEMU is exercised in tests/e2e/test_agent_e2e.py.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eptwatch.agent.model.sampler import Sampler, SamplerConfig
from eptwatch.agent.report.host_report import counters_to_pb
from eptwatch.agent.sources import kvm_qmp
from eptwatch.agent.sources.hostroot import HostRoot
from eptwatch.agent.sources.kvm_debugfs import CounterScope, KvmCounterValues
from eptwatch.agent.sources.kvm_qmp import (
    STAT_NAMES,
    QmpUnavailable,
    find_qmp_sockets,
    parse_query_stats,
    query_vm_stats,
    read_qmp_counters,
)
from eptwatch.agent.sources.status import ParseError, SourceState
from eptwatch.v1 import report_pb2 as pb

from .conftest import FIXTURES
from .fuzzing import fuzz_settings

# What QEMU 7.2.22 answered on the development host for a 512 MiB guest on tmpfs huge=always.
REAL_REPLY: list[dict[str, Any]] = [
    {
        "provider": "kvm",
        "stats": [
            {"name": "mmu_kicks_spared", "value": 0},
            {"name": "max_mmu_page_hash_collisions", "value": 0},
            {"name": "max_mmu_rmap_size", "value": 0},
            {"name": "nx_lpage_splits", "value": 0},
            {"name": "pages_1g", "value": 0},
            {"name": "pages_2m", "value": 252},
            {"name": "pages_4k", "value": 8},
            {"name": "mmu_unsync", "value": 0},
            {"name": "mmu_cache_miss", "value": 24},
            {"name": "remote_tlb_flush", "value": 0},
        ],
    }
]
GREETING = {"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": ""}, "capabilities": ["oob"]}}


# --- parse_query_stats ------------------------------------------------------------------------------


def test_parse_real_reply() -> None:
    assert parse_query_stats(REAL_REPLY, "t") == {
        "pages_4k": 8, "pages_2m": 252, "pages_1g": 0, "nx_lpage_splits": 0, "lpages": None,
    }
    # the whole response object is accepted too
    assert parse_query_stats({"return": REAL_REPLY, "id": "x"}, "t")["pages_2m"] == 252


def test_parse_absent_stats_are_none_not_zero() -> None:
    assert parse_query_stats([], "t") == dict.fromkeys(STAT_NAMES)
    # 5.14: only lpages
    got = parse_query_stats([{"provider": "kvm", "stats": [{"name": "lpages", "value": 7}]}], "t")
    assert got["lpages"] == 7 and got["pages_2m"] is None


def test_parse_ignores_other_providers_vcpu_results_and_foreign_value_types() -> None:
    reply = [
        {"provider": "cryptodev", "stats": [{"name": "pages_2m", "value": 999}]},
        {"provider": "kvm", "qom-path": "/machine/unattached/device[0]", "stats": [{"name": "pages_2m", "value": 5}]},
        {"provider": "kvm", "stats": [
            {"name": "pages_2m", "value": 3},
            {"name": "halt_poll_fail_hist", "value": [1, 2, 3]},  # a histogram we do not read
            {"name": "guest_mode", "value": True},
        ]},
    ]
    assert parse_query_stats(reply, "t")["pages_2m"] == 3


@pytest.mark.parametrize(
    ("reply", "fragment"),
    [
        ({"error": {"class": "GenericError"}}, "'return'"),
        ("nope", "list of StatsResult"),
        (None, "list of StatsResult"),
        ([1], "return[0]: expected an object"),
        ([{"stats": []}], "provider"),
        ([{"provider": 3, "stats": []}], "provider"),
        ([{"provider": "kvm"}], "stats: expected a list"),
        ([{"provider": "kvm", "stats": {"pages_2m": 1}}], "stats: expected a list"),
        ([{"provider": "kvm", "qom-path": 1, "stats": []}], "qom-path"),
        ([{"provider": "kvm", "stats": ["pages_2m"]}], "stats[0]: expected an object"),
        ([{"provider": "kvm", "stats": [{"value": 1}]}], "name: expected a string"),
        ([{"provider": "kvm", "stats": [{"name": "pages_2m"}]}], "no value"),
        ([{"provider": "kvm", "stats": [{"name": "pages_2m", "value": True}]}], "unsigned integer, got bool"),
        ([{"provider": "kvm", "stats": [{"name": "pages_2m", "value": "252"}]}], "unsigned integer, got str"),
        ([{"provider": "kvm", "stats": [{"name": "pages_2m", "value": 2.0}]}], "unsigned integer, got float"),
        ([{"provider": "kvm", "stats": [{"name": "pages_2m", "value": [252]}]}], "unsigned integer, got list"),
        ([{"provider": "kvm", "stats": [{"name": "pages_2m", "value": -1}]}], "not a u64"),
        ([{"provider": "kvm", "stats": [{"name": "pages_2m", "value": 2**64}]}], "not a u64"),
        ([{"provider": "kvm", "stats": [{"name": "pages_2m", "value": 1}, {"name": "pages_2m", "value": 2}]}], "twice"),
    ],
)
def test_parse_malformed(reply: object, fragment: str) -> None:
    with pytest.raises(ParseError) as ei:
        parse_query_stats(reply, "qmp-x")
    assert fragment in str(ei.value) and str(ei.value).startswith("qmp-x")


_json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=12)
_json = st.recursive(
    _json_scalars | st.sampled_from(["kvm", "pages_2m", "pages_4k", "lpages", "name", "value", "stats", "provider"]),
    lambda inner: st.lists(inner, max_size=5)
    | st.dictionaries(st.sampled_from(["provider", "stats", "name", "value", "qom-path", "return", "x"]), inner, max_size=4),
    max_leaves=30,
)


@pytest.mark.fuzz
@fuzz_settings(500)
@given(_json)
def test_parse_random_json_never_crashes(reply: object) -> None:
    try:
        got = parse_query_stats(reply, "fuzz")
    except ParseError:
        return
    assert set(got) == set(STAT_NAMES)
    for v in got.values():
        assert v is None or (type(v) is int and 0 <= v < 2**64)


_stat = st.fixed_dictionaries({"name": st.sampled_from(STAT_NAMES + ("mmu_unsync", "exits")), "value": st.integers(0, 2**64 - 1)})


@pytest.mark.fuzz
@fuzz_settings(300)
@given(st.lists(_stat, max_size=8, unique_by=lambda s: s["name"]))
def test_parse_valid_replies_round_trip(stats: list[dict[str, Any]]) -> None:
    got = parse_query_stats([{"provider": "kvm", "stats": stats}], "t")
    want = {s["name"]: s["value"] for s in stats if s["name"] in STAT_NAMES}
    assert got == {k: want.get(k) for k in STAT_NAMES}


# --- find_qmp_sockets -------------------------------------------------------------------------------


def test_find_sockets_harness_cmdline() -> None:
    argv = ["qemu-system-x86_64", "-name", "guest=a,debug-threads=on", "-chardev",
            "socket,id=ser0,path=/tmp/s/serial.sock,server=on,wait=off,logfile=/x", "-serial", "chardev:ser0",
            "-qmp", "unix:/tmp/s/qmp.sock,server=on,wait=off", "-qmp", "unix:/run/extra.sock,server,nowait"]
    socks, notes = find_qmp_sockets(argv)
    assert [s.path for s in socks] == ["/tmp/s/qmp.sock", "/run/extra.sock"]
    assert notes == []  # the serial chardev is not a monitor


def test_find_sockets_chardev_mon_and_escapes() -> None:
    argv = ["qemu", "-chardev", "socket,id=m0,path=/var/a,,b.sock,server=on,wait=off",
            "-mon", "chardev=m0,mode=control,pretty=on", "--chardev", "socket,id=m1,path=rel.sock,server",
            "-mon", "m1,mode=control", "-chardev", "socket,id=h,path=/hmp.sock,server=on", "-mon", "chardev=h"]
    socks, _ = find_qmp_sockets(argv)
    assert [s.path for s in socks] == ["/var/a,b.sock", "rel.sock"]  # -mon without mode=control is HMP
    assert "-chardev id=m0" in socks[0].origin


def test_find_sockets_keep_command_line_order() -> None:
    argv = ["qemu", "-mon", "chardev=m,mode=control", "-qmp", "unix:/b,server=on", "-chardev", "socket,id=m,path=/a,server=on"]
    assert [s.path for s in find_qmp_sockets(argv)[0]] == ["/a", "/b"]  # the -mon came first


def test_find_sockets_unreachable_monitors_are_explained() -> None:
    argv = ["qemu", "-chardev", "socket,id=charmonitor,fd=27,server=on,wait=off", "-mon",
            "chardev=charmonitor,id=monitor,mode=control", "-qmp", "tcp:127.0.0.1:4444,server=on",
            "-qmp", "unix:/tmp/client.sock", "-qmp", "unix:/x,server=off", "-mon", "chardev=missing,mode=control"]
    socks, notes = find_qmp_sockets(argv)
    assert socks == []
    text = "; ".join(notes)
    assert "fd=27" in text and "libvirt" in text
    assert "tcp:127.0.0.1:4444: not a unix socket" in text
    assert "unix:/tmp/client.sock: QEMU is the client" in text and "unix:/x: QEMU is the client" in text
    assert "chardev=missing" in text


def test_find_sockets_tolerates_truncated_argv() -> None:
    assert find_qmp_sockets(["qemu", "-qmp"]) == ([], [])
    assert find_qmp_sockets([]) == ([], [])


@pytest.mark.fuzz
@fuzz_settings(300)
@given(st.lists(st.sampled_from(["-qmp", "-mon", "-chardev", "unix:", "unix:/a,server", "socket,id=x,path=/p,server",
                                 "chardev=x,mode=control", "x", ",,", "=", ""]) | st.text(max_size=10), max_size=12))
def test_find_sockets_random_argv_never_crashes(argv: list[str]) -> None:
    socks, notes = find_qmp_sockets(["qemu", *argv])
    assert all(s.path for s in socks) and all(isinstance(n, str) for n in notes)


# --- the client against a fake QMP server -----------------------------------------------------------

Handler = Callable[[socket.socket], None]


def _send(conn: socket.socket, obj: object, pretty: bool = False) -> None:
    conn.sendall((json.dumps(obj, indent=2 if pretty else None) + "\r\n").encode())


def _read_cmd(conn: socket.socket, buf: list[bytes]) -> dict[str, Any]:
    while b"\n" not in b"".join(buf):
        chunk = conn.recv(4096)
        if not chunk:
            raise ConnectionError("client closed")
        buf.append(chunk)
    line, _, rest = b"".join(buf).partition(b"\n")
    buf[:] = [rest]
    msg: dict[str, Any] = json.loads(line)
    return msg


def qemu_like(reply: object = REAL_REPLY, pretty: bool = False, events: bool = False, stats_error: dict[str, str] | None = None) -> Handler:
    """Answers like QEMU: greeting, qmp_capabilities, query-stats (echoing the id)."""

    def handle(conn: socket.socket) -> None:
        buf: list[bytes] = []
        _send(conn, GREETING, pretty)
        cmd = _read_cmd(conn, buf)
        assert cmd["execute"] == "qmp_capabilities"
        _send(conn, {"return": {}, "id": cmd["id"]}, pretty)
        cmd = _read_cmd(conn, buf)
        assert cmd == {"execute": "query-stats", "id": cmd["id"],
                       "arguments": {"target": "vm", "providers": [{"provider": "kvm"}]}}
        if events:
            _send(conn, {"event": "RTC_CHANGE", "data": {"offset": 0}, "timestamp": {"seconds": 1, "microseconds": 0}}, pretty)
            _send(conn, {"return": [], "id": "someone-else"}, pretty)
        if stats_error is not None:
            _send(conn, {"error": stats_error, "id": cmd["id"]}, pretty)
        else:
            _send(conn, {"return": reply, "id": cmd["id"]}, pretty)

    return handle


def send_then_hang(data: bytes) -> Handler:
    def handle(conn: socket.socket) -> None:
        conn.sendall(data)
        time.sleep(2)

    return handle


class FakeQmp:
    """A unix socket server thread: ``accept=False`` never accepts (like a QMP monitor that has a client)."""

    def __init__(self, path: Path, handler: Handler | None, accept: bool = True) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(1)
        self.sock.settimeout(10)
        self.handler = handler
        self.errors: list[BaseException] = []
        self.thread: threading.Thread | None = None
        if accept:
            self.thread = threading.Thread(target=self._run, daemon=True)
            self.thread.start()

    def _run(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(10)
            try:
                if self.handler is not None:
                    self.handler(conn)
                time.sleep(0.05)
            except (ConnectionError, OSError):
                pass
            except BaseException as exc:  # an assertion in the handler: report it from the test
                self.errors.append(exc)

    def close(self) -> None:
        self.sock.close()
        if self.thread is not None:
            self.thread.join(5)
        assert not self.errors, self.errors


@pytest.fixture
def sockdir() -> Iterator[Path]:
    # unix socket paths are limited to 107 bytes: pytest's tmp_path is too long
    with tempfile.TemporaryDirectory(prefix="qmpt-", dir="/tmp") as d:
        yield Path(d)


def _query(path: Path, timeout: float = 0.5, expected_pid: int | None = None) -> dict[str, int | None]:
    got: dict[str, int | None] = query_vm_stats(
        path, f"QMP {path}", expected_pid=os.getpid() if expected_pid is None else expected_pid, timeout=timeout
    )
    return got


@pytest.mark.parametrize("pretty", [False, True])
@pytest.mark.parametrize("events", [False, True])
def test_client_reads_stats(sockdir: Path, pretty: bool, events: bool) -> None:
    srv = FakeQmp(sockdir / "q.sock", qemu_like(pretty=pretty, events=events))
    try:
        assert _query(srv.path)["pages_2m"] == 252
    finally:
        srv.close()


def test_client_busy_monitor_gives_up_after_timeout(sockdir: Path) -> None:
    # accepted but never greeted: what a second client of a QEMU monitor sees
    srv = FakeQmp(sockdir / "q.sock", lambda conn: time.sleep(2))
    try:
        with pytest.raises(QmpUnavailable) as ei:
            _query(srv.path, timeout=0.3)
    finally:
        srv.sock.close()  # the silent handler need not be waited for (daemon thread)
    assert ei.value.reason == kvm_qmp.REASON_BUSY  # a client that waited out the sleep would see it close instead


def test_client_full_backlog_is_busy(sockdir: Path) -> None:
    srv = FakeQmp(sockdir / "q.sock", None, accept=False)
    hogs = []
    try:
        for _ in range(4):  # fill the listen backlog
            h = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            h.setblocking(False)
            try:
                h.connect(str(srv.path))
            except BlockingIOError:
                h.close()
                break
            hogs.append(h)
        with pytest.raises(QmpUnavailable) as ei:
            _query(srv.path, timeout=0.3)
        assert ei.value.reason == kvm_qmp.REASON_BUSY
    finally:
        for h in hogs:
            h.close()
        srv.close()


@pytest.mark.parametrize(
    ("handler", "reason"),
    [
        (qemu_like(stats_error={"class": "CommandNotFound", "desc": "The command query-stats has not been found"}), kvm_qmp.REASON_NO_QUERY_STATS),
        (qemu_like(stats_error={"class": "GenericError", "desc": "kvm not enabled"}), kvm_qmp.REASON_QMP_ERROR),
        (qemu_like(reply=[{"provider": "kvm", "stats": [{"name": "pages_2m", "value": "x"}]}]), kvm_qmp.REASON_PROTOCOL),
        (lambda conn: _send(conn, {"hello": 1}), kvm_qmp.REASON_PROTOCOL),
        (lambda conn: _send(conn, [1, 2]), kvm_qmp.REASON_PROTOCOL),
        (send_then_hang(b"x" * 100 + b"\n"), kvm_qmp.REASON_PROTOCOL),  # not JSON
        (send_then_hang(b'{"QMP": {'), kvm_qmp.REASON_PROTOCOL),  # half a greeting, then silence
        (send_then_hang(b"{" * (1100 * 1024)), kvm_qmp.REASON_PROTOCOL),  # never a complete message: size cap
        (lambda conn: None, kvm_qmp.REASON_PROTOCOL),  # closed at once
        # Found by fuzzing: complete JSON that Python refuses to build escaped as ValueError/RecursionError.
        (send_then_hang(b'{"QMP": {"version": ' + b"9" * 5000 + b"}}\n"), kvm_qmp.REASON_PROTOCOL),  # past 4,300 digits
        (send_then_hang(b'{"QMP": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"), kvm_qmp.REASON_PROTOCOL),  # nested too deep
        (send_then_hang(json.dumps(GREETING).encode() + b"\r\n"), kvm_qmp.REASON_TIMEOUT),  # greets, then hangs
    ],
)
def test_client_failures_have_reasons(sockdir: Path, handler: Handler, reason: str) -> None:
    srv = FakeQmp(sockdir / "q.sock", handler)
    try:
        with pytest.raises(QmpUnavailable) as ei:
            _query(srv.path, timeout=0.3)
    finally:
        srv.sock.close()  # the hanging handlers need not be waited for
    assert ei.value.reason == reason, str(ei.value)
    assert str(srv.path) in str(ei.value)


def test_client_refuses_a_socket_of_another_process(sockdir: Path) -> None:
    srv = FakeQmp(sockdir / "q.sock", qemu_like())
    try:
        with pytest.raises(QmpUnavailable) as ei:
            _query(srv.path, expected_pid=os.getpid() + 100000)
    finally:
        srv.close()
    assert ei.value.reason == kvm_qmp.REASON_NOT_OWNER and f"listener is pid {os.getpid()}" in str(ei.value)


def test_client_path_problems(sockdir: Path) -> None:
    with pytest.raises(QmpUnavailable) as ei:
        _query(sockdir / "missing.sock")
    assert ei.value.reason == kvm_qmp.REASON_SOCKET_MISSING
    (sockdir / "file").write_text("")
    with pytest.raises(QmpUnavailable) as ei:
        _query(sockdir / "file")
    assert ei.value.reason == kvm_qmp.REASON_NOT_A_SOCKET
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sockdir / "stale.sock"))
    stale.close()  # the file stays, nobody listens: QEMU was killed without cleanup
    with pytest.raises(QmpUnavailable) as ei:
        _query(sockdir / "stale.sock")
    assert ei.value.reason == kvm_qmp.REASON_REFUSED


# --- read_qmp_counters: command line -> counters ----------------------------------------------------


def _fake_proc(tmp_path: Path, argv: list[str]) -> HostRoot:
    """A procfs whose entry for this very process has ``argv``; root/cwd/self point at the real ones,
    so the sockets it names are this test's fake servers (whose listener pid is ours)."""
    proc = tmp_path / "proc"
    me = proc / str(os.getpid())
    me.mkdir(parents=True)
    (me / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    (me / "root").symlink_to("/")
    (me / "cwd").symlink_to(os.getcwd())
    (proc / "self").symlink_to("/proc/self")
    return HostRoot(procfs=proc, sysfs=tmp_path / "sys", debugfs=tmp_path / "dbg")


def test_read_counters_skips_a_busy_monitor_and_uses_the_next(tmp_path: Path, sockdir: Path) -> None:
    busy = FakeQmp(sockdir / "busy.sock", lambda conn: time.sleep(2))
    good = FakeQmp(sockdir / "good.sock", qemu_like())
    root = _fake_proc(tmp_path, ["qemu-system-x86_64", "-qmp", f"unix:{busy.path},server=on,wait=off",
                                 "-chardev", f"socket,id=m,path={good.path},server=on,wait=off", "-mon", "chardev=m,mode=control"])
    try:
        counters, notes = read_qmp_counters(root, os.getpid(), timeout=0.3)
    finally:
        busy.sock.close()
        good.close()
    assert counters == KvmCounterValues(naming="pages_Nx", scope=CounterScope.QMP_QUERY_STATS, pages_4k=8, pages_2m=252,
                                        pages_1g=0, large_pages=None, nx_lpage_splits=0, path=str(good.path))
    assert len(notes) == 1 and kvm_qmp.REASON_BUSY in notes[0] and str(busy.path) in notes[0]


def test_read_counters_legacy_lpages(tmp_path: Path, sockdir: Path) -> None:
    srv = FakeQmp(sockdir / "q.sock", qemu_like(reply=[{"provider": "kvm", "stats": [{"name": "lpages", "value": 12}]}]))
    root = _fake_proc(tmp_path, ["qemu", "-qmp", f"unix:{srv.path},server,nowait"])
    try:
        counters, _ = read_qmp_counters(root, os.getpid(), timeout=0.3)
    finally:
        srv.close()
    assert counters.naming == "lpages" and counters.large_pages == 12 and counters.pages_2m is None


def test_read_counters_no_huge_stat(tmp_path: Path, sockdir: Path) -> None:
    srv = FakeQmp(sockdir / "q.sock", qemu_like(reply=[{"provider": "kvm", "stats": [{"name": "pages_4k", "value": 1}]}]))
    root = _fake_proc(tmp_path, ["qemu", "-qmp", f"unix:{srv.path},server=on"])
    try:
        with pytest.raises(QmpUnavailable) as ei:
            read_qmp_counters(root, os.getpid(), timeout=0.3)
    finally:
        srv.close()
    assert ei.value.reason == kvm_qmp.REASON_NO_STATS


def test_read_counters_relative_path_resolves_in_qemu_cwd(tmp_path: Path, sockdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    srv = FakeQmp(sockdir / "q.sock", qemu_like())
    monkeypatch.chdir(sockdir)  # the fake process's cwd link points here
    root = _fake_proc(tmp_path, ["qemu", "-qmp", "unix:q.sock,server=on,wait=off"])
    try:
        counters, _ = read_qmp_counters(root, os.getpid(), timeout=0.3)
    finally:
        srv.close()
    assert counters.pages_2m == 252 and counters.path == "q.sock"


def test_read_counters_without_socket_or_cmdline(tmp_path: Path) -> None:
    root = _fake_proc(tmp_path, ["qemu", "-chardev", "socket,id=charmonitor,fd=27,server=on,wait=off",
                                 "-mon", "chardev=charmonitor,id=monitor,mode=control"])
    with pytest.raises(QmpUnavailable) as ei:
        read_qmp_counters(root, os.getpid(), timeout=0.3)
    assert ei.value.reason == kvm_qmp.REASON_NO_SOCKET and "fd=27" in str(ei.value)
    with pytest.raises(QmpUnavailable) as ei:
        read_qmp_counters(root, os.getpid() + 1, timeout=0.3)
    assert ei.value.reason == kvm_qmp.REASON_CMDLINE


def test_read_counters_all_failing_sockets_are_listed(tmp_path: Path, sockdir: Path) -> None:
    root = _fake_proc(tmp_path, ["qemu", "-qmp", f"unix:{sockdir}/a.sock,server=on", "-qmp", f"unix:{sockdir}/b.sock,server=on"])
    (sockdir / "b.sock").write_text("")
    with pytest.raises(QmpUnavailable) as ei:
        read_qmp_counters(root, os.getpid(), timeout=0.3)
    assert ei.value.reason == kvm_qmp.REASON_NONE_ANSWERED
    assert kvm_qmp.REASON_SOCKET_MISSING in str(ei.value) and kvm_qmp.REASON_NOT_A_SOCKET in str(ei.value)


def test_scope_reaches_the_wire() -> None:
    msg = counters_to_pb(KvmCounterValues("pages_Nx", CounterScope.QMP_QUERY_STATS, pages_2m=3, path="/run/q.sock"))
    assert msg.scope == pb.COUNTER_SCOPE_QMP_QUERY_STATS == 4
    assert pb.CounterScope.Name(msg.scope) == "COUNTER_SCOPE_QMP_QUERY_STATS"


# --- per-VM backoff: a busy or unreachable monitor is not asked every interval ----------------------


def test_backoff_doubles_up_to_the_cap_and_resets_on_success() -> None:
    b = kvm_qmp.QmpBackoff(max_intervals=32)
    assert not b.skip() and b.failure_note() == ""
    skips = []
    for i in range(8):
        skips.append(b.failed(f"failure {i}"))
        assert f"last failure: failure {i}" in b.skip_note()
        n = 0
        while b.skip():
            n += 1
        assert n == skips[-1]
    assert skips == [1, 2, 4, 8, 16, 32, 32, 32]
    b.failed("again")
    assert "next 32 interval(s)" in b.failure_note() and "9 failure(s) in a row" in b.failure_note()
    b.succeeded()
    assert (b.failures, b.skip_left, b.last_failure) == (0, 0, "") and not b.skip()
    assert b.failed("after a success") == 1  # starts over
    off = kvm_qmp.QmpBackoff(max_intervals=0)
    assert off.failed("x") == 0 and not off.skip() and off.failure_note() == ""


def _qmp_vm_root(tmp_path: Path, sock: Path) -> tuple[HostRoot, Path]:
    """The debugfs-missing fixture host with its QEMU moved to this test's pid (the fake QMP servers'
    listener is this process, and query_vm_stats checks the listener's pid) and given ``-qmp sock``."""
    host = tmp_path / "host"
    shutil.copytree(FIXTURES / "debugfs-missing", host, symlinks=True)
    me = host / "proc" / str(os.getpid())
    (host / "proc" / "9500").rename(me)
    stat = (me / "stat").read_text()
    (me / "stat").write_text(f"{os.getpid()}{stat[stat.index(' '):]}")
    argv = (me / "cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    argv += [b"-qmp", f"unix:{sock},server=on,wait=off".encode()]
    (me / "cmdline").write_bytes(b"\0".join(argv) + b"\0")
    (me / "root").symlink_to("/")
    (host / "proc" / "self").symlink_to("/proc/self")
    return HostRoot.from_root(host), me


def _qmp_status(sample: Any) -> Any:
    (vs,) = sample.vms
    found = [s for s in vs.statuses if s.source == "kvm_qmp"]
    assert len(found) == 1, vs.statuses
    return found[0]


def test_sampler_backs_off_a_busy_monitor_per_vm_and_resets_on_success(
    tmp_path: Path, sockdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sock = sockdir / "q.sock"
    root, me = _qmp_vm_root(tmp_path, sock)
    monkeypatch.setattr(HostRoot, "is_live", property(lambda self: True))  # the QMP path only runs live
    attempts: list[int] = []
    real = kvm_qmp.read_qmp_counters

    def counting(root: HostRoot, pid: int, timeout: float = 1.0) -> Any:
        attempts.append(n)
        return real(root, pid, timeout)

    monkeypatch.setattr(kvm_qmp, "read_qmp_counters", counting)
    # Every use of a monitor socket starts by opening its path: counted per interval.
    socket_opens: list[int] = []
    real_open = kvm_qmp._open_socket_path

    def counting_open(path: Path, label: str) -> int:
        socket_opens.append(n)
        return real_open(path, label)

    monkeypatch.setattr(kvm_qmp, "_open_socket_path", counting_open)
    sampler = Sampler(root, SamplerConfig(qmp_timeout_seconds=0.2, qmp_backoff_max_intervals=4))
    # Like a QEMU monitor with another client: connects queue in the backlog, no greeting ever comes.
    busy = FakeQmp(sock, None, accept=False)
    reasons = {}
    try:
        for n in range(1, 11):
            s = sampler.sample()
            st = _qmp_status(s)
            reasons[n] = st.reason
            assert st.state is SourceState.UNAVAILABLE and s.vms[0].counters is None
            if n not in attempts:
                assert n not in socket_opens, "a skipped interval must not touch the socket"
    finally:
        busy.sock.close()
    # attempts after 0, 1, 2, 4, 4 skipped intervals (the cap)
    assert attempts == [1, 3, 6]
    assert sorted(set(socket_opens)) == [1, 3, 6]
    assert kvm_qmp.REASON_BUSY in reasons[1] and "backing off: QMP not asked for the next 1 interval(s)" in reasons[1]
    assert reasons[2].startswith("backing off after 1 failure(s) in a row: QMP not asked this interval (0 more")
    assert kvm_qmp.REASON_BUSY in reasons[2] and str(sock) in reasons[2]  # the last failure, named
    assert "next 2 interval(s) (2 failure(s) in a row)" in reasons[3]
    assert "next 4 interval(s) (3 failure(s) in a row)" in reasons[6]
    assert "(3 more interval(s) to skip)" in reasons[7]

    # The monitor is free again: the next attempt (after the skips) succeeds and resets the backoff.
    sock.unlink()
    for n in range(11, 14):
        good = FakeQmp(sock, qemu_like())  # answers one connection, like a fresh monitor
        try:
            s = sampler.sample()
        finally:
            good.close()
            sock.unlink()
        st = _qmp_status(s)
        assert st.state is SourceState.OK and st.path == str(sock), st
        assert s.vms[0].counters is not None and s.vms[0].counters.pages_2m == 252
        assert s.estimates[0].observed_huge_2m == 252
    assert attempts == [1, 3, 6, 11, 12, 13]  # after a success: every interval again


def test_sampler_backoff_is_per_process_and_can_be_disabled(tmp_path: Path, sockdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sock = sockdir / "missing.sock"  # unreachable: nothing at that path
    root, me = _qmp_vm_root(tmp_path, sock)
    monkeypatch.setattr(HostRoot, "is_live", property(lambda self: True))
    sampler = Sampler(root, SamplerConfig(qmp_timeout_seconds=0.2))
    first = _qmp_status(sampler.sample())
    assert kvm_qmp.REASON_SOCKET_MISSING in first.reason and "backing off" in first.reason
    assert "backing off after 1 failure(s)" in _qmp_status(sampler.sample()).reason
    # The pid now belongs to another process (new start time): it is asked at once.
    stat = (me / "stat").read_text().split(" ")
    stat[21] = str(int(stat[21]) + 1)
    (me / "stat").write_text(" ".join(stat))
    again = _qmp_status(sampler.sample())
    assert kvm_qmp.REASON_SOCKET_MISSING in again.reason and "next 1 interval(s) (1 failure(s) in a row)" in again.reason
    # qmp_backoff_max_intervals=0: asked every interval
    every = Sampler(root, SamplerConfig(qmp_timeout_seconds=0.2, qmp_backoff_max_intervals=0))
    for _ in range(3):
        st = _qmp_status(every.sample())
        assert kvm_qmp.REASON_SOCKET_MISSING in st.reason and "backing off" not in st.reason
    # use_qmp=False: QMP is not tried at all
    off = Sampler(root, SamplerConfig(use_qmp=False)).sample()
    assert not any(s.source == "kvm_qmp" for s in off.vms[0].statuses)
    assert off.vms[0].counters is None
