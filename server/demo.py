"""eptwatch-demo: the whole system on this machine with embedded defaults.

Starts a real aggregator process (state under --state), the real agent daemon on this host, and a
simulated fleet of a few hundred hosts streaming the real agent's reports of the recorded fixture
trees (the seed's unfixed 5.3 and fixed 5.4 kernels among them, and 6.6.15 losing huge mappings the
model cannot explain). Prints where the fleet page and /metrics are and a short fleet summary; stops
cleanly on Ctrl-C (or after --duration).

Everything listens on loopback without TLS or tokens: a demo, said out loud by the flags it passes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc

from eptwatch.common.config import MAX_SECONDS, ConfigError, check_state_dir, error_line
from eptwatch.server import __version__
from eptwatch.server.simulate import SimHost, SimulatedFleet, load_templates
from eptwatch.v1 import ingest_pb2, ingest_pb2_grpc

BIN = Path(sys.executable).parent


def _default_fixtures() -> Path:
    # Source checkout (editable install or `make run`): <repo>/tests/fixtures next to server/.
    for base in (Path(__file__).resolve().parent.parent, Path.cwd()):
        if (base / "tests" / "fixtures").is_dir():
            return base / "tests" / "fixtures"
    return Path.cwd() / "tests" / "fixtures"


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _pick_port(preferred: int) -> int:
    if _port_free(preferred):
        return preferred
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get_json(url: str) -> dict:  # type: ignore[type-arg]
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())  # type: ignore[no-any-return]


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the aggregator exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"the aggregator was not ready at {url} within {timeout:.0f} s")


async def _simulate_host(target: str, fleet: SimulatedFleet, host: SimHost, interval: float, stop: asyncio.Event) -> None:
    """One simulated agent: one stream, a report every interval (jittered), reconnecting on error."""
    await asyncio.sleep(random.uniform(0, min(interval, 2.0)))
    while not stop.is_set():
        try:
            async with grpc.aio.insecure_channel(target) as ch:
                call = ingest_pb2_grpc.IngestStub(ch).Stream()
                while not stop.is_set():
                    await call.write(ingest_pb2.AgentMessage(reports=[fleet.report(host, time.time())]))
                    await call.read()
                    try:
                        await asyncio.wait_for(stop.wait(), interval * random.uniform(0.8, 1.2))
                    except asyncio.TimeoutError:
                        pass
                await call.write(ingest_pb2.AgentMessage(departing=True))
                await call.done_writing()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await asyncio.sleep(1.0)


def summary_text(fleet: dict) -> str:  # type: ignore[type-arg]
    t = fleet.get("total", {})
    lines = [f"fleet: {t.get('hosts', 0)} fresh hosts, {t.get('vms', 0)} VMs, lost {t.get('lost_huge_2m', 0)} of "
             f"{t.get('host_huge_capacity_2m', 0)} huge mappings ({100 * t.get('lost_ratio', 0.0):.1f}%), "
             f"{fleet.get('hosts_stale', 0)} stale"]
    lines.append(f"  {'kernel':<22} {'hosts':>5} {'loss':>7}  verdict")
    for k in fleet.get("kernels", []):
        ratio = k["rollup"].get("lost_ratio")
        verdict = k["verdict"].removeprefix("KERNEL_VERDICT_").lower()
        mark = "  <-- REGRESSED" if k.get("regressed") else "  <-- known-bad (no 169226f7e0)" if k.get("known_bad") else ""
        lines.append(f"  {k['kernel_release']:<22} {k['rollup']['hosts']:>5} {'n/a' if ratio is None else f'{100 * ratio:.1f}%':>7}  {verdict}{mark}")
    for k in fleet.get("kernels", []):
        if k.get("regressed") or k.get("known_bad"):
            lines.append(f"  {k['kernel_release']}: {k['evidence']}")
    return "\n".join(lines)


async def run_demo(args: argparse.Namespace) -> int:
    state = Path(args.state)
    state.mkdir(parents=True, exist_ok=True)
    grpc_port, http_port = _pick_port(args.grpc_port), _pick_port(args.http_port)
    target, http = f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}"
    cfg = state / "server.yaml"
    # Demo pace: hosts report every few seconds, so staleness follows that pace.
    cfg.write_text(f"report_interval_seconds: {args.interval}\nstale_after_intervals: 4\nrollup_labels: [cluster, zone]\n"
                   "page_title: eptwatch demo fleet\n")
    log = open(state / "aggregator.log", "ab")
    server = subprocess.Popen([str(BIN / "eptwatch-server"), "--listen", target, "--http", f"127.0.0.1:{http_port}",
                               "--state", str(state / "aggregator"), "--config", str(cfg), "--insecure-plaintext", "--insecure-no-auth"],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    agent: subprocess.Popen[bytes] | None = None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    tasks: list[asyncio.Task[None]] = []
    try:
        await asyncio.to_thread(_wait_ready, f"{http}/readyz", server)
        agent_log = open(state / "agent.log", "ab")
        agent = subprocess.Popen([str(BIN / "eptwatch-agent"), "run", "--server", target, "--insecure-plaintext",
                                  "--interval", str(args.interval), "--spool", str(state / "agent-spool.sqlite3"),
                                  "--metrics-listen", f"127.0.0.1:{_pick_port(9860)}"],
                                 stdout=agent_log, stderr=subprocess.STDOUT, start_new_session=True)
        templates = await asyncio.to_thread(load_templates, Path(args.fixtures), list(SimulatedFleet.default_mix()))
        fleet = SimulatedFleet(templates, args.hosts)
        tasks = [asyncio.create_task(_simulate_host(target, fleet, h, args.interval, stop)) for h in fleet.hosts]
        print(f"eptwatch demo: aggregator gRPC {target}, {args.hosts} simulated hosts + the real agent on this host")
        print(f"  fleet page   {http}/")
        print(f"  metrics      {http}/metrics")
        print(f"  API          {http}/api/v1/fleet  {http}/api/v1/kernels  {http}/api/v1/hosts")
        print(f"  state, logs  {state}")
        print("Ctrl-C stops everything.", flush=True)
        deadline = time.monotonic() + args.duration if args.duration else None
        next_summary = time.monotonic() + max(3.0, min(args.interval, 10.0))
        while not stop.is_set():
            if server.poll() is not None:
                print(f"eptwatch demo: the aggregator exited ({server.returncode}); see {state / 'aggregator.log'}", file=sys.stderr)
                return 1
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                break
            if now >= next_summary:
                try:
                    print("\n" + summary_text(await asyncio.to_thread(_get_json, f"{http}/api/v1/fleet")), flush=True)
                except OSError as exc:
                    print(f"(summary unavailable: {exc})", flush=True)
                next_summary = now + args.summary_every
            try:
                await asyncio.wait_for(stop.wait(), 0.5)
            except asyncio.TimeoutError:
                pass
        print("\neptwatch demo: stopping", flush=True)
        return 0
    finally:
        stop.set()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
            for t in tasks:
                t.cancel()
        for p in (agent, server):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in (agent, server):
            if p is not None:
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="eptwatch-demo", description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--hosts", type=int, default=300, help="simulated hosts (default 300)")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between a host's reports (default 5)")
    p.add_argument("--state", default=os.environ.get("EPTWATCH_DEMO_STATE", ".demo-state"), help="state and logs directory")
    p.add_argument("--fixtures", default=str(_default_fixtures()), help="fixture trees to replay")
    p.add_argument("--grpc-port", type=int, default=9861)
    p.add_argument("--http-port", type=int, default=9862)
    p.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds (default: run until Ctrl-C)")
    p.add_argument("--summary-every", type=float, default=30.0, help="seconds between printed fleet summaries")
    args = p.parse_args(argv)
    try:
        if not 1 <= args.hosts <= 100_000:
            raise ConfigError(f"--hosts: expected 1 to 100000, got {args.hosts}")
        for flag, value in (("--interval", args.interval), ("--summary-every", args.summary_every), ("--duration", args.duration)):
            if not (math.isfinite(value) and 0 <= value <= MAX_SECONDS) or (flag == "--interval" and value == 0):
                raise ConfigError(f"{flag}: expected a finite number of seconds{' above 0' if flag == '--interval' else ''}, got {value}")
        for flag, port in (("--grpc-port", args.grpc_port), ("--http-port", args.http_port)):
            if not 1 <= port <= 65535:
                raise ConfigError(f"{flag}: port {port} out of range (1-65535)")
        if not Path(args.fixtures).is_dir():
            raise ConfigError(f"--fixtures {args.fixtures}: not a directory (run from the repository, or pass --fixtures)")
        check_state_dir(args.state, "--state")
    except ConfigError as exc:
        print(error_line(p.prog, exc), file=sys.stderr)
        return 2
    try:
        return asyncio.run(run_demo(args))
    except RuntimeError as exc:
        print(error_line(p.prog, exc), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
