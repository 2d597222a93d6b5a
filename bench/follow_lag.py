"""Lag from commit to visibility on another replica sharing one PostgreSQL.

Starts a private PostgreSQL (Debian's postgresql, as tests/pg.py does) and two aggregator processes on
it. A writer sends one report of a new host at a time to replica A and waits for its ack (the ack
follows the commit); a watcher polls replica B's /api/v1/hosts/{id} until the host is there. The lag is
ack to first sighting on B, so it includes up to one HTTP poll (--poll seconds) of measurement slack.
The documented bound is 2 s (followers poll every 0.5 s). Each timed report waits a random fraction
of the follow interval first, so that sends do not fall into step with the follower's polls. With
--background N, N more streams (half to each replica) each send a report of their own host every
--background-interval seconds meanwhile, so that the followers have others' commits to take in.

    .venv/bin/python bench/follow_lag.py --reports 200 --background 200
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import random
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
from _common import clear_proxy_env, free_port, machine, pct, stop_processes, wait_http_ready

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from eptwatch.v1 import ingest_pb2, ingest_pb2_grpc  # noqa: E402
from eptwatch.v1 import report_pb2 as pb  # noqa: E402

BIN = Path(sys.executable).parent
BOUND_SECONDS = 2.0


def seen(http: int, host: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/api/v1/hosts/{host}", timeout=5) as r:
            return r.status == 200
    except urllib.error.HTTPError:
        return False


async def send(target: str, report: pb.HostReport) -> int:
    async with grpc.aio.insecure_channel(target) as ch:
        call = ingest_pb2_grpc.IngestStub(ch).Stream(timeout=30)
        await call.write(ingest_pb2.AgentMessage(reports=[report]))
        reply = await call.read()
        await call.done_writing()
        return int(reply.acks[0].status)


FOLLOW_INTERVAL_SECONDS = 0.5  # server/fleet/follow.py


def background(targets: list[str], template_bytes: bytes, streams: int, interval: float, stop: Any, acked: Any) -> None:
    """`streams` long-lived streams, each sending one report of its own host every `interval` seconds.
    In a process of its own: grpc.aio wants one event loop per process."""
    template = pb.HostReport.FromString(template_bytes)
    async def one(k: int) -> None:
        async with grpc.aio.insecure_channel(targets[k % len(targets)]) as ch:
            call = ingest_pb2_grpc.IngestStub(ch).Stream(timeout=3600)
            r = pb.HostReport()
            r.CopyFrom(template)
            r.host_id, r.agent_instance = f"hv-bg-{k}", "bg"
            await asyncio.sleep(random.uniform(0, interval))
            seq = 0
            while not stop.is_set():
                seq += 1
                r.sequence = seq
                r.sample_time.FromNanoseconds(time.time_ns())
                await call.write(ingest_pb2.AgentMessage(reports=[r]))
                await call.read()
                with acked.get_lock():
                    acked.value += 1
                await asyncio.sleep(interval)
            await call.done_writing()

    async def all_streams() -> None:
        await asyncio.gather(*(one(k) for k in range(streams)), return_exceptions=True)

    asyncio.run(all_streams())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reports", type=int, default=100, help="reports (each a new host) to time")
    p.add_argument("--poll", type=float, default=0.01, help="seconds between the watcher's HTTP polls")
    p.add_argument("--background", type=int, default=0, help="streams of background load meanwhile (half to each replica)")
    p.add_argument("--background-interval", type=float, default=1.0, help="seconds between one background stream's reports")
    args = p.parse_args(argv)
    clear_proxy_env()
    from tests.conftest import sampled_report_bytes
    from tests.pg import _start as start_postgres

    template = pb.HostReport.FromString(sampled_report_bytes("linux-5.3-unfixed"))
    pg = start_postgres(fsync=True)  # commits flushed to disk, as in production (the tests' cluster runs without)
    work = Path(tempfile.mkdtemp(prefix="eptwatch-lag-", dir="/tmp"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        dsn = pg.new_database()
        ports = [(free_port(), free_port()) for _ in range(2)]
        for k, (grpc_port, http) in enumerate(ports):
            log = work / f"agg-{k}.log"
            proc = subprocess.Popen([str(BIN / "eptwatch-server"), "--listen", f"127.0.0.1:{grpc_port}", "--http", f"127.0.0.1:{http}",
                                     "--state", dsn, "--insecure-plaintext", "--insecure-no-auth", "--log-level", "WARNING"],
                                    stdout=open(log, "wb"), stderr=subprocess.STDOUT)
            procs.append(proc)
            wait_http_ready(f"http://127.0.0.1:{http}/readyz", proc, log, 30)
        (a_grpc, _), (b_grpc, b_http) = ports
        ctx = mp.get_context("spawn")
        stop, acked_bg = ctx.Event(), ctx.Value("q", 0)
        bg = None
        if args.background:
            bg = ctx.Process(target=background, args=([f"127.0.0.1:{a_grpc}", f"127.0.0.1:{b_grpc}"], template.SerializeToString(),
                                                      args.background, args.background_interval, stop, acked_bg), daemon=True)
            bg.start()
            time.sleep(2 * args.background_interval)
        lags: list[float] = []
        started = time.monotonic()
        acked_before = acked_bg.value
        for i in range(args.reports):
            time.sleep(random.uniform(0, FOLLOW_INTERVAL_SECONDS))
            r = pb.HostReport()
            r.CopyFrom(template)
            r.host_id, r.agent_instance, r.sequence = f"hv-lag-{i}", "lag", 1
            r.sample_time.FromNanoseconds(time.time_ns())
            status = asyncio.run(send(f"127.0.0.1:{a_grpc}", r))
            acked = time.monotonic()
            assert status == ingest_pb2.ACK_STATUS_APPLIED, status
            while not seen(b_http, r.host_id):
                if time.monotonic() - acked > 30:
                    raise SystemExit(f"{r.host_id} not visible on replica B after 30 s")
                time.sleep(args.poll)
            lags.append(time.monotonic() - acked)
        bg_rate = (acked_bg.value - acked_before) / (time.monotonic() - started)
        stop.set()
        if bg is not None:
            bg.join(30)
            if bg.is_alive():
                bg.kill()
        p50, p99, worst = pct(lags, 0.5), pct(lags, 0.99), max(lags)
        out = {"machine": {**machine(), "loadavg": open("/proc/loadavg").read().split()[:3]}, "reports": len(lags),
               "background_streams": args.background, "background_reports_per_s": round(bg_rate, 1), "lag_p50_s": p50, "lag_p99_s": p99, "lag_max_s": worst,
               "bound_s": BOUND_SECONDS, "met": bool(p99 is not None and p99 <= BOUND_SECONDS)}
        print(json.dumps(out, indent=2))
        return 0 if out["met"] else 1
    finally:
        stop_processes(procs)
        pg.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
