"""Agent -> aggregator streaming with real processes on loopback."""

from __future__ import annotations

import asyncio
import math
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from eptwatch.server.ingest.auth import hash_token
from eptwatch.v1 import ingest_pb2, ingest_pb2_grpc
from eptwatch.v1 import report_pb2 as pb

from .conftest import sampled_report_bytes
from .procs import Aggregator, Proc, agent_args, http_get, spool_state

INSECURE = ["--insecure-plaintext", "--insecure-no-auth"]
# A generous flush budget: these tests assert that SIGTERM delivers the whole spool, on a loaded machine.
FAST_BACKOFF = "backoff_initial_seconds: 0.05\nbackoff_max_seconds: 0.5\nshutdown_flush_seconds: 10\n"


def fast_agent_config(tmp_path: Path, extra: str = "") -> Path:
    p = tmp_path / "agent.yaml"
    p.write_text(FAST_BACKOFF + extra)
    return p


def start_agent(tmp_path: Path, name: str, server: str, extra: list[str] | None = None) -> tuple[Proc, Path]:
    """Start a real agent and wait until it is up (its first report spooled): a SIGTERM before its
    handler is installed would be the default kill, not a test of its shutdown."""
    spool = tmp_path / name / "spool.sqlite3"
    cfg = fast_agent_config(tmp_path)
    args = agent_args(server, spool, name, extra=["--insecure-plaintext", "--config", str(cfg), *(extra or [])])
    proc = Proc(args, tmp_path / name / "agent.log").start()
    wait_for(lambda: spool_state(spool)[1] >= 1, 60, proc)
    return proc, spool


def wait_for(cond, timeout: float, proc: Proc | None = None) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if cond():
                return
        except Exception:  # noqa: BLE001 - the spool may be mid-creation
            pass
        time.sleep(0.05)
    raise TimeoutError(f"condition not met in {timeout} s" + (f"; log: {proc.output()[-1500:]}" if proc else ""))


def assert_exactly_once(agg: Aggregator, spools: dict[str, Path]) -> None:
    applied = agg.applied()
    for host, spool in spools.items():
        instance, created, depth = spool_state(spool)
        assert depth == 0, f"{host}: {depth} reports still spooled"
        assert created > 0
        # Every sequence 1..created applied, and applied once: the high-water mark is `created` and the
        # count of applications is `created` (a duplicate would push the count above, a loss below).
        assert applied[(host, instance)] == (created, created), (host, applied[(host, instance)], created)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_state(request: pytest.FixtureRequest) -> str | None:
    """The aggregator's --state: None for SQLite in its work directory, or a fresh PostgreSQL database."""
    from .pg import pg_server

    return pg_server().new_database() if request.param == "postgresql" else None


def test_sigkill_aggregator_repeatedly_every_report_applied_exactly_once(tmp_path: Path, store_state: str | None) -> None:
    agg = Aggregator(tmp_path / "agg", INSECURE, state=store_state).start()
    agents = {f"hv-kill-{i}": start_agent(tmp_path, f"hv-kill-{i}", agg.target) for i in range(3)}
    try:
        for _ in range(4):
            time.sleep(1.0)
            agg.proc.kill9()  # type: ignore[union-attr]
            time.sleep(0.4)  # an outage: agents keep sampling into their spools
            agg.start()
        time.sleep(1.5)
        for name, (proc, _) in agents.items():
            assert proc.term() == 0, proc.output()
        assert_exactly_once(agg, {n: s for n, (_, s) in agents.items()})
        assert agg.starts == 5
    finally:
        for proc, _ in agents.values():
            proc.kill9()
        agg.proc.kill9()  # type: ignore[union-attr]


def test_agent_sigkilled_during_outage_delivers_its_spool_after_restart(tmp_path: Path, store_state: str | None) -> None:
    agg = Aggregator(tmp_path / "agg", INSECURE, state=store_state)  # not started: the outage
    proc, spool = start_agent(tmp_path, "hv-outage", agg.target)
    try:
        wait_for(lambda: spool.exists() and spool_state(spool)[1] > 5, 30, proc)
        proc.kill9()
        _, created_before, depth = spool_state(spool)
        assert created_before > 5 and depth == created_before  # nothing could be delivered
        proc, _ = start_agent(tmp_path, "hv-outage", agg.target)  # same spool
        time.sleep(0.5)
        agg.start()
        time.sleep(1.5)
        assert proc.term() == 0
        assert_exactly_once(agg, {"hv-outage": spool})
        instance, created, _ = spool_state(spool)
        assert created > created_before  # numbering continued across the restart
    finally:
        proc.kill9()
        if agg.proc:
            agg.proc.kill9()


def test_sigterm_flushes_and_exits_zero(tmp_path: Path) -> None:
    agg = Aggregator(tmp_path / "agg", INSECURE).start()
    proc, spool = start_agent(tmp_path, "hv-term", agg.target)
    try:
        time.sleep(1.0)
        assert proc.term() == 0
        assert spool_state(spool)[2] == 0
        assert agg.proc.term() == 0  # type: ignore[union-attr]
        assert "shutting down" in agg.proc.output()  # type: ignore[union-attr]
    finally:
        proc.kill9()
        agg.proc.kill9()  # type: ignore[union-attr]


# --- direct clients: auth, validation, overload ---

def report(seq: int, host: str = "hv-a-1", instance: str = "inst-1", fixture: str = "linux-5.3-unfixed") -> pb.HostReport:
    """A real report of the fixture host (sampled once per session), numbered and stamped as now."""
    r = pb.HostReport.FromString(sampled_report_bytes(fixture))
    r.sequence, r.agent_instance, r.host_id = seq, instance, host
    r.sample_time.FromNanoseconds(time.time_ns())  # as if sampled now, like a fresh sample per report
    return r


async def exchange(target: str, messages: list[ingest_pb2.AgentMessage], metadata: tuple[tuple[str, str], ...] = (),
                   creds: grpc.ChannelCredentials | None = None, options: list | None = None) -> list[ingest_pb2.ServerMessage]:
    channel = grpc.aio.secure_channel(target, creds, options=options) if creds else grpc.aio.insecure_channel(target)
    async with channel:
        call = ingest_pb2_grpc.IngestStub(channel).Stream(metadata=metadata, timeout=15)
        out = []
        for m in messages:
            try:
                await call.write(m)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                # The server may end the call (e.g. UNAUTHENTICATED) before our write goes out: the
                # write then fails locally (INTERNAL "execute_batch"); the server's status is the call's.
                raise grpc.aio.AioRpcError(await call.code(), grpc.aio.Metadata(), grpc.aio.Metadata(),
                                           await call.details()) from None
            out.append(await call.read())
        await call.done_writing()
        return out


async def status_without_writing(target: str, metadata: tuple[tuple[str, str], ...]) -> grpc.StatusCode:
    """The status the aggregator ends a stream with when it refuses it on its metadata alone."""
    async with grpc.aio.insecure_channel(target) as channel:
        call = ingest_pb2_grpc.IngestStub(channel).Stream(metadata=metadata, timeout=15)
        return await call.code()


@pytest.fixture
def authed(tmp_path: Path):  # type: ignore[no-untyped-def]
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(f"tokens:\n  - name: rack-a\n    sha256: {hash_token('secret-token-a')}\n    hosts: ['hv-a-*']\n")
    agg = Aggregator(tmp_path / "agg", ["--insecure-plaintext", "--tokens-file", str(tokens)]).start()
    yield agg
    agg.proc.kill9()  # type: ignore[union-attr]


def test_unauthenticated_and_wrong_scope_are_refused(authed: Aggregator) -> None:
    good = (("authorization", "Bearer secret-token-a"),)
    # The aggregator refuses on the call's metadata, before it reads a message: the status is read
    # without writing, since a write racing the refusal can end the call locally as INTERNAL.
    assert asyncio.run(status_without_writing(authed.target, ())) == grpc.StatusCode.UNAUTHENTICATED
    assert asyncio.run(status_without_writing(authed.target, (("authorization", "Bearer wrong"),))) == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as info:
        asyncio.run(exchange(authed.target, [ingest_pb2.AgentMessage(reports=[report(1, host="hv-b-1")])], good))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    (reply,) = asyncio.run(exchange(authed.target, [ingest_pb2.AgentMessage(reports=[report(1)])], good))
    assert reply.acks[0].status == ingest_pb2.ACK_STATUS_APPLIED
    (reply,) = asyncio.run(exchange(authed.target, [ingest_pb2.AgentMessage(reports=[report(1)])], good))
    assert reply.acks[0].status == ingest_pb2.ACK_STATUS_DUPLICATE
    metrics = http_get(authed.http + "/metrics")
    assert 'eptwatch_server_streams_refused_total{code="UNAUTHENTICATED"} 2.0' in metrics
    assert 'eptwatch_server_streams_refused_total{code="PERMISSION_DENIED"} 1.0' in metrics
    from eptwatch.server.ingest.validate import WALKER

    (info,) = [m for m in text_string_to_metric_families(metrics) if m.name == "eptwatch_server_build_info"]
    (sample,) = info.samples
    assert sample.labels["report_walker"] == WALKER and sample.labels["version"] and sample.value == 1, sample
    assert "secret-token-a" not in authed.proc.output()  # type: ignore[union-attr]
    assert "rack-a" in authed.proc.output()  # type: ignore[union-attr]


def test_agent_with_token_file_streams(authed: Aggregator, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("secret-token-a\n")
    proc, spool = start_agent(tmp_path, "hv-a-7", authed.target, ["--token-file", str(token)])
    try:
        time.sleep(1.0)
        assert proc.term() == 0
        assert_exactly_once(authed, {"hv-a-7": spool})
        assert "secret-token-a" not in proc.output()
    finally:
        proc.kill9()


def test_health_and_reflection(tmp_path: Path) -> None:
    agg = Aggregator(tmp_path / "agg", INSECURE).start()
    try:
        with grpc.insecure_channel(agg.target) as ch:
            h = health_pb2_grpc.HealthStub(ch)
            for svc in ("", "eptwatch.v1.Ingest"):
                assert h.Check(health_pb2.HealthCheckRequest(service=svc)).status == health_pb2.HealthCheckResponse.SERVING
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)
            (resp,) = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
            names = {s.name for s in resp.list_services_response.service}
            assert {"eptwatch.v1.Ingest", "grpc.health.v1.Health"} <= names
    finally:
        agg.proc.kill9()  # type: ignore[union-attr]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(d: Path, name: str) -> None:
    d.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}-ca", "-keyout", f"{name}-ca.key", "-out", f"{name}-ca.crt", cwd=d)
    for leaf, san in (("server", "subjectAltName=DNS:localhost,IP:127.0.0.1"), ("client", "subjectAltName=DNS:hv-a-1")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={leaf}", "-keyout", f"{name}-{leaf}.key", "-out", f"{name}-{leaf}.csr", cwd=d)
        (d / f"{leaf}.ext").write_text(san + "\n")
        _openssl("x509", "-req", "-in", f"{name}-{leaf}.csr", "-CA", f"{name}-ca.crt", "-CAkey", f"{name}-ca.key", "-CAcreateserial",
                 "-days", "2", "-out", f"{name}-{leaf}.crt", "-extfile", f"{leaf}.ext", cwd=d)


def test_mutual_tls(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    make_pki(pki, "good")
    make_pki(pki, "rogue")
    agg = Aggregator(tmp_path / "agg", ["--insecure-no-auth", "--tls-cert", str(pki / "good-server.crt"), "--tls-key", str(pki / "good-server.key"),
                                        "--tls-client-ca", str(pki / "good-ca.crt")]).start()
    msg = [ingest_pb2.AgentMessage(reports=[report(1)])]

    def creds(ca: str, client: str | None) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials((pki / f"{ca}-ca.crt").read_bytes(),
                                            (pki / f"{client}-client.key").read_bytes() if client else None,
                                            (pki / f"{client}-client.crt").read_bytes() if client else None)

    try:
        (reply,) = asyncio.run(exchange(agg.target, msg, creds=creds("good", "good")))
        assert reply.acks[0].status == ingest_pb2.ACK_STATUS_APPLIED
        for bad in (creds("good", None), creds("good", "rogue"), creds("rogue", "good")):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                asyncio.run(exchange(agg.target, msg, creds=bad))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.aio.AioRpcError):
            asyncio.run(exchange(agg.target, msg))  # plaintext against TLS
        # The real agent with the same material.
        spool = tmp_path / "a" / "spool.sqlite3"
        proc = Proc(agent_args(agg.target, spool, "hv-a-1", extra=["--config", str(fast_agent_config(tmp_path)), "--tls-ca", str(pki / "good-ca.crt"),
                    "--tls-cert", str(pki / "good-client.crt"), "--tls-key", str(pki / "good-client.key"), "--tls-server-name", "localhost"]),
                    tmp_path / "a" / "agent.log").start()
        wait_for(lambda: spool_state(spool)[1] >= 1, 60, proc)
        time.sleep(1.0)
        assert proc.term() == 0, proc.output()
        assert spool_state(spool)[2] == 0
    finally:
        agg.proc.kill9()  # type: ignore[union-attr]


def test_server_refuses_to_start_open(tmp_path: Path) -> None:
    from .procs import BIN

    out = subprocess.run([str(BIN / "eptwatch-server"), "--state", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 2 and "no TLS configured" in out.stderr
    out = subprocess.run([str(BIN / "eptwatch-server"), "--state", str(tmp_path), "--insecure-plaintext"], capture_output=True, text=True)
    assert out.returncode == 2 and "tokens_file" in out.stderr


@pytest.fixture
def tight(tmp_path: Path):  # type: ignore[no-untyped-def]
    cfg = tmp_path / "server.yaml"
    cfg.write_text("max_message_bytes: 200000\nstream_idle_timeout_seconds: 1.0\nmax_concurrent_streams: 40\n")
    agg = Aggregator(tmp_path / "agg", INSECURE + ["--config", str(cfg)]).start()
    yield agg
    agg.proc.kill9()  # type: ignore[union-attr]


def test_impossible_reports_are_rejected_with_a_reason(tight: Aggregator) -> None:
    bad = []
    r = report(1, instance="bad")
    r.estimates[0].lost_ratio = math.nan
    bad.append((r, "lost_ratio"))
    r = report(2, instance="bad")
    r.sample_time.seconds = int(time.time()) + 86400
    bad.append((r, "future"))
    r = report(3, instance="bad")
    r.kernel.era = 42  # type: ignore[assignment]
    bad.append((r, "unknown value 42"))
    r = report(4, instance="bad")
    r.host_id = ""
    bad.append((r, "empty host_id"))
    r = report(5, instance="bad")
    r.estimates[0].host_huge_capacity_2m = 3  # capacity below observed, yet a loss claimed
    bad.append((r, "lost_huge_2m"))
    replies = asyncio.run(exchange(tight.target, [ingest_pb2.AgentMessage(reports=[b for b, _ in bad] + [report(6, instance="bad")])]))
    acks = replies[0].acks
    assert len(acks) == len(bad) + 1
    for ack, (_, needle) in zip(acks, bad):
        assert ack.status == ingest_pb2.ACK_STATUS_REJECTED and needle in ack.reason, ack
    assert acks[-1].status == ingest_pb2.ACK_STATUS_APPLIED  # the good one in the same message still lands


def test_oversized_message_is_refused(tight: Aggregator) -> None:
    big = ingest_pb2.AgentMessage(reports=[report(i, instance="big") for i in range(1, 200)])
    assert big.ByteSize() > 200000
    with pytest.raises(grpc.aio.AioRpcError) as info:
        asyncio.run(exchange(tight.target, [big]))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_silent_streams_are_closed_and_stream_count_is_bounded(tight: Aggregator) -> None:
    async def scenario() -> tuple[list[tuple[grpc.StatusCode, str]], int]:
        async with grpc.aio.insecure_channel(tight.target) as ch:
            stub = ingest_pb2_grpc.IngestStub(ch)
            silent = [stub.Stream(timeout=20) for _ in range(60)]  # more than max_concurrent_streams (40)
            codes = []
            for call in silent:
                try:
                    await call.read()
                except grpc.aio.AioRpcError as exc:
                    codes.append((exc.code(), exc.details() or ""))
        # Everyone else is still served.
        (reply,) = await exchange(tight.target, [ingest_pb2.AgentMessage(reports=[report(1, instance="after")])])
        return codes, reply.acks[0].status

    codes, status = asyncio.run(scenario())
    refused = [c for c, _ in codes if c == grpc.StatusCode.RESOURCE_EXHAUSTED]
    # Closed by the server's idle timeout (its message says so), not by the client's own 20 s deadline.
    idled = [d for c, d in codes if c == grpc.StatusCode.DEADLINE_EXCEEDED and "stream closed" in d]
    assert len(codes) == 60
    assert len(refused) >= 20  # past the bound: refused
    assert len(idled) >= 1 and len(refused) + len(idled) == 60, codes  # every other silent one closed by the server
    assert status == ingest_pb2.ACK_STATUS_APPLIED


def test_spool_drops_reach_the_fleet_metrics_and_survive_a_restart(tmp_path: Path) -> None:
    agg = Aggregator(tmp_path / "agg", INSECURE).start()
    try:
        msg = ingest_pb2.AgentMessage(reports=[report(1, host="hv-drop-1")], spool_dropped_total=7)
        (reply,) = asyncio.run(exchange(agg.target, [msg]))
        assert reply.acks[0].status == ingest_pb2.ACK_STATUS_APPLIED
        metric = "eptwatch_fleet_agent_spool_dropped 7.0"
        assert metric in http_get(agg.http + "/metrics")
        agg.proc.kill9()  # type: ignore[union-attr]
        agg.start()
        assert metric in http_get(agg.http + "/metrics")
    finally:
        agg.proc.kill9()  # type: ignore[union-attr]
