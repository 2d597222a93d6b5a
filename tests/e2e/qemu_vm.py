"""Real-VM harness for eptwatch end-to-end tests.

Boots the tiny freestanding guest in ``tests/e2e/guest`` under real
QEMU/KVM, with guest RAM on a chosen backend, so tests can observe what the
host kernel really does with the guest's memory (THP / shmem PMD mappings,
KVM's per-VM ``pages_2m`` / ``pages_4k`` counters, QMP ``query-stats``).

The guest (see ``guest/guest.S``) writes one qword to every 4 KiB page of
its RAM above 8 MiB from ring 3, prints ``EPTWATCH-TOUCHED ...`` on COM1,
then waits for one-byte commands on the serial line: ``t`` touches all pages
again, ``p`` answers ``EPTWATCH-PONG``, ``q`` powers off via ACPI.

This module has no pytest dependency.  Everything it starts it stops again
by pid; every mount it makes it unmounts, also on errors.

Typical use::

    elf = build_guest(tmp_path)
    with mounted_tmpfs(tmp_path, huge="always", size="1100M") as mnt:
        with QemuVm(elf, memory_mib=1024, backend="file",
                    mem_path=mnt.path / "guest.ram", workdir=tmp_path) as vm:
            vm.wait_touched(timeout=60)
            vma = vm.ram_vma()
            assert vma.fields["ShmemPmdMapped"] > 900 * 1024
            counts = vm.kvm_page_counts()
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid as uuid_mod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "GUEST_SRC_DIR",
    "MARKER_TOUCHED",
    "DEBUGFS_ROOT",
    "QemuVm",
    "QmpClient",
    "QmpError",
    "SmapsVma",
    "TmpfsMount",
    "TouchInfo",
    "build_guest",
    "ensure_debugfs",
    "find_ram_vma",
    "is_root",
    "kvm_available",
    "kvm_debugfs_dir",
    "mounted_tmpfs",
    "proc_status",
    "read_kvm_page_counts",
    "read_smaps",
]

GUEST_SRC_DIR = Path(__file__).resolve().parent / "guest"
MARKER_TOUCHED = "EPTWATCH-TOUCHED"
DEBUGFS_ROOT = Path("/sys/kernel/debug")
QEMU_BINARY = "qemu-system-x86_64"

_PR_SET_PDEATHSIG = 1
_PR_SET_THP_DISABLE = 41

# "object": guest RAM from ``object_spec`` (any -object memory-backend-*,id=ram0,...);
# "mem-path": the legacy ``-mem-path`` option (no -object, no machine memory-backend=).
Backend = Literal["file", "ram", "object", "mem-path"]


# --------------------------------------------------------------------------
# prerequisites


def is_root() -> bool:
    return os.geteuid() == 0


def kvm_available(qemu_binary: str = QEMU_BINARY) -> tuple[bool, str]:
    """Whether a real KVM VM can be booted here; the reason when not."""
    kvm = Path("/dev/kvm")
    if not kvm.exists():
        return False, "/dev/kvm does not exist (no KVM on this host)"
    try:
        fd = os.open(kvm, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return False, f"/dev/kvm cannot be opened: {exc}"
    os.close(fd)
    for tool, hint in (
        (qemu_binary, "apt-get install -y qemu-system-x86 seabios"),
        ("as", "apt-get install -y binutils"),
        ("ld", "apt-get install -y binutils"),
    ):
        if shutil.which(tool) is None:
            return False, f"{tool} not found in PATH ({hint})"
    return True, ""


def real_vm_skip_reason(root_needed_for: str) -> str | None:
    """Why the real-VM tests of a module cannot run here (None: they can): EPTWATCH_SKIP_E2E=1, no
    usable KVM, or not root (`root_needed_for` says what the module needs root for)."""
    if os.environ.get("EPTWATCH_SKIP_E2E") == "1":
        return "EPTWATCH_SKIP_E2E=1"
    ok, why = kvm_available()
    if not ok:
        return f"real-VM e2e tests need KVM: {why}"
    if not is_root():
        return f"real-VM e2e tests need root ({root_needed_for})"
    return None


def ensure_debugfs(root: Path = DEBUGFS_ROOT) -> bool:
    """Mount debugfs at ``root`` if needed; True when ``root/kvm`` exists."""
    if (root / "kvm").is_dir():
        return True
    if is_root():
        subprocess.run(
            ["mount", "-t", "debugfs", "none", str(root)],
            check=False,
            capture_output=True,
        )
    return (root / "kvm").is_dir()


# --------------------------------------------------------------------------
# guest build


def build_guest(out_dir: Path, src_dir: Path = GUEST_SRC_DIR) -> Path:
    """Assemble and link the guest into ``out_dir``; returns the ELF path.

    The result is a 32-bit ELF (multiboot v1) containing the 64-bit code;
    QEMU's multiboot loader refuses ELF64 images.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    obj = out_dir / "guest.o"
    elf = out_dir / "guest.elf"
    subprocess.run(
        ["as", "--32", "-o", str(obj), str(src_dir / "guest.S")],
        check=True,
        capture_output=True,
        text=True,
    )
    ld = ["ld", "-m", "elf_i386", "-nostdlib", "-T", str(src_dir / "linker.ld")]
    ld_help = subprocess.run(["ld", "--help"], capture_output=True, text=True).stdout
    if "--no-warn-rwx-segments" in ld_help:
        ld.append("--no-warn-rwx-segments")
    subprocess.run(
        [*ld, "-o", str(elf), str(obj)], check=True, capture_output=True, text=True
    )
    return elf


# --------------------------------------------------------------------------
# tmpfs


@dataclass(frozen=True)
class TmpfsMount:
    path: Path
    huge: str
    size: str


@contextlib.contextmanager
def mounted_tmpfs(
    parent: Path, huge: str = "always", size: str = "1100M"
) -> Iterator[TmpfsMount]:
    """Mount a fresh tmpfs (``huge=always|never|within_size|advise``) in a new
    directory under ``parent``; always unmounts and removes it again."""
    mnt = Path(tempfile.mkdtemp(prefix=f"tmpfs-{huge}-", dir=parent))
    try:
        subprocess.run(
            [
                "mount",
                "-t",
                "tmpfs",
                "-o",
                f"size={size},huge={huge},mode=0700",
                "tmpfs",
                str(mnt),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
    except BaseException:
        mnt.rmdir()
        raise
    try:
        yield TmpfsMount(path=mnt, huge=huge, size=size)
    finally:
        _umount(mnt)
        with contextlib.suppress(OSError):
            mnt.rmdir()


def _umount(path: Path) -> None:
    for _ in range(50):
        r = subprocess.run(["umount", str(path)], capture_output=True, text=True)
        if r.returncode == 0 or not os.path.ismount(path):
            return
        time.sleep(0.1)  # e.g. a QEMU we just SIGKILLed still holds the file
    subprocess.run(["umount", "-l", str(path)], capture_output=True, text=True)


# --------------------------------------------------------------------------
# /proc and debugfs readers


@dataclass
class SmapsVma:
    start: int
    end: int
    perms: str
    pathname: str
    fields: dict[str, int] = field(default_factory=dict)  # kB values
    vmflags: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        return self.end - self.start


_SMAPS_HEADER = re.compile(
    r"^([0-9a-f]+)-([0-9a-f]+)\s+(\S+)\s+\S+\s+\S+\s+\S+\s*(.*)$"
)


def read_smaps(pid: int) -> list[SmapsVma]:
    vmas: list[SmapsVma] = []
    with open(f"/proc/{pid}/smaps", encoding="utf-8", errors="replace") as f:
        for line in f:
            m = _SMAPS_HEADER.match(line)
            if m:
                vmas.append(
                    SmapsVma(
                        int(m.group(1), 16),
                        int(m.group(2), 16),
                        m.group(3),
                        m.group(4).strip(),
                    )
                )
                continue
            if not vmas:
                continue
            key, _, rest = line.partition(":")
            if key == "VmFlags":
                vmas[-1].vmflags = rest.split()
                continue
            parts = rest.split()
            if parts and parts[0].isdigit():
                vmas[-1].fields[key] = int(parts[0])
    return vmas


def find_ram_vma(pid: int, size_bytes: int, mem_path: Path | None = None) -> SmapsVma:
    """The VMA of QEMU process ``pid`` that holds the guest RAM.

    File backend: the mapping of ``mem_path``.  Anonymous backend: the
    largest-RSS anonymous mapping at least ``size_bytes`` large.
    """
    vmas = read_smaps(pid)
    if mem_path is not None:
        want = str(mem_path)
        cands = [v for v in vmas if v.pathname in (want, want + " (deleted)")]
    else:
        cands = [v for v in vmas if v.pathname == "" and v.size >= size_bytes]
    if not cands:
        raise LookupError(
            f"no guest RAM VMA in /proc/{pid}/smaps (size={size_bytes}, "
            f"mem_path={mem_path})"
        )
    return max(cands, key=lambda v: (v.fields.get("Rss", 0), v.size))


def proc_status(pid: int) -> dict[str, str]:
    out: dict[str, str] = {}
    with open(f"/proc/{pid}/status", encoding="utf-8") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = v.strip()
    return out


def kvm_debugfs_dir(pid: int, root: Path = DEBUGFS_ROOT) -> Path | None:
    """The per-VM KVM debugfs directory ``<root>/kvm/<pid>-<fd>`` of ``pid``.

    If the process has several VM fds (never the case for QEMU), the one
    with the highest fd number is returned.
    """
    kvm = root / "kvm"
    try:
        names = [p.name for p in kvm.iterdir()]
    except OSError:
        return None
    best: tuple[int, str] | None = None
    for name in names:
        p, sep, fd = name.partition("-")
        if sep and p == str(pid) and fd.isdigit():
            if best is None or int(fd) > best[0]:
                best = (int(fd), name)
    return kvm / best[1] if best else None


def read_kvm_page_counts(vm_dir: Path) -> dict[str, int]:
    """``pages_4k``/``pages_2m``/``pages_1g`` from a per-VM debugfs dir
    (readable, like the other mode-0444 stats there; see README.md)."""
    out: dict[str, int] = {}
    for name in ("pages_4k", "pages_2m", "pages_1g"):
        with contextlib.suppress(OSError, ValueError):
            out[name] = int((vm_dir / name).read_text().strip())
    return out


# --------------------------------------------------------------------------
# QMP


class QmpError(RuntimeError):
    pass


class QmpClient:
    """Minimal blocking QMP client over a unix socket."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self.events: list[dict[str, Any]] = []
        self.greeting: dict[str, Any] | None = None
        self._sock: socket.socket | None = None
        self._buf = b""
        self._next_id = 0

    def connect(self, deadline: float) -> None:
        last: Exception | None = None
        while time.monotonic() < deadline:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.settimeout(self.timeout)
                s.connect(str(self.path))
            except OSError as exc:
                s.close()
                last = exc
                time.sleep(0.05)
                continue
            self._sock = s
            self.greeting = self._read_msg()
            if "QMP" not in self.greeting:
                raise QmpError(f"unexpected QMP greeting: {self.greeting}")
            self.execute("qmp_capabilities")
            return
        raise QmpError(f"cannot connect to QMP socket {self.path}: {last}")

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None

    def _read_msg(self) -> dict[str, Any]:
        assert self._sock is not None
        while b"\n" not in self._buf:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise QmpError("QMP connection closed")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        msg: dict[str, Any] = json.loads(line)
        return msg

    def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        if self._sock is None:
            raise QmpError("QMP not connected")
        self._sock.settimeout(self.timeout)
        self._next_id += 1
        req_id = f"eptwatch-{self._next_id}"
        msg: dict[str, Any] = {"execute": cmd, "id": req_id}
        if args:
            msg["arguments"] = args
        self._sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read_msg()
            if "event" in reply:
                self.events.append(reply)
                continue
            if reply.get("id") not in (None, req_id):
                continue
            if "error" in reply:
                err = reply["error"]
                raise QmpError(f"{cmd}: {err.get('class')}: {err.get('desc')}")
            return reply.get("return")


# --------------------------------------------------------------------------
# the VM


@dataclass(frozen=True)
class TouchInfo:
    """Parsed ``EPTWATCH-TOUCHED pass=.. start=.. end=.. tsc=..`` line."""

    pass_no: int
    start: int
    end: int
    tsc_cycles: int
    line: str


_TOUCH_RE = re.compile(
    r"EPTWATCH-TOUCHED pass=(0x[0-9a-f]+) start=(0x[0-9a-f]+) "
    r"end=(0x[0-9a-f]+) tsc=(0x[0-9a-f]+)"
)


def _preexec(thp_disable: bool) -> Any:
    def fn() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        # die with the harness even if it is SIGKILLed
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if thp_disable:
            if libc.prctl(_PR_SET_THP_DISABLE, 1, 0, 0, 0) != 0:
                os._exit(127)

    return fn


class QemuVm:
    """One QEMU/KVM process running the test guest.

    ``backend="file"`` puts guest RAM in ``mem_path`` (a file on a tmpfs the
    caller mounted) with ``share=on`` and, when ``align_2m``, ``align=2M``;
    ``backend="ram"`` uses anonymous memory (QEMU madvises it HUGEPAGE;
    ``thp_disable=True`` sets PR_SET_THP_DISABLE in QEMU's process).

    ``memory_mib`` should stay <= 2816: the guest touches what multiboot
    reports as RAM below 4 GiB and maps only the low 4 GiB (q35 moves RAM
    above 2 GiB to above 4 GiB for larger guests).  QEMU is started with
    PR_SET_PDEATHSIG=SIGKILL, so it dies with the thread that started it.
    The VM starts on ``with`` (or ``start()``) and is always stopped on exit.
    """

    def __init__(
        self,
        guest_elf: Path,
        *,
        name: str = "e2e-vm-1",
        memory_mib: int = 1024,
        backend: Backend = "file",
        mem_path: Path | None = None,
        align_2m: bool = True,
        thp_disable: bool = False,
        workdir: Path | None = None,
        uuid: str | None = None,
        vcpus: int = 1,
        touch_start_mib: int | None = None,
        touch_end_mib: int | None = None,
        autostop: bool = False,
        extra_args: Sequence[str] = (),
        qemu_binary: str = QEMU_BINARY,
        remove_mem_file: bool = True,
        object_spec: str | None = None,
    ) -> None:
        if backend not in ("file", "ram", "object", "mem-path"):
            raise ValueError(f"backend must be 'file', 'ram', 'object' or 'mem-path', not {backend!r}")
        if backend in ("file", "mem-path") and mem_path is None:
            raise ValueError(f"backend={backend!r} needs mem_path (a file, or a directory for mem-path)")
        if (backend == "object") != (object_spec is not None):
            raise ValueError("object_spec goes with backend='object' only, and it needs one")
        self.object_spec = object_spec
        self.guest_elf = Path(guest_elf)
        self.name = name
        self.memory_mib = memory_mib
        self.backend: Backend = backend
        self.mem_path = Path(mem_path) if mem_path is not None else None
        self.align_2m = align_2m
        self.thp_disable = thp_disable
        self.uuid = uuid or str(uuid_mod.uuid4())
        self.vcpus = vcpus
        self.touch_start_mib = touch_start_mib
        self.touch_end_mib = touch_end_mib
        self.autostop = autostop
        self.extra_args = list(extra_args)
        self.qemu_binary = qemu_binary
        self.remove_mem_file = remove_mem_file

        self._own_workdir = workdir is None
        base = Path(workdir) if workdir is not None else Path(tempfile.gettempdir())
        self.workdir = Path(tempfile.mkdtemp(prefix=f"qemu-{name}-", dir=base))
        # unix socket paths are limited to 107 bytes: keep them in a short dir
        self.sockdir = Path(tempfile.mkdtemp(prefix="qvm-", dir="/tmp"))
        self.qmp_path = self.sockdir / "qmp.sock"
        self.serial_path = self.sockdir / "serial.sock"
        self.serial_log = self.workdir / "serial.log"
        self.stderr_log = self.workdir / "qemu.stderr"

        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at: float | None = None
        self.returncode: int | None = None
        self._qmp: QmpClient | None = None
        self._serial: socket.socket | None = None
        self._stderr_f: Any = None

    # -- command line -------------------------------------------------------

    def command(self) -> list[str]:
        size = f"{self.memory_mib}M"
        if self.backend == "file":
            obj = (
                f"memory-backend-file,id=ram0,size={size},"
                f"mem-path={self.mem_path},share=on"
            )
            if self.align_2m:
                obj += ",align=2M"
        elif self.backend == "object":
            assert self.object_spec is not None
            obj = self.object_spec
        else:
            obj = f"memory-backend-ram,id=ram0,size={size}"
        if self.backend == "mem-path":
            memory = ["-mem-path", str(self.mem_path)]
            machine = "q35,accel=kvm"
        else:
            memory = ["-object", obj]
            machine = "q35,accel=kvm,memory-backend=ram0"
        append = []
        if self.touch_start_mib is not None:
            append.append(f"touch_start_mib={self.touch_start_mib}")
        if self.touch_end_mib is not None:
            append.append(f"touch_end_mib={self.touch_end_mib}")
        if self.autostop:
            append.append("autostop=1")
        cmd = [
            self.qemu_binary,
            "-name",
            f"guest={self.name},debug-threads=on",
            "-uuid",
            self.uuid,
            "-machine",
            machine,
            "-cpu",
            "host,-arch-capabilities",
            "-smp",
            str(self.vcpus),
            "-m",
            size,
            *memory,
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-kernel",
            str(self.guest_elf),
            "-chardev",
            f"socket,id=ser0,path={self.serial_path},server=on,wait=off,"
            f"logfile={self.serial_log},logappend=off",
            "-serial",
            "chardev:ser0",
            "-qmp",
            f"unix:{self.qmp_path},server=on,wait=off",
        ]
        if append:
            cmd += ["-append", " ".join(append)]
        return cmd + self.extra_args

    # -- lifecycle ----------------------------------------------------------

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("VM not started")
        return self.proc.pid

    def start(self, timeout: float = 30.0) -> QemuVm:
        if self.proc is not None:
            raise RuntimeError("VM already started")
        self._stderr_f = open(self.stderr_log, "wb")
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=self._stderr_f,
            stderr=subprocess.STDOUT,
            preexec_fn=_preexec(self.thp_disable),
            close_fds=True,
        )
        try:
            deadline = time.monotonic() + timeout
            # A hang guard, not a speed limit: a loaded CI machine zeroing 1 GiB pages keeps QEMU's main
            # loop from answering qmp_capabilities for well over the usual 10 s.
            self._qmp = QmpClient(self.qmp_path, timeout=60.0)
            while not self.qmp_path.exists():
                self._check_alive("starting")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"QEMU did not create {self.qmp_path}")
                time.sleep(0.05)
            self._qmp.connect(deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def __enter__(self) -> QemuVm:
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _check_alive(self, what: str) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(
                f"QEMU exited with {self.proc.returncode} while {what}: "
                f"{self.stderr_text()[-2000:]}\nserial: {self.serial_output()[-2000:]}"
            )

    def stop(self, timeout: float = 10.0) -> int | None:
        """QMP ``quit``, then SIGKILL by pid after ``timeout``; reap; clean."""
        proc = self.proc
        try:
            if proc is not None and proc.poll() is None:
                if self._qmp is not None:
                    with contextlib.suppress(Exception):
                        self._qmp.timeout = min(timeout, 5.0)
                        self._qmp.execute("quit")
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, signal.SIGKILL)
                    proc.wait()
            if proc is not None:
                self.returncode = proc.returncode
        finally:
            if proc is not None and proc.poll() is None:  # e.g. KeyboardInterrupt
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
            if self._qmp is not None:
                self._qmp.close()
            if self._serial is not None:
                with contextlib.suppress(OSError):
                    self._serial.close()
                self._serial = None
            if self._stderr_f is not None:
                self._stderr_f.close()
                self._stderr_f = None
            if (
                proc is not None
                and self.backend == "file"
                and self.remove_mem_file
                and self.mem_path is not None
            ):
                with contextlib.suppress(OSError):
                    self.mem_path.unlink()
            shutil.rmtree(self.sockdir, ignore_errors=True)
            if self._own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)
        return self.returncode

    # -- serial -------------------------------------------------------------

    def serial_output(self) -> str:
        try:
            return self.serial_log.read_text(errors="replace")
        except OSError:
            return ""

    def stderr_text(self) -> str:
        try:
            return self.stderr_log.read_text(errors="replace")
        except OSError:
            return ""

    def wait_for(self, pattern: str, timeout: float, count: int = 1) -> str:
        """Wait until ``pattern`` (a regex) matches ``count`` times in the
        serial output; returns the line of the last match."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            out = self.serial_output()
            matches = list(rx.finditer(out))
            if len(matches) >= count:
                m = matches[count - 1]
                line_start = out.rfind("\n", 0, m.start()) + 1
                line_end = out.find("\n", m.end())
                if line_end != -1:  # only complete lines
                    return out[line_start:line_end]
            if "EPTWATCH-EXCEPTION" in out or "EPTWATCH-ERROR" in out:
                raise RuntimeError(f"guest failed: {out[-2000:]}")
            self._check_alive(f"waiting for {pattern!r}")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"no {pattern!r} (x{count}) on serial after {timeout}s; "
                    f"serial: {out[-2000:]!r}"
                )
            time.sleep(0.05)

    def wait_touched(self, timeout: float = 60.0, pass_no: int = 1) -> TouchInfo:
        line = self.wait_for(re.escape(MARKER_TOUCHED), timeout, count=pass_no)
        m = _TOUCH_RE.search(line)
        if not m:
            raise RuntimeError(f"malformed marker line: {line!r}")
        return TouchInfo(
            int(m.group(1), 16),
            int(m.group(2), 16),
            int(m.group(3), 16),
            int(m.group(4), 16),
            line,
        )

    def send_serial(self, data: bytes) -> None:
        if self._serial is None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(5.0)
            s.connect(str(self.serial_path))
            self._serial = s
        self._serial.sendall(data)
        self._drain_serial()

    def _drain_serial(self) -> None:
        # the log file is the source of truth; just keep the socket empty
        if self._serial is None:
            return
        self._serial.setblocking(False)
        try:
            while self._serial.recv(65536):
                pass
        except (BlockingIOError, OSError):
            pass
        finally:
            self._serial.settimeout(5.0)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait until the guest listens for serial commands (it prints
        ``EPTWATCH-WAITING`` after every touch pass)."""
        n = max(1, self.serial_output().count(MARKER_TOUCHED))
        self.wait_for("EPTWATCH-WAITING", timeout, count=n)

    def retouch(self, timeout: float = 60.0) -> TouchInfo:
        """Ask the guest to touch all its pages again; wait for the marker."""
        self.wait_ready(timeout)
        n = self.serial_output().count(MARKER_TOUCHED)
        self.send_serial(b"t")
        return self.wait_touched(timeout, pass_no=n + 1)

    def ping(self, timeout: float = 10.0) -> None:
        self.wait_ready(timeout)
        n = self.serial_output().count("EPTWATCH-PONG")
        self.send_serial(b"p")
        self.wait_for("EPTWATCH-PONG", timeout, count=n + 1)

    def poweroff(self, timeout: float = 15.0) -> int:
        """Guest-side ACPI power-off; returns QEMU's exit code."""
        if self.proc is None:
            raise RuntimeError("VM not started")
        self.wait_ready(timeout)
        self.send_serial(b"q")
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(
                f"QEMU still running {timeout}s after guest power-off; "
                f"serial: {self.serial_output()[-500:]!r}"
            ) from None

    def wait_exit(self, timeout: float) -> int:
        if self.proc is None:
            raise RuntimeError("VM not started")
        return self.proc.wait(timeout=timeout)

    # -- QMP ------------------------------------------------------------------

    def qmp(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        if self._qmp is None:
            raise RuntimeError("VM not started")
        return self._qmp.execute(cmd, args)

    def query_stats_vm(self) -> dict[str, Any]:
        """QMP ``query-stats`` target ``vm``, provider kvm, as {name: value}."""
        res = self.qmp("query-stats", {"target": "vm"})
        out: dict[str, Any] = {}
        for entry in res:
            if entry.get("provider") == "kvm":
                for st in entry.get("stats", []):
                    out[st["name"]] = st["value"]
        return out

    # -- host-side observations ----------------------------------------------

    def ram_vma(self) -> SmapsVma:
        if self.backend in ("object", "mem-path"):
            # memfd, shared anonymous, hugetlbfs or a temporary file QEMU made and unlinked: the one
            # read-write mapping exactly the size of guest RAM (hugetlb pages are not in Rss).
            size = self.memory_mib << 20
            cands = [v for v in read_smaps(self.pid) if v.size == size and v.perms.startswith("rw")]
            if len(cands) != 1:
                raise LookupError(f"{len(cands)} rw mappings of {size} bytes in /proc/{self.pid}/smaps: {cands}")
            return cands[0]
        return find_ram_vma(
            self.pid,
            self.memory_mib << 20,
            self.mem_path if self.backend == "file" else None,
        )

    def status(self) -> dict[str, str]:
        return proc_status(self.pid)

    def debugfs_dir(self, root: Path = DEBUGFS_ROOT) -> Path | None:
        return kvm_debugfs_dir(self.pid, root)

    def kvm_page_counts(self, root: Path = DEBUGFS_ROOT) -> dict[str, int]:
        d = self.debugfs_dir(root)
        if d is None:
            raise LookupError(f"no KVM debugfs dir for pid {self.pid} in {root}/kvm")
        return read_kvm_page_counts(d)
