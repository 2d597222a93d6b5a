"""Several aggregator replicas behind one name split the fleet, and no host is counted twice.

Two replicas listen on the same port at 127.0.0.1 and 127.0.0.2 (what a headless Service's DNS name
resolves to); agents use round_robin over both addresses and rotate their streams quickly, so hosts
keep moving between replicas. Each replica exports its share; the sum over replicas is the fleet.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .procs import Aggregator, Proc, agent_args, free_port, http_get

FIXTURE_CYCLE = ["linux-5.3-unfixed", "linux-5.4-fixed", "anon-thp", "linux-6.6-pages2m", "hugetlbfs-1g", "linux-5.10-hostwalk"]


def fresh_hosts(agg: Aggregator) -> set[str]:
    doc = json.loads(http_get(agg.http + "/api/v1/hosts?limit=1000"))
    return {h["host_id"] for h in doc["hosts"]}


def test_replicas_split_the_fleet_without_double_counting(tmp_path: Path) -> None:
    port = free_port()
    replicas = []
    for i, ip in enumerate(("127.0.0.1", "127.0.0.2")):
        a = Aggregator(tmp_path / f"r{i}", ["--insecure-plaintext", "--insecure-no-auth"], grpc_port=port)
        a.target_ip = ip  # type: ignore[attr-defined]
        replicas.append(a)
    for a in replicas:
        a.proc = Proc([*_server_args(a, a.target_ip)], a.workdir / "server.log").start()  # type: ignore[attr-defined]
    for a in replicas:
        from .procs import wait_http
        wait_http(a.http + "/readyz")
    cfg = tmp_path / "agent.yaml"
    cfg.write_text("load_balancing: round_robin\nstream_max_age_seconds: 1.5\nbackoff_initial_seconds: 0.05\nbackoff_max_seconds: 0.5\n")
    target = f"ipv4:127.0.0.1:{port},127.0.0.2:{port}"
    hosts = [f"hv-scale-{i}" for i in range(6)]
    agents = [Proc(agent_args(target, tmp_path / h / "spool.sqlite3", h, fixture=FIXTURE_CYCLE[i], interval=0.3,
                              extra=["--insecure-plaintext", "--config", str(cfg)]), tmp_path / h / "agent.log").start()
              for i, h in enumerate(hosts)]
    try:
        seen_on: list[set[str]] = [set(), set()]
        complete_polls = 0
        deadline = time.monotonic() + 12
        time.sleep(2)
        while time.monotonic() < deadline:
            shares = [fresh_hosts(a) for a in replicas]
            for i, s in enumerate(shares):
                seen_on[i] |= s
            # Never counted twice: the replicas' shares are disjoint at every instant we look.
            assert not (shares[0] & shares[1]), f"counted on both replicas: {shares[0] & shares[1]}"
            union = shares[0] | shares[1]
            assert union <= set(hosts)
            complete_polls += union == set(hosts)
            time.sleep(0.25)
        assert complete_polls >= 10  # the whole fleet is visible across replicas nearly all the time
        assert seen_on[0] and seen_on[1]  # both replicas carried hosts: the fleet is split
        moved = seen_on[0] & seen_on[1]
        assert moved  # rotation moved hosts between replicas, and each move was a clean hand-over
        totals = [json.loads(http_get(a.http + "/api/v1/fleet"))["total"] for a in replicas]
        assert sum(int(t["hosts"]) for t in totals) <= len(hosts)
    finally:
        for p in agents:
            p.kill9()
        for a in replicas:
            a.proc.kill9()  # type: ignore[union-attr]


def _server_args(a: Aggregator, ip: str) -> list[str]:
    from .procs import BIN

    return [str(BIN / "eptwatch-server"), "--listen", f"{ip}:{a.grpc_port}", "--http", f"127.0.0.1:{a.http_port}",
            "--state", str(a.workdir / "state"), *a.extra]
