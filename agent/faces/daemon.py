"""`eptwatch-agent run`: sample every interval, spool, stream to the aggregator, serve /metrics."""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from eptwatch.agent.faces.config import (
    ConfigError,
    check_agent_values,
    read_config_file,
    read_era_overrides,
)
from eptwatch.agent.faces.metrics import AgentCollector, AgentState
from eptwatch.agent.model.sampler import Sampler, SamplerConfig
from eptwatch.agent.report.host_report import host_report
from eptwatch.agent.sources.hostroot import HostRoot
from eptwatch.agent.sources.labels import parse_labels_file
from eptwatch.agent.sources.smaps import SCANNER
from eptwatch.agent.sources.status import ParseError
from eptwatch.agent.uplink.delivery import Delivery, DeliveryConfig, channel_options
from eptwatch.agent.uplink.spool import Spool, SpoolFull
from eptwatch.common.httpserve import HttpServer

log = logging.getLogger("eptwatch.agent")


@dataclass(frozen=True)
class AgentConfig:
    server: str = ""
    interval_seconds: float = 30.0
    # Each interval is stretched or shrunk by up to this fraction so a fleet does not sample in lockstep.
    jitter_ratio: float = 0.2
    spool_path: str = "/var/lib/eptwatch/agent-spool.sqlite3"
    spool_max_bytes: int = 256 * 1024 * 1024
    spool_max_age_seconds: float = 7 * 24 * 3600.0
    metrics_listen: str = "127.0.0.1:9860"
    host_id: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    labels_file: str = ""
    token_file: str = ""
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_server_name: str = ""
    insecure_plaintext: bool = False
    root: str = ""
    procfs: str = ""
    sysfs: str = ""
    debugfs: str = ""
    era_overrides_file: str = ""
    smaps_budget_seconds: float = 0.25
    # Ask QEMU's QMP monitor (query-stats) for a VM's counters when debugfs has none (kvm_qmp.py).
    use_qmp: bool = True
    guest_ram_min_bytes: int = 64 * 1024 * 1024
    batch_max_reports: int = 50
    max_message_bytes: int = 16 * 1024 * 1024
    stream_max_age_seconds: float = 600.0
    backoff_initial_seconds: float = 1.0
    backoff_max_seconds: float = 60.0
    # On SIGTERM: all the time the agent takes to go (delivering what is spooled; a sample in progress
    # gets a short grace inside it). Small, so the agent is gone within 2 s whatever a read is doing.
    shutdown_flush_seconds: float = 1.5
    load_balancing: str = "pick_first"  # round_robin over a headless Service's replicas

    def __post_init__(self) -> None:
        if not self.server:
            raise ValueError("server: the aggregator's HOST:PORT is required")
        check_agent_values(self)
        if not self.tls_ca and not self.insecure_plaintext:
            raise ValueError("no TLS configured: give tls_ca (and tls_cert/tls_key for mutual TLS), or insecure_plaintext: true")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together")
        if self.load_balancing not in ("pick_first", "round_robin"):
            raise ValueError(f"load_balancing: expected pick_first or round_robin, got {self.load_balancing!r}")
        if not 0 <= self.jitter_ratio < 1:
            raise ValueError(f"jitter_ratio: expected 0 <= x < 1, got {self.jitter_ratio}")
        for name in ("interval_seconds", "spool_max_age_seconds", "stream_max_age_seconds", "backoff_initial_seconds",
                     "backoff_max_seconds", "spool_max_bytes", "batch_max_reports", "max_message_bytes"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: expected a positive number")

    def host_root(self) -> HostRoot:
        return HostRoot.from_paths(self.root, self.procfs, self.sysfs, self.debugfs)


def make_channel_factory(cfg: AgentConfig) -> tuple[object, tuple[tuple[str, str], ...]]:
    dcfg = delivery_config(cfg)
    opts = channel_options(dcfg, cfg.tls_server_name or None)
    metadata: tuple[tuple[str, str], ...] = ()
    if cfg.token_file:
        raw = read_config_file(cfg.token_file, "token").strip()
        # The token goes into a gRPC header: printable ASCII only, and the message never echoes it.
        if not raw:
            raise ConfigError(f"{cfg.token_file}: token file is empty")
        if not all(0x21 <= b <= 0x7E for b in raw):
            raise ConfigError(f"{cfg.token_file}: token must be printable ASCII without spaces (the file's content is not shown)")
        token = raw.decode("ascii")
        metadata = (("authorization", f"Bearer {token}"),)
    if cfg.insecure_plaintext and not cfg.tls_ca:
        return (lambda: grpc.aio.insecure_channel(cfg.server, options=opts)), metadata
    creds = grpc.ssl_channel_credentials(
        root_certificates=read_config_file(cfg.tls_ca, "TLS CA"),
        private_key=read_config_file(cfg.tls_key, "TLS key") if cfg.tls_key else None,
        certificate_chain=read_config_file(cfg.tls_cert, "TLS certificate") if cfg.tls_cert else None,
    )
    return (lambda: grpc.aio.secure_channel(cfg.server, creds, options=opts)), metadata


def delivery_config(cfg: AgentConfig) -> DeliveryConfig:
    return DeliveryConfig(cfg.server, cfg.batch_max_reports, cfg.max_message_bytes, stream_max_age_seconds=cfg.stream_max_age_seconds,
                          backoff_initial_seconds=cfg.backoff_initial_seconds, backoff_max_seconds=cfg.backoff_max_seconds,
                          load_balancing=cfg.load_balancing)


def load_labels(cfg: AgentConfig) -> dict[str, str]:
    labels = dict(cfg.labels)
    if cfg.labels_file:
        labels.update(parse_labels_file(read_config_file(cfg.labels_file, "labels file").decode("utf-8", "replace"), cfg.labels_file))
    return labels


class AgentDaemon:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        try:
            labels = load_labels(cfg)
            overrides = read_era_overrides(cfg.era_overrides_file)
        except ParseError as exc:
            raise ValueError(str(exc)) from None
        self.labels = labels
        self.sampler = Sampler(cfg.host_root(), SamplerConfig(
            smaps_budget_seconds=cfg.smaps_budget_seconds, guest_ram_min_bytes=cfg.guest_ram_min_bytes,
            host_id=cfg.host_id or None, era_overrides=overrides, use_qmp=cfg.use_qmp))
        self.spool = Spool(Path(cfg.spool_path), cfg.spool_max_bytes, cfg.spool_max_age_seconds)
        factory, metadata = make_channel_factory(cfg)
        self.delivery = Delivery(delivery_config(cfg), self.spool, factory, metadata)  # type: ignore[arg-type]
        self.state = AgentState(delivery=self.delivery.counters, spool=self.spool)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(AgentCollector(self.state))
        self.http = HttpServer(cfg.metrics_listen, self._route) if cfg.metrics_listen else None

    def _route(self, path: str, query: dict[str, list[str]]) -> tuple[int, str, bytes]:
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        if path == "/healthz":
            return 200, "text/plain; charset=utf-8", b"ok\n"
        if path == "/readyz":
            ready = self.state.samples_total > 0
            return (200 if ready else 503), "text/plain; charset=utf-8", b"ready\n" if ready else b"no sample yet\n"
        return 404, "text/plain; charset=utf-8", b"not found\n"

    def _sample_once(self, stop: threading.Event | None = None) -> None:
        t0 = time.monotonic()
        sample = self.sampler.sample()
        if stop is not None and stop.is_set():
            return  # stopping: the spool is being flushed and closed
        self.state.sample_duration_seconds = time.monotonic() - t0
        self.state.sample = sample
        self.state.samples_total += 1

        def build(seq: int) -> bytes:
            return host_report(sample, sequence=seq, agent_instance=self.spool.agent_instance, labels=self.labels).SerializeToString()

        self.spool.append(build)

    # How long a stopping agent waits for a sample in progress before leaving its thread behind.
    SAMPLER_GRACE_SECONDS = 0.3

    def _sampling(self, stop: threading.Event, notify: Callable[[], None]) -> None:
        """The sampling loop, in its own daemon thread: a read that blocks (a FIFO, a hung mount) must
        not hold up SIGTERM, delivery or the event loop, and cannot keep the process alive."""
        while not stop.is_set():
            try:
                self._sample_once(stop)
                if not stop.is_set():  # once stopping, the loop may be gone
                    notify()
            except SpoolFull as exc:
                log.warning("sample not spooled: %s", exc)
            except Exception:  # noqa: BLE001 - a sampler bug must not stop delivery of what is spooled
                self.state.sample_failures_total += 1
                log.exception("sample failed")
            delay = self.cfg.interval_seconds * (1 + random.uniform(-self.cfg.jitter_ratio, self.cfg.jitter_ratio))
            stop.wait(delay)

    async def run(self, stopping: asyncio.Event | None = None) -> int:
        stopping = stopping or asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        if self.http is not None:
            self.http.start()
            log.info("metrics on %s", self.cfg.metrics_listen)
        log.info("agent instance %s streaming to %s every %.0f s", self.spool.agent_instance, self.cfg.server, self.cfg.interval_seconds)
        if SCANNER != "c":
            log.warning("smaps: the compiled scanner (eptwatch.agent.sources._smapscan) is not built; the regex fallback "
                        "finds the same VMAs at several times the CPU cost on large smaps")
        stop_sampling = threading.Event()
        sampler = threading.Thread(target=self._sampling, name="eptwatch-sampler", daemon=True,
                                   args=(stop_sampling, lambda: loop.call_soon_threadsafe(self.delivery.notify)))
        sampler.start()
        delivering = asyncio.create_task(self.delivery.run(stopping))
        await stopping.wait()
        log.info("stopping: no more samples; flushing the spool for up to %.1f s", self.cfg.shutdown_flush_seconds)
        stop_sampling.set()
        # One budget for everything below: delivery keeps running while the sampler gets its grace.
        deadline = loop.time() + max(self.cfg.shutdown_flush_seconds, self.SAMPLER_GRACE_SECONDS)
        # The HTTP server takes up to its poll interval (0.5 s) to stop: do it beside the grace and flush.
        http_stopped = asyncio.create_task(asyncio.to_thread(self.http.stop)) if self.http is not None else None
        await asyncio.to_thread(sampler.join, self.SAMPLER_GRACE_SECONDS)
        if sampler.is_alive():
            log.warning("stopping: the sample in progress did not return within %.1f s; leaving it behind. It is stuck at:\n%s",
                        self.SAMPLER_GRACE_SECONDS, stuck_frame(sampler))
        self.delivery.notify()
        try:
            await asyncio.wait_for(delivering, max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:
            log.info("flush incomplete: %d report(s) stay spooled for the next start", self.spool.stats().depth)
        if http_stopped is not None:
            await http_stopped
        self.spool.close()  # a sample still stuck finds it closed and spools nothing when it returns
        return 0


def stuck_frame(thread: threading.Thread) -> str:
    frame = sys._current_frames().get(thread.ident or -1)
    return "".join(traceback.format_stack(frame)) if frame is not None else "(no frame)"
