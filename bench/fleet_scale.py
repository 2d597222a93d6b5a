#!/usr/bin/env python3
"""Fleet scale: 100,000 simulated hosts (20 VMs each) held by one aggregator.

The issue's benchmark: resident memory, /metrics scrape time and API latency of one aggregator
process holding 100,000 hosts. Targets: resident memory at most 1 GiB, a /metrics scrape under 1 s.

What runs:

* Reports: the real agent's reports of the fixture trees (`eptwatch.server.simulate.load_templates`:
  Sampler -> host_report on tests/fixtures/*), each template's VMs and their estimates replicated to
  --vms per report with distinct vm ids (each estimate copied whole, so it stays consistent:
  lost == max(0, capacity - observed), breakdown sums to lost, ratio in [0, 1]; every template is
  checked with the aggregator's own `validate_report`). The fleet mix, host ids and cluster/zone labels
  are `SimulatedFleet`'s (DEFAULT_MIX: healthy kernels, the regressed linux-6.6-pages2m = 6.6.15 and the
  known-bad linux-5.3-unfixed = 5.3.0).
* A real aggregator process: `eptwatch-server --insecure-plaintext --insecure-no-auth`, a state
  directory under /tmp (SQLite, synchronous=FULL, the default), a config with
  `rollup_labels: [cluster, zone]`. Its staleness bound is raised (report_interval_seconds 600) so no
  host goes stale while the benchmark runs: every host is fresh and in every rollup.
* A separate feeder process sends every host's report over gRPC: --streams streams in parallel (one
  channel, i.e. one TCP connection, each), --batch reports per AgentMessage, gzip like the agent, each
  message acknowledged (after the SQLite commit) before the stream sends its next one. Reports are
  framed as bytes (host_id/labels/instance/sequence/sample_time prepended to a pre-serialised body),
  so the feeder stays cheap on a small machine.

Measured: ingest wall time, with a /metrics scrape every --ingest-scrape-interval seconds meanwhile
(each rebuilds the view: every report invalidates it, and ingest competes for the interpreter);
aggregator VmRSS and VmHWM (/proc/PID/status) after ingest and at the end; the SQLite state size
(db + WAL); then, idle, /metrics over HTTP, cold (cache miss: the fleet view is cached
for 1 s, so each cold scrape follows a 1.1 s pause and rebuilds it) and warm (right after a cold one:
cached view); the JSON API (/api/v1/fleet, /api/v1/kernels, /api/v1/hosts?kernel=X&limit=100,
/api/v1/hosts/{id}) and the fleet page `/`, --requests back-to-back requests each (p50/p99: a burst
mostly hits the cached view) plus a few cold requests each (after a 1.1 s pause: view rebuilt).

    .venv/bin/python bench/fleet_scale.py                   # 100,000 hosts, 2 to 4 minutes
    .venv/bin/python bench/fleet_scale.py --hosts 10000     # quick check
    .venv/bin/python bench/fleet_scale.py --json out.json --markdown
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from _common import (
    body_of,
    check_body,
    clear_proxy_env,
    cpu_seconds,
    frame,
    free_port,
    host_prefix,
    machine,
    pct,
    stop_processes,
    wait_http_ready,
    widen,
)

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
BIN = Path(sys.executable).parent

TARGET_RSS_BYTES = 1 << 30  # 1 GiB
TARGET_SCRAPE_SECONDS = 1.0
REGRESSED_RELEASE = "6.6.15"  # tests/fixtures/linux-6.6-pages2m
KNOWN_BAD_RELEASE = "5.3.0"  # tests/fixtures/linux-5.3-unfixed
VIEW_CACHE_PAUSE = 1.1  # > FleetState's max_view_age (1 s): the next request rebuilds the view


# --- reports -----------------------------------------------------------------------------------

def bodies(n_vms: int) -> tuple[dict[str, bytes], dict[str, str]]:
    """Per fixture: the widened report serialised without the per-host fields (prepended per host by
    `host_prefix` + `frame`), checked as the aggregator will check it; and its kernel release."""
    from eptwatch.server.simulate import DEFAULT_MIX, load_templates

    out, releases = {}, {}
    for name, t in load_templates(FIXTURES, list(DEFAULT_MIX)).items():
        out[name] = body_of(widen(t, n_vms))
        check_body(out[name], (("cluster", "c"), ("zone", "z")), what=f"widened template {name}")
        releases[name] = t.kernel.release
    return out, releases


# --- the feeder (a separate process) -----------------------------------------------------------

def feeder_main(args: argparse.Namespace) -> int:
    """Sends one report for each of --hosts simulated hosts to --target; prints a JSON summary."""
    import grpc

    from eptwatch.agent.uplink.delivery import (
        STREAM_METHOD,
        DeliveryConfig,
        channel_options,
        encode_agent_message,
    )
    from eptwatch.server.simulate import SimulatedFleet
    from eptwatch.v1 import ingest_pb2

    body, releases = bodies(args.vms)
    fleet = SimulatedFleet({k: None for k in body}, args.hosts)  # type: ignore[misc]  # only hosts/mix/labels used
    hosts = fleet.hosts
    comp = grpc.Compression.Gzip if args.compression == "gzip" else grpc.Compression.NoCompression
    sizes: list[int] = []
    opts = channel_options(DeliveryConfig(target=args.target, max_message_bytes=64 << 20))

    async def one_stream(k: int, mine: list[Any], now: float) -> tuple[int, int]:
        applied = other = 0
        async with grpc.aio.insecure_channel(args.target, options=opts) as ch:
            call = ch.stream_stream(STREAM_METHOD, request_serializer=lambda b: b,
                                    response_deserializer=ingest_pb2.ServerMessage.FromString)(compression=comp, timeout=3600)
            for i in range(0, len(mine), args.batch):
                payloads = [frame(host_prefix(h.host_id, h.instance, h.labels), body[h.template], 1, now) for h in mine[i: i + args.batch]]
                if k == 0 and i == 0:
                    sizes.extend(len(p) for p in payloads)
                await call.write(encode_agent_message(payloads, 0))
                reply = await call.read()
                for a in reply.acks:
                    if a.status == ingest_pb2.ACK_STATUS_APPLIED:
                        applied += 1
                    else:
                        other += 1
            await call.done_writing()
            assert await call.read() is grpc.aio.EOF
            code = await call.code()
            if code != grpc.StatusCode.OK:
                raise RuntimeError(f"stream {k} ended with {code}: {await call.details()}")
        return applied, other

    async def run() -> dict[str, Any]:
        now = time.time()
        t0 = time.monotonic()
        res = await asyncio.gather(*(one_stream(k, hosts[k:: args.streams], now) for k in range(args.streams)))
        return {"seconds": time.monotonic() - t0, "applied": sum(a for a, _ in res), "not_applied": sum(o for _, o in res),
                "report_bytes_mean": statistics.mean(sizes) if sizes else 0, "releases": releases}

    out = asyncio.run(run())
    print(json.dumps(out))
    return 0


# --- the aggregator ----------------------------------------------------------------------------

def proc_status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            out[k] = int(v.split()[0]) * 1024
    return out


class Server:
    def __init__(self, workdir: Path, top_n: int, pythonpath: str | None = None) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.grpc_port, self.http_port = free_port(), free_port()
        cfg = workdir / "server.yaml"
        cfg.write_text("rollup_labels: [cluster, zone]\n"
                       f"top_n_worst_hosts: {top_n}\n"
                       "report_interval_seconds: 600\n")  # stale after 40 min: nothing goes stale during the run
        self.log = open(workdir / "server.log", "ab")
        self.popen = subprocess.Popen(
            [str(BIN / "eptwatch-server"), "--listen", self.target, "--http", f"127.0.0.1:{self.http_port}",
             "--state", str(workdir / "state"), "--config", str(cfg), "--insecure-plaintext", "--insecure-no-auth",
             "--log-level", "WARNING"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PYTHONPATH": pythonpath} if pythonpath else None)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def wait_ready(self, timeout: float = 300.0) -> None:
        wait_http_ready(self.http + "/readyz", self.popen, self.workdir / "server.log", timeout)

    def stop(self) -> None:
        stop_processes([self.popen])
        self.log.close()

    def db_bytes(self) -> dict[str, int]:
        d = self.workdir / "state"
        return {p.name: p.stat().st_size for p in sorted(d.iterdir()) if p.is_file()}


def get(url: str) -> tuple[float, int, bytes]:
    t0 = time.perf_counter()
    with urllib.request.urlopen(url, timeout=120) as r:
        body = r.read()
        status = r.status
    return time.perf_counter() - t0, status, body


def ms(x: float) -> str:
    return f"{x * 1000:.1f}"


def mib(x: float) -> str:
    return f"{x / (1 << 20):.0f}"


def feed(args: argparse.Namespace, server: Server) -> dict[str, Any]:
    print(f"aggregator pid {server.popen.pid} ready; feeding {args.hosts} hosts x {args.vms} VMs over {args.streams} streams ...",
          file=sys.stderr)
    feeder = subprocess.run(
        [sys.executable, __file__, "--feed", "--target", server.target, "--hosts", str(args.hosts), "--vms", str(args.vms),
         "--streams", str(args.streams), "--batch", str(args.batch), "--compression", args.compression],
        capture_output=True, text=True, timeout=args.ingest_timeout)
    if feeder.returncode != 0:
        raise SystemExit(f"feeder failed: {feeder.stderr[-3000:]}")
    return json.loads(feeder.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def run(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.monotonic()
    workdir = Path(args.reuse) if args.reuse else Path(tempfile.mkdtemp(prefix="eptwatch-fleet-scale-", dir="/tmp"))
    server = Server(workdir, args.top_n, args.aggregator_pythonpath)
    res: dict[str, Any] = {"hosts": args.hosts, "vms_per_host": args.vms, "streams": args.streams, "batch": args.batch,
                           "compression": args.compression, "machine": {**machine(), "loadavg_1m_at_start": os.getloadavg()[0]},
                           "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    try:
        server.wait_ready()
        pid = server.popen.pid
        res["rss_idle"] = proc_status(pid)
        cpu0 = cpu_seconds(pid)
        if args.reuse:  # development: the state of a --keep run, loaded at start; no ingest
            fed = {"seconds": float("nan"), "applied": args.hosts, "not_applied": 0, "report_bytes_mean": float("nan"), "releases": None}
        else:
            during: list[float] = []
            stop = threading.Event()

            def scrape_while_feeding() -> None:
                # The steady state of a live fleet: every report invalidates the cached view, so each
                # scrape rebuilds it while ingest competes for the same interpreter.
                while not stop.wait(args.ingest_scrape_interval):
                    try:
                        during.append(get(server.http + "/metrics")[0])
                    except OSError:
                        pass

            sampler = threading.Thread(target=scrape_while_feeding, daemon=True)
            sampler.start()
            try:
                fed = feed(args, server)
            finally:
                stop.set()
                sampler.join()
            if during:
                res["metrics_during_ingest"] = {"n": len(during), "median": statistics.median(during), "max": max(during)}
        res["releases"] = fed.pop("releases")
        res["ingest"] = {**fed, "reports_per_second": fed["applied"] / fed["seconds"], "server_cpu_seconds": cpu_seconds(pid) - cpu0}
        if fed["applied"] != args.hosts:
            raise SystemExit(f"only {fed['applied']} of {args.hosts} reports applied")
        print(f"ingest: {fed['seconds']:.1f} s ({fed['applied'] / fed['seconds']:.0f} reports/s)", file=sys.stderr)
        res["rss_after_ingest"] = proc_status(pid)
        res["db_bytes"] = server.db_bytes()

        # /metrics: cold (cache miss) and warm (cached view), alternating.
        cold, warm, size = [], [], 0
        for _ in range(args.scrapes):
            time.sleep(VIEW_CACHE_PAUSE)
            dt, status, body = get(server.http + "/metrics")
            assert status == 200
            cold.append(dt)
            size = len(body)
            dt, _, _ = get(server.http + "/metrics")
            warm.append(dt)
        text = body.decode()
        res["metrics"] = {"bytes": size, "series": sum(1 for ln in text.splitlines() if ln and not ln.startswith("#")),
                          "cold": {"median": statistics.median(cold), "max": max(cold), "all": cold},
                          "warm": {"median": statistics.median(warm), "max": max(warm), "all": warm}}
        print(f"/metrics cold median {ms(statistics.median(cold))} ms max {ms(max(cold))} ms; "
              f"warm median {ms(statistics.median(warm))} ms", file=sys.stderr)

        # Sanity: the view holds every host, finds the regression and the known-bad kernel.
        fleet = json.loads(get(server.http + "/api/v1/fleet")[2])
        verdicts = {k["kernel_release"]: k["verdict"] for k in fleet["kernels"]}
        checks = {
            "fresh_hosts": int(fleet["total"]["hosts"]),
            "vms": int(fleet["total"]["vms"]),
            "regressed": verdicts.get(REGRESSED_RELEASE),
            "known_bad": verdicts.get(KNOWN_BAD_RELEASE),
            "label_rollups": sorted(f"{x['label']}={x['value']}" for x in fleet["labels"]),
            "metrics_hosts_line": next((ln for ln in text.splitlines() if ln.startswith("eptwatch_server_hosts ")), None),
        }
        res["checks"] = checks
        ok = (checks["fresh_hosts"] == args.hosts and checks["regressed"] == "KERNEL_VERDICT_REGRESSED"
              and checks["known_bad"] == "KERNEL_VERDICT_KNOWN_BAD")
        res["checks_ok"] = ok
        if not ok:
            print(f"CHECKS FAILED: {checks}", file=sys.stderr)

        # API and page: bursts of back-to-back requests (mostly cached view) and cold requests.
        host_ids = [h["host_id"] for h in json.loads(get(server.http + f"/api/v1/hosts?kernel={REGRESSED_RELEASE}&limit=100")[2])["hosts"]]
        kernel_q = urllib.parse.quote(REGRESSED_RELEASE)
        endpoints = {
            "/api/v1/fleet": lambda i: "/api/v1/fleet",
            "/api/v1/kernels": lambda i: "/api/v1/kernels",
            "/api/v1/hosts?kernel=X&limit=100": lambda i: f"/api/v1/hosts?kernel={kernel_q}&limit=100&offset={(i % 5) * 100}",
            "/api/v1/hosts/{id}": lambda i: f"/api/v1/hosts/{host_ids[i % len(host_ids)]}",
            "/ (fleet page)": lambda i: "/",
        }
        api: dict[str, Any] = {}
        for name, path in endpoints.items():
            time.sleep(VIEW_CACHE_PAUSE)
            burst, nbytes = [], 0
            for i in range(args.requests):
                dt, status, body = get(server.http + path(i))
                assert status == 200, (name, status)
                burst.append(dt)
                nbytes = len(body)
            cold_api = []
            for i in range(args.cold_requests):
                time.sleep(VIEW_CACHE_PAUSE)
                cold_api.append(get(server.http + path(i))[0])
            api[name] = {"p50": pct(burst, 0.5), "p99": pct(burst, 0.99), "max": max(burst), "n": len(burst), "bytes": nbytes,
                         "cold_median": statistics.median(cold_api) if cold_api else None,
                         "cold_max": max(cold_api) if cold_api else None}
            print(f"{name}: p50 {ms(api[name]['p50'])} ms p99 {ms(api[name]['p99'])} ms; cold median "
                  f"{ms(api[name]['cold_median'] or 0)} ms", file=sys.stderr)
        res["api"] = api
        res["rss_end"] = proc_status(pid)
        res["db_bytes_end"] = server.db_bytes()
        res["server_cpu_seconds_total"] = cpu_seconds(pid)
    finally:
        server.stop()
        if args.keep or args.reuse:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    hwm = max(res.get("rss_end", {}).get("VmHWM", 0), res.get("rss_after_ingest", {}).get("VmHWM", 0))
    res["targets"] = {
        "rss_max_bytes": hwm, "rss_ok": hwm <= TARGET_RSS_BYTES,
        "scrape_cold_max": res["metrics"]["cold"]["max"], "scrape_ok": res["metrics"]["cold"]["max"] < TARGET_SCRAPE_SECONDS,
    }
    res["wall_seconds"] = time.monotonic() - t_start
    res["loadavg_1m_at_end"] = os.getloadavg()[0]
    return res


def markdown(res: dict[str, Any], argv: list[str]) -> str:
    m, ing, met, t = res["machine"], res["ingest"], res["metrics"], res["targets"]
    db = sum(res["db_bytes"].values())
    lines = [
        f"- Date: {res['date']}; command: `{' '.join(['.venv/bin/python', 'bench/fleet_scale.py', *argv])}`",
        f"- Machine: {m['nproc']} CPUs ({m['cpu']}), {m['mem_total_gib']} GiB RAM, kernel {m['kernel']}, Python {m['python']}; "
        f"load average (1 min) {m['loadavg_1m_at_start']:.1f} at the start, {res['loadavg_1m_at_end']:.1f} at the end",
        f"- Fleet: {res['hosts']:,} hosts x {res['vms_per_host']} VMs ({res['checks']['vms']:,} VMs), "
        f"report {ing['report_bytes_mean'] / 1024:.1f} KiB mean; fed over {res['streams']} gRPC streams, {res['batch']} reports per message, {res['compression']}",
        "",
        "| measure | value | target |",
        "| --- | --- | --- |",
        f"| ingest of all hosts | {ing['seconds']:.1f} s ({ing['reports_per_second']:,.0f} reports/s; aggregator CPU {ing['server_cpu_seconds']:.1f} s) | |",
        f"| aggregator RSS idle (before ingest) | {mib(res['rss_idle']['VmRSS'])} MiB | |",
        f"| aggregator RSS after ingest (VmRSS / VmHWM) | {mib(res['rss_after_ingest']['VmRSS'])} / {mib(res['rss_after_ingest']['VmHWM'])} MiB | |",
        f"| aggregator RSS at the end (VmRSS / VmHWM) | {mib(res['rss_end']['VmRSS'])} / {mib(res['rss_end']['VmHWM'])} MiB | <= 1024 MiB: {'met' if t['rss_ok'] else 'MISSED'} |",
        f"| SQLite state (db + WAL) | {mib(db)} MiB ({db / res['hosts'] / 1024:.1f} KiB per host) | |",
        f"| /metrics cold (view rebuilt), median / max of {len(met['cold']['all'])} | {ms(met['cold']['median'])} / {ms(met['cold']['max'])} ms | < 1000 ms: {'met' if t['scrape_ok'] else 'MISSED'} |",
        f"| /metrics warm (cached view), median / max | {ms(met['warm']['median'])} / {ms(met['warm']['max'])} ms | |",
        *([f"| /metrics while ingesting (view rebuilt each time), median / max of {d['n']} | {ms(d['median'])} / {ms(d['max'])} ms | |"]
          if (d := res.get("metrics_during_ingest")) else []),
        f"| /metrics size | {met['bytes'] / 1024:.1f} KiB, {met['series']} series | |",
    ]
    lines += ["", "| endpoint | p50 ms | p99 ms | cold median ms | response |", "| --- | --- | --- | --- | --- |"]
    for name, a in res["api"].items():
        lines.append(f"| `{name}` | {ms(a['p50'])} | {ms(a['p99'])} | {ms(a['cold_median'] or 0)} | {a['bytes'] / 1024:.1f} KiB |")
    c = res["checks"]
    lines += ["", f"Checks: {c['fresh_hosts']:,} fresh hosts; {REGRESSED_RELEASE} {c['regressed']}; {KNOWN_BAD_RELEASE} {c['known_bad']}; "
              f"label rollups {', '.join(c['label_rollups'])}. Whole run {res['wall_seconds']:.0f} s."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    clear_proxy_env()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hosts", type=int, default=100_000)
    p.add_argument("--vms", type=int, default=20, help="VMs per host report")
    p.add_argument("--streams", type=int, default=8, help="parallel gRPC streams from the feeder")
    p.add_argument("--batch", type=int, default=50, help="reports per AgentMessage")
    p.add_argument("--compression", choices=("gzip", "none"), default="gzip")
    p.add_argument("--top-n", type=int, default=10, help="top_n_worst_hosts")
    p.add_argument("--scrapes", type=int, default=10, help="cold and warm /metrics scrapes each")
    p.add_argument("--requests", type=int, default=50, help="back-to-back requests per API endpoint")
    p.add_argument("--cold-requests", type=int, default=5, help="cold requests per API endpoint")
    p.add_argument("--ingest-timeout", type=float, default=420.0)
    p.add_argument("--ingest-scrape-interval", type=float, default=5.0, help="seconds between /metrics scrapes during ingest")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--markdown", action="store_true", help="print the results as a Markdown table")
    p.add_argument("--keep", action="store_true", help="keep the state directory")
    p.add_argument("--aggregator-pythonpath", metavar="DIR",
                   help="before/after comparisons: PYTHONPATH for the aggregator (a tree with another eptwatch/server)")
    p.add_argument("--reuse", metavar="DIR", help="development: start on the state a --keep run left in DIR, no ingest")
    p.add_argument("--feed", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--target", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.feed:
        return feeder_main(args)
    res = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    out = markdown(res, argv)
    print(out if args.markdown else json.dumps(res, indent=1))
    ok = res["targets"]["rss_ok"] and res["targets"]["scrape_ok"] and res["checks_ok"]
    print(f"targets: RSS {mib(res['targets']['rss_max_bytes'])} MiB {'met' if res['targets']['rss_ok'] else 'MISSED'}; "
          f"cold scrape max {ms(res['targets']['scrape_cold_max'])} ms {'met' if res['targets']['scrape_ok'] else 'MISSED'}",
          file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
