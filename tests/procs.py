"""Real aggregator and agent processes on loopback for the streaming tests."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent
FIXTURES = Path(__file__).parent / "fixtures"
# Everything here talks to loopback: never through a proxy from the environment.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 20.0, want: int = 200) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            with OPENER.open(url, timeout=1) as r:
                if r.status == want:
                    return
        except OSError as exc:
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"{url} not answering {want} after {timeout} s: {last}")


def http_get(url: str) -> str:
    with OPENER.open(url, timeout=5) as r:
        return r.read().decode()


def http_fetch(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """(status, body), also for an HTTP error status (which http_get raises)."""
    try:
        with OPENER.open(url, timeout=timeout) as r:
            return int(r.status), r.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


@dataclass
class Proc:
    args: list[str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.log, "ab")
        self.popen = subprocess.Popen(self.args, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True, env=env_without_proxy())
        fh.close()
        return self

    def kill9(self) -> None:
        if self.popen and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(10)

    def term(self, timeout: float = 20.0) -> int:
        assert self.popen is not None
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        return self.popen.wait(timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Aggregator:
    workdir: Path
    extra: list[str] = field(default_factory=list)
    grpc_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    proc: Proc | None = None
    starts: int = 0
    # --state: None for SQLite under workdir/state, or a postgresql:// URL (a store shared with others).
    state: str | None = None

    @property
    def state_arg(self) -> str:
        return self.state or str(self.workdir / "state")

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, wait: bool = True) -> Aggregator:
        self.starts += 1
        self.proc = Proc([str(BIN / "eptwatch-server"), "--listen", self.target, "--http", f"127.0.0.1:{self.http_port}",
                          "--state", self.state_arg, *self.extra], self.workdir / "server.log").start()
        if wait:
            wait_http(self.http + "/readyz")
        return self

    def applied(self) -> dict[tuple[str, str], tuple[int, int]]:
        """(host, instance) -> (last_sequence, applied_total), read from the durable state."""
        if self.state is not None:
            import psycopg

            with psycopg.connect(self.state) as c:
                rows = c.execute("SELECT host_id, agent_instance, last_sequence, applied_total FROM agents").fetchall()
            return {(h, i): (int(s), int(n)) for h, i, s, n in rows}
        db = sqlite3.connect(self.workdir / "state" / "eptwatch.sqlite3")
        try:
            return {(h, i): (s, n) for h, i, s, n in db.execute("SELECT host_id, agent_instance, last_sequence, applied_total FROM agents")}
        finally:
            db.close()


def agent_args(server: str, spool: Path, host_id: str, fixture: str = "linux-5.3-unfixed", interval: float = 0.05,
               extra: list[str] | None = None) -> list[str]:
    return [str(BIN / "eptwatch-agent"), "run", "--server", server, "--root", str(FIXTURES / fixture), "--spool", str(spool),
            "--host-id", host_id, "--interval", str(interval), "--metrics-listen", "", *(extra or [])]


def spool_state(spool: Path) -> tuple[str, int, int]:
    """(agent_instance, reports created, reports still spooled)."""
    db = sqlite3.connect(spool)
    try:
        meta = dict(db.execute("SELECT key, value FROM meta"))
        depth = db.execute("SELECT count(*) FROM reports").fetchone()[0]
        return meta["agent_instance"], int(meta["next_sequence"]) - 1, int(depth)
    finally:
        db.close()


def env_without_proxy() -> dict[str, str]:
    env = dict(os.environ)
    for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "grpc_proxy", "all_proxy", "ALL_PROXY"):
        env.pop(k, None)
    return env
