"""Helpers shared by the benchmark scripts: report framing and process plumbing.

The scripts run as `python bench/x.py`, so bench/ is on sys.path (and multiprocessing's spawn
children get the parent's sys.path): `import _common` / `from _common import ...` works in both.
"""

from __future__ import annotations

import os
import platform
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from eptwatch.agent.uplink.delivery import varint  # the agent's own framing helper
from eptwatch.v1 import report_pb2 as pb

TICK = os.sysconf("SC_CLK_TCK")
PROXY_VARS = ("http_proxy", "https_proxy", "grpc_proxy", "all_proxy", "no_proxy")
# The fields a simulated host fills in; everything else is the shared, pre-serialised body.
PER_HOST_FIELDS = ("host_id", "labels", "agent_instance", "sequence", "sample_time")


# --- reports -----------------------------------------------------------------------------------

def widen(template: pb.HostReport, n_vms: int) -> pb.HostReport:
    """A copy of a template HostReport with its VMs and their estimates replicated to n_vms, each with
    its own vm id. An estimate is copied whole, so the aggregator's consistency checks still hold."""
    r = pb.HostReport()
    r.CopyFrom(template)
    vms = list(template.vms)
    ests = {e.vm_id: e for e in template.estimates}
    del r.vms[:]
    del r.estimates[:]
    for i in range(n_vms):
        src = vms[i % len(vms)]
        vm_id = f"{src.vm_id[:-4]}{i:04d}" if len(src.vm_id) > 4 else f"{src.vm_id}-{i:04d}"
        v = r.vms.add()
        v.CopyFrom(src)
        v.vm_id, v.name, v.pid = vm_id, f"{src.name}-{i}", 10000 + i
        if v.uuid:
            v.uuid = vm_id
        e = ests.get(src.vm_id)
        if e is not None:
            ne = r.estimates.add()
            ne.CopyFrom(e)
            ne.vm_id = vm_id
    return r


def body_of(report: pb.HostReport) -> bytes:
    """The report serialised without PER_HOST_FIELDS (prepended per report by `host_prefix` + `frame`)."""
    r = pb.HostReport()
    r.CopyFrom(report)
    for f in PER_HOST_FIELDS:
        r.ClearField(f)
    return r.SerializeToString()


def _field(tag: int, payload: bytes) -> bytes:
    return bytes([tag << 3 | 2]) + varint(len(payload)) + payload


def host_prefix(host_id: str, instance: str, labels: Sequence[tuple[str, str]] = ()) -> bytes:
    """HostReport fields host_id (1), labels (2) and agent_instance (4)."""
    parts = [_field(1, host_id.encode())]
    for k, v in labels:
        parts.append(_field(2, _field(1, k.encode()) + _field(2, v.encode())))  # map entry
    parts.append(_field(4, instance.encode()))
    return b"".join(parts)


def frame(prefix: bytes, body: bytes, sequence: int, t: float) -> bytes:
    """HostReport bytes: the per-host fields, sequence (5), sample_time (6), then the shared body.
    Protobuf accepts fields in any order, so no report is re-encoded."""
    secs = int(t)
    nanos = int((t - secs) * 1e9)
    ts = b"\x08" + varint(secs) + (b"\x10" + varint(nanos) if nanos else b"")
    return prefix + b"\x28" + varint(sequence) + b"\x32" + varint(len(ts)) + ts + body


def check_body(body: bytes, labels: Sequence[tuple[str, str]] = (), what: str = "report") -> int:
    """The body, framed as a host's report, parses back and passes the aggregator's validation;
    returns the framed size. Exits with the reason otherwise."""
    from eptwatch.server.ingest.validate import validate_report

    raw = frame(host_prefix("hv-check-1", "inst-check", labels), body, 7, time.time())
    r = pb.HostReport.FromString(raw)
    if (r.host_id, r.agent_instance, r.sequence, dict(r.labels)) != ("hv-check-1", "inst-check", 7, dict(labels)):
        raise SystemExit(f"{what}: framed report does not parse back: {r.host_id!r} {r.agent_instance!r} {r.sequence}")
    reason = validate_report(r, time.time())
    if reason is not None:
        raise SystemExit(f"{what} fails the aggregator's validation: {reason}")
    return len(raw)


# --- processes ---------------------------------------------------------------------------------

def clear_proxy_env() -> None:
    """Drop proxy settings from os.environ (children inherit it): every request goes to 127.0.0.1."""
    for k in PROXY_VARS:
        os.environ.pop(k, None)
        os.environ.pop(k.upper(), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of all the process's threads: /proc/PID/stat fields 14 and 15."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK


def cpu_seconds(pid: int) -> float:
    return sum(cpu_times(pid))


def wait_http_ready(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    """Polls url (a /readyz) until it answers 200; fails at once if proc exits meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"pid {proc.pid} exited with {proc.returncode} before {url} was ready; {log}:\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} not ready within {timeout:.0f} s; see {log}")
        time.sleep(0.05)


def stop_processes(procs: Iterable[subprocess.Popen[bytes]], timeout: float = 30.0) -> None:
    """SIGTERM to every process still running, then wait; SIGKILL whichever outlives the timeout."""
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- results -----------------------------------------------------------------------------------

def pct(values: list[float], q: float) -> float | None:
    """The q-quantile (nearest rank) of values; None for none."""
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def machine() -> dict[str, Any]:
    import google.protobuf
    import grpc
    from google.protobuf.internal import api_implementation

    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return {"nproc": os.cpu_count(), "cpu": model, "kernel": platform.release(), "python": platform.python_version(),
            "mem_total_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30), 1),
            "grpcio": grpc.__version__, "protobuf": f"{google.protobuf.__version__} ({api_implementation.Type()})"}
