#!/usr/bin/env python3
"""Aggregator ingest throughput: reports/s per aggregator core-second, next to a bare gRPC server.

Simulated agents (one gRPC stream, one TCP connection, one host_id/agent_instance each, sequences
1, 2, 3, ...) send realistic 20-VM HostReports to one aggregator process (`eptwatch-server`, SQLite
with synchronous=FULL on a state directory under /tmp; every report is acknowledged only after the
transaction holding it committed). The load generator runs in separate processes; payloads are
serialised once and framed per report (host, labels, instance, sequence, sample_time prepended as protobuf
fields) with `encode_agent_message`, as the agent frames its spool, so the clients stay cheap.

Phases (each run against the real aggregator, then against a bare grpc.aio server started from this
file with the same server options and compression that parses each AgentMessage and acknowledges
every report at once: no validation, no store, i.e. the gRPC stack's own limit on this machine):

  fleet      --fleet-streams concurrent streams (default 1,000), each sending one report every
             --fleet-interval seconds, open loop with random phase (a fleet's steady state)
  hot-N      N streams (default 10, 50, 100) each sending as fast as acks return, with a window of
             --window messages in flight per stream, 1 report per message
  backlog-N  the same with --backlog-batch reports per message (default 50: a backlog replayed after
             an outage)

Measured in a window after a warm-up: acknowledged reports, the server process's CPU time
(utime+stime of all its threads from /proc/PID/stat), reports per server core-second, wall-clock rate,
ack latency (message written -> its ServerMessage read) p50/p99, and for the aggregator its SQLite
commits (reports per fsync'd transaction). At the end the aggregator's durable state is checked: every
report acknowledged APPLIED is in its agents table.

    .venv/bin/python bench/ingest_load.py                 # full run, about 3 minutes
    .venv/bin/python bench/ingest_load.py --quick         # under a minute
    .venv/bin/python bench/ingest_load.py --json out.json --markdown
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import multiprocessing as mp
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
from _common import (
    body_of,
    check_body,
    clear_proxy_env,
    cpu_seconds,
    cpu_times,
    frame,
    free_port,
    host_prefix,
    machine,
    pct,
    stop_processes,
    wait_http_ready,
    widen,
)

from eptwatch.agent.uplink.delivery import (
    STREAM_METHOD,
    DeliveryConfig,
    channel_options,
    encode_agent_message,
)
from eptwatch.v1 import ingest_pb2

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests" / "fixtures" / "linux-6.6-pages2m"
LABELS = (("rack", "r17"), ("az", "b"))  # every simulated agent's labels
BIN = Path(sys.executable).parent

# Targets from the issue.
TARGET_SATURATED = 5000.0  # reports per aggregator core-second, hot streams
TARGET_FLEET = 3000.0  # reports per aggregator core-second, paced fleet
TARGET_BARE_RATIO = 0.6  # aggregator rate / bare server rate, per core-second
SERVER_CPUS: set[int] | None = None  # --server-cpus
POSTMASTER_PID: int | None = None  # --private-postgres


def _ppid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


# --- reports -----------------------------------------------------------------------------------

def report_body(n_vms: int) -> bytes:
    """A real sample of a fixture host (`eptwatch.server.simulate.sample_fixture`: Sampler -> host_report),
    its VMs replicated to n_vms with distinct ids, serialised without the per-host fields (host_id,
    labels, agent_instance, sequence, sample_time: prepended per report by `host_prefix` + `frame`)."""
    from eptwatch.server.simulate import sample_fixture

    return body_of(widen(sample_fixture(FIXTURE), n_vms))


# --- the bare server ---------------------------------------------------------------------------

def serve_bare(listen: str) -> None:
    """Ingest.Stream that parses each AgentMessage and acks every report APPLIED at once."""
    from eptwatch.server.app import ServerConfig, grpc_server_options
    from eptwatch.server.ingest.servicer import ACK_COMPRESSION, INGEST_SERVICE

    cfg = ServerConfig(listen=listen, insecure_plaintext=True, insecure_no_auth=True)

    async def stream(request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        context.set_compression(ACK_COMPRESSION)  # as the aggregator's Ingest does
        async for msg in request_iterator:
            yield ingest_pb2.ServerMessage(acks=[
                ingest_pb2.ReportAck(host_id=r.host_id, agent_instance=r.agent_instance, sequence=r.sequence,
                                     status=ingest_pb2.ACK_STATUS_APPLIED)
                for r in msg.reports])

    async def main() -> None:
        server = grpc.aio.server(options=grpc_server_options(cfg), maximum_concurrent_rpcs=cfg.max_concurrent_streams,
                                 compression=grpc.Compression.Gzip)
        handler = grpc.method_handlers_generic_handler(INGEST_SERVICE, {
            "Stream": grpc.stream_stream_rpc_method_handler(
                stream, request_deserializer=ingest_pb2.AgentMessage.FromString,
                response_serializer=ingest_pb2.ServerMessage.SerializeToString),
        })
        server.add_generic_rpc_handlers((handler,))
        if server.add_insecure_port(listen) == 0:
            raise OSError(f"cannot listen on {listen}")
        await server.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await server.stop(1)

    asyncio.run(main())


# --- server processes --------------------------------------------------------------------------

def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies over all CPUs, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v) - idle, sum(v)


class Server:
    """One or more processes serving Ingest on one port (several: SO_REUSEPORT, one per core)."""

    kind = ""

    def __init__(self, workdir: Path, procs: int = 1) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.n = procs
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def cpu(self) -> tuple[float, float]:
        """(user, system) CPU seconds over all processes."""
        t = [cpu_times(p.pid) for p in self.procs]
        return sum(u for u, _ in t), sum(s for _, s in t)

    def _spawn(self, args: list[str], k: int = 0) -> subprocess.Popen[bytes]:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cpus = SERVER_CPUS
        with open(self.workdir / f"{self.kind}-{k}.log", "ab") as log:
            # Pinned before exec, so every thread the server starts is (--server-cpus).
            proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                    preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
        self.procs.append(proc)
        return proc

    def wait_ready(self, timeout: float = 30.0) -> None:
        async def ready() -> None:
            async with grpc.aio.insecure_channel(self.target) as ch:
                await asyncio.wait_for(ch.channel_ready(), timeout)
        asyncio.run(ready())

    def stop(self) -> None:
        stop_processes(self.procs)

    def counters(self) -> dict[str, float]:
        return {}


class FullServer(Server):
    kind = "aggregator"

    def __init__(self, workdir: Path, cmd: list[str] | None = None, procs: int = 1, state_url: str | None = None) -> None:
        super().__init__(workdir, procs)
        self.http_ports = [free_port() for _ in range(procs)]
        # One state directory per process (SQLite is one process's), or one PostgreSQL all processes share.
        self.state_url = state_url
        self.states: list[Path | str] = [state_url] * procs if state_url else [workdir / f"state-{k}" for k in range(procs)]
        self.cmd = cmd or [str(BIN / "eptwatch-server")]

    def start(self) -> FullServer:
        for k, (http, state) in enumerate(zip(self.http_ports, self.states)):
            proc = self._spawn([*self.cmd, "--listen", self.target, "--http", f"127.0.0.1:{http}", "--state", str(state),
                                "--insecure-plaintext", "--insecure-no-auth", "--log-level", "WARNING"], k)
            wait_http_ready(f"http://127.0.0.1:{http}/readyz", proc, self.workdir / f"{self.kind}-{k}.log", 30)
        return self

    def counters(self) -> dict[str, float]:
        """Store commits and applied reports from /metrics (scraped outside the CPU window)."""
        out: dict[str, float] = {"commits": 0.0, "applied": 0.0}
        for http in self.http_ports:
            with urllib.request.urlopen(f"http://127.0.0.1:{http}/metrics", timeout=10) as r:
                for line in r.read().decode().splitlines():
                    if line.startswith("eptwatch_server_store_commits_total "):
                        out["commits"] += float(line.split()[-1])
                    elif line.startswith('eptwatch_server_reports_total{result="applied"}'):
                        out["applied"] += float(line.split()[-1])
        return out

    def applied_by_prefix(self, prefix: str) -> int:
        if self.state_url:
            import psycopg

            with psycopg.connect(self.state_url) as c:
                row = c.execute("SELECT coalesce(sum(applied_total), 0) FROM agents WHERE host_id LIKE %s", (prefix + "%",)).fetchone()
            return int(row[0]) if row else 0
        total = 0
        for state in self.states:
            assert isinstance(state, Path)
            db = sqlite3.connect(f"file:{state / 'eptwatch.sqlite3'}?mode=ro", uri=True)
            try:
                (n,) = db.execute("SELECT coalesce(sum(applied_total), 0) FROM agents WHERE host_id LIKE ?", (prefix + "%",)).fetchone()
                total += int(n)
            finally:
                db.close()
        return total


class BareServer(Server):
    kind = "bare"

    def start(self) -> BareServer:
        for k in range(self.n):
            self._spawn([sys.executable, str(Path(__file__).resolve()), "--serve-bare", self.target], k)
        self.wait_ready()
        return self


# --- the load generator (runs in child processes) -------------------------------------------------

def client_main(spec: dict[str, Any], conn: Any) -> None:
    clear_proxy_env()
    if spec.get("cpus"):
        os.sched_setaffinity(0, spec["cpus"])  # before gRPC starts its threads (--client-cpus)
    try:
        result = asyncio.run(_client(spec, conn))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        import traceback
        conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        return
    conn.send(("result", result))


async def _client(spec: dict[str, Any], conn: Any) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    body: bytes = spec["body"]
    batch: int = spec["batch"]
    window: int = spec["window"]
    interval: float = spec["interval"]  # > 0: paced; 0: as fast as the window allows
    opts = channel_options(DeliveryConfig(target=spec["target"])) + [("grpc.use_local_subchannel_pool", 1)]
    compression = grpc.Compression.Gzip if spec["gzip"] else grpc.Compression.NoCompression

    channels = [grpc.aio.insecure_channel(spec["target"], options=opts) for _ in spec["streams"]]
    await asyncio.wait_for(asyncio.gather(*(ch.channel_ready() for ch in channels)), 60)
    conn.send(("ready", None))
    t_start, t_m0, t_m1, t_end = await loop.run_in_executor(None, conn.recv)

    lat: list[float] = []  # seconds, messages acked inside the window
    acked_window = 0
    acked_total = 0
    sent_total = 0
    status = collections.Counter()  # type: ignore[var-annotated]
    errors: list[str] = []

    async def one(ch: grpc.aio.Channel, host_id: str, instance: str, offset: float) -> None:
        nonlocal acked_window, acked_total, sent_total
        prefix = host_prefix(host_id, instance, LABELS)
        call = ch.stream_stream(STREAM_METHOD, request_serializer=lambda b: b,
                                response_deserializer=ingest_pb2.ServerMessage.FromString)(
            compression=compression, timeout=t_end - time.monotonic() + 60)
        pending: collections.deque[tuple[float, int]] = collections.deque()  # (sent at, reports)
        sem = asyncio.Semaphore(window) if not interval else None

        async def receiver() -> None:
            nonlocal acked_window, acked_total
            async for smsg in call:
                now = time.monotonic()
                n = 0
                for a in smsg.acks:
                    status[a.status] += 1
                    n += 1
                acked_total += n
                if t_m0 <= now < t_m1:
                    acked_window += n
                # One response may acknowledge several messages (the aggregator answers per commit).
                while n > 0 and pending:
                    sent, k = pending.popleft()
                    n -= k
                    if t_m0 <= now < t_m1:
                        lat.append(now - sent)
                    if sem is not None:
                        sem.release()

        recv = asyncio.create_task(receiver())
        seq = 1
        past = time.time() - 7 * 86400
        try:
            if interval:
                t = t_start + offset
                while t < t_m1:
                    d = t - time.monotonic()
                    if d > 0:
                        await asyncio.sleep(d)
                    now = time.time()
                    pending.append((time.monotonic(), 1))
                    await call.write(encode_agent_message([frame(prefix, body, seq, now)], 0))
                    seq += 1
                    sent_total += 1
                    t += interval
            else:
                d = t_start - time.monotonic()
                if d > 0:
                    await asyncio.sleep(d)
                while True:
                    assert sem is not None
                    await sem.acquire()
                    if time.monotonic() >= t_m1 or recv.done():
                        break
                    # A replayed backlog: samples from the past, in order, a second apart.
                    msg = encode_agent_message([frame(prefix, body, seq + k, past + seq + k) for k in range(batch)], 0)
                    pending.append((time.monotonic(), batch))
                    await call.write(msg)
                    seq += batch
                    sent_total += batch
            await call.done_writing()
            await asyncio.wait_for(recv, max(5.0, t_end - time.monotonic()))
        except (grpc.aio.AioRpcError, asyncio.TimeoutError, asyncio.InvalidStateError) as exc:
            errors.append(f"{host_id}: {type(exc).__name__}: {exc.details() if isinstance(exc, grpc.aio.AioRpcError) else exc}")
            recv.cancel()
            call.cancel()

    rnd = random.Random(spec["seed"])
    await asyncio.gather(*(one(ch, host, inst, rnd.uniform(0, interval) if interval else 0.0)
                           for ch, (host, inst) in zip(channels, spec["streams"])))
    await asyncio.gather(*(ch.close() for ch in channels))
    if len(lat) > 50_000:
        lat = random.Random(1).sample(lat, 50_000)
    return {"acked_window": acked_window, "acked_total": acked_total, "sent_total": sent_total, "latencies": lat,
            "status": {ingest_pb2.AckStatus.Name(k): v for k, v in status.items()}, "errors": errors[:5], "n_errors": len(errors)}


# --- orchestration -------------------------------------------------------------------------------

def run_phase(server: Server, phase: dict[str, Any], body: bytes, args: argparse.Namespace, tag: str) -> dict[str, Any]:
    n_streams = phase["streams"]
    n_procs = max(1, min(args.client_procs, n_streams))
    instance = f"i{os.getpid():x}{int(time.time()) & 0xFFFFFF:06x}"
    id_prefix = f"bench-{tag}-{phase['name']}-"
    streams = [(f"{id_prefix}{i:05d}", instance) for i in range(n_streams)]
    ctx = mp.get_context("spawn")
    procs, pipes = [], []
    for k in range(n_procs):
        parent, child = ctx.Pipe()
        spec = {"target": server.target, "body": body, "batch": phase["batch"], "window": args.window,
                "interval": phase["interval"], "streams": streams[k::n_procs], "gzip": not args.no_gzip, "seed": k,
                "cpus": args.client_cpus}
        procs.append(ctx.Process(target=client_main, args=(spec, child), daemon=True))
        pipes.append(parent)
    for p in procs:
        p.start()
    try:
        for pipe in pipes:
            if not pipe.poll(90):
                raise RuntimeError("load generator did not connect within 90 s")
            kind, val = pipe.recv()
            if kind != "ready":
                raise RuntimeError(f"load generator failed: {val}")
        t_start = time.monotonic() + 0.3
        t_m0 = t_start + args.warmup
        t_m1 = t_m0 + args.duration
        for pipe in pipes:
            pipe.send((t_start, t_m0, t_m1, t_m1 + 60.0))  # the last is the drain deadline
        time.sleep(max(0.0, t_m0 - time.monotonic() - 0.25))
        before = server.counters()
        time.sleep(max(0.0, t_m0 - time.monotonic()))
        cpu0, busy0, wall0, pg0 = server.cpu(), machine_busy(), time.monotonic(), postgres_cpu()
        ccpu0 = sum(cpu_seconds(p.pid) for p in procs if p.pid)
        time.sleep(max(0.0, t_m1 - time.monotonic()))
        cpu1, busy1, wall1, pg1 = server.cpu(), machine_busy(), time.monotonic(), postgres_cpu()
        ccpu1 = sum(cpu_seconds(p.pid) for p in procs if p.pid)
        after = server.counters()
        results = []
        for pipe in pipes:
            if not pipe.poll(120):
                raise RuntimeError("load generator did not finish within 120 s of the window's end")
            kind, val = pipe.recv()
            if kind != "result":
                raise RuntimeError(f"load generator failed: {val}")
            results.append(val)
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    lat = [x for r in results for x in r["latencies"]]
    p50, p99 = pct(lat, 0.5), pct(lat, 0.99)
    acked = sum(r["acked_window"] for r in results)
    user, system = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
    cpu = user + system
    wall = wall1 - wall0
    status: collections.Counter[str] = collections.Counter()
    for r in results:
        status.update(r["status"])
    out: dict[str, Any] = {
        "phase": phase["name"], "server": server.kind, "server_procs": server.n, "streams": n_streams, "reports_per_message": phase["batch"],
        "interval_s": phase["interval"] or None, "window": None if phase["interval"] else args.window,
        "offered_reports_per_s": round(n_streams / phase["interval"], 1) if phase["interval"] else None,
        "window_s": round(wall, 3), "acked_in_window": acked, "reports_per_s": round(acked / wall, 1),
        "server_cpu_s": round(cpu, 3), "server_system_s": round(system, 3), "server_cores": round(cpu / wall, 3),
        "reports_per_core_s": round(acked / cpu, 1) if cpu > 0 else None,
        "server_cpu_us_per_report": round(cpu / acked * 1e6, 1) if acked else None,
        "client_cpu_s": round(ccpu1 - ccpu0, 3),
        # The shared PostgreSQL's CPU in the window (the aggregator's only; None for the bare server or
        # without --private-postgres): where the rest of a core goes.
        "postgres_cpu_s": round(pg1 - pg0, 3) if server.kind == "aggregator" and pg0 is not None and pg1 is not None else None,
        "machine_busy": round((busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1]), 3),
        "latency_p50_ms": round(p50 * 1e3, 2) if p50 is not None else None,
        "latency_p99_ms": round(p99 * 1e3, 2) if p99 is not None else None,
        "sent_total": sum(r["sent_total"] for r in results), "acked_total": sum(r["acked_total"] for r in results),
        "acks_by_status": dict(status), "stream_errors": sum(r["n_errors"] for r in results),
        "error_samples": [e for r in results for e in r["errors"]][:3],
    }
    if out["postgres_cpu_s"] is not None:
        out["postgres_cores"] = round(out["postgres_cpu_s"] / wall, 3)
        out["postgres_cpu_us_per_report"] = round(out["postgres_cpu_s"] / acked * 1e6, 1) if acked else None
    if phase["interval"]:
        # Paced: the load is the offered one only if the server (and the clients) kept up with it.
        out["kept_pace"] = out["reports_per_s"] >= 0.95 * out["offered_reports_per_s"]
    if "commits" in before and "commits" in after:
        commits = after["commits"] - before["commits"]
        out["commits_around_window"] = int(commits)
        out["reports_per_commit"] = round((after.get("applied", 0) - before.get("applied", 0)) / commits, 1) if commits else None
    if isinstance(server, FullServer):
        out["host_prefix"] = id_prefix
    return out


def phases(args: argparse.Namespace) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if args.fleet_streams:
        out.append({"name": "fleet", "streams": args.fleet_streams, "batch": 1, "interval": args.fleet_interval})
    for n in args.hot:
        out.append({"name": f"hot-{n}", "streams": n, "batch": 1, "interval": 0.0})
    for n in args.hot:
        if args.backlog_batch > 1:
            out.append({"name": f"backlog-{n}", "streams": n, "batch": args.backlog_batch, "interval": 0.0})
    if args.only:
        wanted = {x.strip() for x in args.only.split(",")}
        out = [ph for ph in out if ph["name"] in wanted]
    return out


def postgres_cpu() -> float | None:
    """CPU seconds of the private PostgreSQL: its postmaster and every process it forked (backends,
    WAL writer, checkpointer). None without --private-postgres."""
    if POSTMASTER_PID is None:
        return None
    total = 0.0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        if int(d.name) == POSTMASTER_PID or int(fields[1]) == POSTMASTER_PID:
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def table(rows: list[dict[str, Any]]) -> str:
    head = ("phase", "server", "streams", "rep/msg", "reports/s", "srv CPU s", "srv cores", "rep/core-s", "us/rep",
            "vs bare", "p50 ms", "p99 ms", "rep/commit", "pg cores", "pg us/rep")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        lines.append(" | ".join(str(x if x is not None else "-") for x in (
            r["phase"], r["server"], r["streams"], r["reports_per_message"], r["reports_per_s"], r["server_cpu_s"],
            r["server_cores"], r["reports_per_core_s"], r["server_cpu_us_per_report"], r.get("ratio_to_bare", "-"),
            r["latency_p50_ms"], r["latency_p99_ms"], r.get("reports_per_commit", "-"), r.get("postgres_cores"),
            r.get("postgres_cpu_us_per_report"))))
    return "\n".join("| " + ln + " |" for ln in lines)


def verdicts(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        if r["server"] != "aggregator":
            continue
        target = TARGET_FLEET if r["phase"] == "fleet" else TARGET_SATURATED
        rate = r["reports_per_core_s"] or 0.0
        out.append({"phase": r["phase"], "reports_per_core_s": rate, "target": target, "met": rate >= target,
                    "kept_pace": r.get("kept_pace"),
                    "ratio_to_bare": r.get("ratio_to_bare"), "ratio_target": TARGET_BARE_RATIO,
                    "ratio_met": (r.get("ratio_to_bare") or 0.0) >= TARGET_BARE_RATIO})
    return out


def main(argv: list[str] | None = None) -> int:
    clear_proxy_env()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smaller run, under a minute: fleet, hot-50, backlog-50, 3 s windows")
    p.add_argument("--fleet-streams", type=int, default=1000, help="paced streams (0: skip the fleet phase)")
    p.add_argument("--fleet-interval", type=float, default=2.0, help="seconds between one stream's reports (default: 1,000 "
                   "streams x 0.5/s = 500 reports/s, below the aggregator's limit on a 2-core machine it shares with the clients)")
    p.add_argument("--hot", default="10,50,100", help="comma-separated numbers of saturating streams")
    p.add_argument("--backlog-batch", type=int, default=50, help="reports per message in the backlog phases (1: skip)")
    p.add_argument("--window", type=int, default=4, help="messages in flight per saturating stream")
    p.add_argument("--vms", type=int, default=20, help="VMs per report")
    p.add_argument("--duration", type=float, default=8.0, help="measured seconds per phase and server")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of load before the measured window")
    p.add_argument("--client-procs", type=int, default=2, help="load-generator processes")
    p.add_argument("--servers", default="aggregator,bare", help="which servers to load: aggregator, bare or both")
    p.add_argument("--server-procs", type=int, default=1, help="processes per server sharing its port (SO_REUSEPORT); "
                   "each aggregator process gets its own state directory")
    p.add_argument("--aggregator-cmd", metavar="CMD", help="command line to start the aggregator instead of eptwatch-server "
                   "(split on spaces; the listen/http/state flags are appended), e.g. to compare two builds")
    p.add_argument("--state", metavar="URL", help="a postgresql:// URL every aggregator process shares (default: SQLite, "
                   "one state directory per process)")
    p.add_argument("--private-postgres", action="store_true", help="start a private PostgreSQL (Debian's postgresql, as "
                   "tests/pg.py does) in a temporary directory and share it (implies --state)")
    p.add_argument("--server-cpus", metavar="LIST", help="pin the servers (and the private PostgreSQL) to these CPUs, e.g. 0")
    p.add_argument("--client-cpus", metavar="LIST", help="pin the load generators to these CPUs, e.g. 1")
    p.add_argument("--only", metavar="PHASES", help="run only these phases (comma-separated names, e.g. backlog-50)")
    p.add_argument("--no-gzip", action="store_true", help="send uncompressed (the agent compresses with gzip)")
    p.add_argument("--json", metavar="FILE", help="write all results as JSON")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown only")
    p.add_argument("--keep", action="store_true", help="keep the state directory under /tmp")
    p.add_argument("--serve-bare", metavar="HOST:PORT", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_bare:
        serve_bare(args.serve_bare)
        return 0
    if args.quick:
        args.hot = "50"
        args.duration = min(args.duration, 3.0)
        args.warmup = min(args.warmup, 1.0)
    args.hot = [int(x) for x in str(args.hot).split(",") if x.strip()]
    global SERVER_CPUS
    SERVER_CPUS = {int(x) for x in args.server_cpus.split(",")} if args.server_cpus else None
    args.client_cpus = sorted({int(x) for x in args.client_cpus.split(",")}) if args.client_cpus else None
    kinds = [k.strip() for k in args.servers.split(",") if k.strip()]

    started = time.time()
    body = report_body(args.vms)
    size = check_body(body, LABELS)
    info = {"machine": {**machine(), "loadavg_before": open("/proc/loadavg").read().split()[:3]},
            "report_bytes": size, "vms_per_report": args.vms, "gzip": not args.no_gzip,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "argv": sys.argv,
            "sqlite_synchronous": "FULL", "server_cpus": args.server_cpus, "client_cpus": args.client_cpus}
    print(f"report: {args.vms} VMs, {size} bytes; machine: {info['machine']}", file=sys.stderr)

    work = Path(tempfile.mkdtemp(prefix="eptwatch-bench-", dir="/tmp"))
    servers: dict[str, Server] = {}
    rows: list[dict[str, Any]] = []
    pg = None
    try:
        state_url = args.state
        if args.private_postgres:
            sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
            from tests.pg import _start as start_postgres

            pg = start_postgres(fsync=True)  # commits flushed to disk, as in production (the tests' cluster runs without)
            state_url = pg.new_database()
            global POSTMASTER_PID
            POSTMASTER_PID = int((pg.data / "postmaster.pid").read_text().split()[0])
            if SERVER_CPUS:  # its backends, forked later, inherit it
                for pid in [POSTMASTER_PID, *(int(d.name) for d in Path("/proc").iterdir() if d.name.isdigit()
                                              and _ppid(int(d.name)) == POSTMASTER_PID)]:
                    try:
                        os.sched_setaffinity(pid, SERVER_CPUS)
                    except ProcessLookupError:
                        pass  # a short-lived child (the start-up's connection backend) already exited
        if state_url:
            info["store"] = "postgresql"
        if "aggregator" in kinds:
            servers["aggregator"] = FullServer(work / "aggregator", args.aggregator_cmd.split() if args.aggregator_cmd else None,
                                               args.server_procs, state_url).start()
        if "bare" in kinds:
            servers["bare"] = BareServer(work / "bare", args.server_procs).start()
        for kind, srv in servers.items():
            print(f"{kind}: pids {' '.join(str(p.pid) for p in srv.procs)} on {srv.target}", file=sys.stderr, flush=True)
        tag = f"{int(time.time()) % 100000}"
        for ph in phases(args):
            pair: dict[str, dict[str, Any]] = {}
            for kind, srv in servers.items():
                row = run_phase(srv, ph, body, args, tag)
                pair[kind] = row
                rows.append(row)
                print(f"{row['phase']:>12} {kind:>10}: {row['reports_per_s']:>8.0f} reports/s, server {row['server_cpu_s']:.2f} CPU s "
                      f"({row['server_cores']:.2f} cores), {row['reports_per_core_s']} reports/core-s, "
                      f"p50 {row['latency_p50_ms']} ms, p99 {row['latency_p99_ms']} ms, machine busy {row['machine_busy']:.0%}"
                      + (f", {row['stream_errors']} stream errors {row['error_samples']}" if row["stream_errors"] else "")
                      + (" (did NOT keep pace with the offered load)" if row.get("kept_pace") is False else ""),
                      file=sys.stderr)
            if "aggregator" in pair and "bare" in pair and pair["bare"]["reports_per_core_s"]:
                pair["aggregator"]["ratio_to_bare"] = round(pair["aggregator"]["reports_per_core_s"] / pair["bare"]["reports_per_core_s"], 3)
        if "aggregator" in servers:
            full = servers["aggregator"]
            assert isinstance(full, FullServer)
            for row in rows:
                if row["server"] == "aggregator":
                    row["durable_applied"] = full.applied_by_prefix(row["host_prefix"])
                    row["durable_ok"] = row["durable_applied"] >= row["acks_by_status"].get("ACK_STATUS_APPLIED", 0)
    finally:
        for srv in servers.values():
            srv.stop()
        if pg is not None:
            pg.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    info["elapsed_s"] = round(time.time() - started, 1)
    info["loadavg_after"] = open("/proc/loadavg").read().split()[:3]
    result: dict[str, Any] = {"info": info, "args": {k: v for k, v in vars(args).items() if k != "serve_bare"}, "rows": rows,
              "verdicts": verdicts(rows)}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(table(rows))
    if not args.markdown:
        print()
        for v in result["verdicts"]:
            print(f"{v['phase']}: {v['reports_per_core_s']:.0f} reports/core-s (target {v['target']:.0f}: "
                  f"{'met' if v['met'] else 'MISSED'}), vs bare {v['ratio_to_bare']} (target {TARGET_BARE_RATIO}: "
                  f"{'met' if v['ratio_met'] else 'MISSED'})")
        bad = [r["phase"] for r in rows if r.get("durable_ok") is False]
        print(f"durability check: {'every APPLIED ack is in the store' if not bad else 'FAILED for ' + ', '.join(bad)}")
        print(f"elapsed {info['elapsed_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
