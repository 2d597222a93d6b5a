"""A real PostgreSQL server for tests: Debian's `postgresql` binaries, a cluster in a temporary directory,
a free port on 127.0.0.1, no system service. One server per test session (started on first use, stopped
at exit); each test gets its own database, so tests never see each other's rows.

initdb refuses to run as root: as root the cluster belongs to the `postgres` system user the package
creates, and its programs run through `runuser`.
"""

from __future__ import annotations

import atexit
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from .procs import free_port

PG_BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
                     reverse=True)
SUPERUSER = "eptwatch"


@dataclass
class PgServer:
    bin_dir: Path
    base: Path
    port: int
    run_as: str | None  # system user the cluster runs as (root cannot run PostgreSQL), None: this user
    fsync: bool = False  # benchmarks flush commits to disk as a real deployment does (see start)
    _databases: itertools.count = itertools.count(1)  # type: ignore[type-arg]

    @property
    def data(self) -> Path:
        return self.base / "data"

    def _cmd(self, *args: str) -> list[str]:
        prefix = ["runuser", "-u", self.run_as, "--"] if self.run_as else []
        return [*prefix, *args]

    def start(self) -> PgServer:
        subprocess.run(self._cmd(str(self.bin_dir / "initdb"), "-D", str(self.data), "-U", SUPERUSER, "--auth=trust",
                                 "--encoding=UTF8", "--no-instructions"), check=True, capture_output=True)
        # fsync off: the tests kill aggregators, never this server or the machine, so what a committed
        # transaction promises (visible to every later transaction) holds without paying for disk flushes.
        opts = (f"-k {self.base} -p {self.port} -c listen_addresses=127.0.0.1 -c fsync={'on' if self.fsync else 'off'} "
                "-c max_connections=200")
        subprocess.run(self._cmd(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-l", str(self.base / "server.log"),
                                 "-o", opts, "-w", "start"), check=True, capture_output=True)
        return self

    def stop(self) -> None:
        subprocess.run(self._cmd(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"),
                       capture_output=True)
        shutil.rmtree(self.base, ignore_errors=True)

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database; its DSN."""
        import psycopg

        name = f"t{os.getpid()}_{next(self._databases)}"
        with psycopg.connect(self.dsn(), autocommit=True) as c:
            c.execute(f"CREATE DATABASE {name}")
        return self.dsn(name)


_server: PgServer | None = None
_why_not: str | None = None


def _start(fsync: bool = False) -> PgServer:
    if not PG_BIN_DIRS:
        raise RuntimeError("PostgreSQL is not installed (Debian package postgresql; `make system-deps` installs it)")
    bin_dir = PG_BIN_DIRS[0]
    run_as: str | None = None
    base = Path(tempfile.mkdtemp(prefix="eptwatch-pg-"))
    if os.geteuid() == 0:
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            raise RuntimeError("running as root and there is no `postgres` user to run PostgreSQL as") from None
        if shutil.which("runuser") is None:
            raise RuntimeError("running as root and runuser (util-linux) is missing")
        os.chown(base, pw.pw_uid, pw.pw_gid)
        run_as = "postgres"
    server = PgServer(bin_dir, base, free_port(), run_as, fsync=fsync)
    try:
        server.start()
    except subprocess.CalledProcessError as exc:
        log = base / "server.log"
        detail = (exc.stderr or b"").decode(errors="replace")[-500:] + (log.read_text()[-500:] if log.exists() else "")
        shutil.rmtree(base, ignore_errors=True)
        raise RuntimeError(f"PostgreSQL did not start ({' '.join(exc.cmd[-3:])}): {detail}") from None
    atexit.register(server.stop)
    return server


def pg_server() -> PgServer:
    """The session's PostgreSQL server; skips the calling test, with the reason, where there can be none."""
    global _server, _why_not
    if _server is None and _why_not is None:
        try:
            import psycopg  # noqa: F401
        except ImportError as exc:
            _why_not = f"psycopg is not installed: {exc}"
        else:
            try:
                _server = _start()
            except (RuntimeError, OSError) as exc:
                _why_not = str(exc)
    if _server is None:
        pytest.skip(f"no PostgreSQL for this test: {_why_not}")
    return _server


def wait_until(cond, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise TimeoutError(f"condition not met in {timeout} s")
