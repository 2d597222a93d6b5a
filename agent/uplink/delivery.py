"""Delivery of spooled reports to the aggregator over one bidirectional gRPC stream at a time.

The spool holds serialised HostReports; an AgentMessage is framed from them directly (field 1,
length-delimited) so a backlog is never parsed and re-encoded on the agent. Acknowledged reports
(applied, duplicate or rejected) leave the spool; everything else is resent on the next stream,
oldest first. Reconnects use exponential backoff with full jitter so a fleet that lost its aggregator
does not come back in lockstep.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from eptwatch.agent.uplink.spool import Spool
from eptwatch.v1 import ingest_pb2

log = logging.getLogger("eptwatch.agent.uplink.delivery")

STREAM_METHOD = "/eptwatch.v1.Ingest/Stream"


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


DEPARTING_MESSAGE = b"\x18\x01"  # AgentMessage{departing: true}


def encode_agent_message(payloads: list[bytes], spool_dropped_total: int) -> bytes:
    """AgentMessage{reports: payloads, spool_dropped_total} without re-encoding the reports."""
    parts = [b"\x0a" + varint(len(p)) + p for p in payloads]
    if spool_dropped_total:
        parts.append(b"\x10" + varint(spool_dropped_total))
    return b"".join(parts)


@dataclass
class DeliveryCounters:
    reports_sent_total: int = 0
    reports_acked_total: int = 0
    reports_rejected_total: int = 0
    reconnects_total: int = 0
    instance_restarts_total: int = 0  # new agent instances started because the spool was rewound
    connected: bool = False
    last_error: str = ""


@dataclass(frozen=True)
class DeliveryConfig:
    target: str
    batch_max_reports: int = 50
    max_message_bytes: int = 16 * 1024 * 1024
    max_in_flight: int = 500
    stream_max_age_seconds: float = 600.0
    backoff_initial_seconds: float = 1.0
    backoff_max_seconds: float = 60.0
    # round_robin spreads streams over every address a name resolves to (a headless Service's
    # replicas); pick_first sticks to one.
    load_balancing: str = "pick_first"


class SpoolRewound(Exception):
    """The aggregator holds sequences of our instance beyond what the spool has made: the stream ends
    and the next one carries the new agent instance."""


def channel_options(cfg: DeliveryConfig, server_name: str | None = None) -> list[tuple[str, object]]:
    opts: list[tuple[str, object]] = [
        # Keep NATs and load balancers from dropping an idle stream, and notice a dead peer.
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_send_message_length", cfg.max_message_bytes),
        ("grpc.max_receive_message_length", cfg.max_message_bytes),
        # We own the reconnect policy (full jitter); keep gRPC's own backoff short underneath it.
        ("grpc.initial_reconnect_backoff_ms", 500),
        ("grpc.max_reconnect_backoff_ms", 5_000),
        ("grpc.enable_retries", 0),
    ]
    if cfg.load_balancing != "pick_first":
        opts.append(("grpc.lb_policy_name", cfg.load_balancing))
    if server_name:
        opts.append(("grpc.ssl_target_name_override", server_name))
    return opts


class Delivery:
    def __init__(self, cfg: DeliveryConfig, spool: Spool, make_channel: Callable[[], grpc.aio.Channel],
                 metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self.cfg = cfg
        self.spool = spool
        self.make_channel = make_channel
        self.metadata = metadata
        self.counters = DeliveryCounters()
        self.wake = asyncio.Event()  # set when a new report is spooled or acks free the window
        # The newest report the aggregator acknowledged: sent first on every new stream when the
        # spool is empty, so a replica the agent rotates to holds this host at once (a duplicate
        # where it already does).
        self.last_acked: tuple[int, bytes] | None = None

    def notify(self) -> None:
        self.wake.set()

    async def run(self, stopping: asyncio.Event) -> None:
        """Deliver until `stopping` is set and the spool is empty (the caller bounds the flush)."""
        attempt = 0
        while True:
            if stopping.is_set() and (await asyncio.to_thread(self.spool.stats)).depth == 0:
                return
            acked_before = self.counters.reports_acked_total
            try:
                await self._one_stream(stopping)
            except SpoolRewound:
                attempt = 0  # not an outage: reconnect at once as the new instance
                self.counters.connected = False
                self.counters.reconnects_total += 1
                continue
            except grpc.aio.AioRpcError as exc:
                self._note_error(f"{exc.code().name}: {exc.details()}")
            except (OSError, asyncio.TimeoutError, asyncio.InvalidStateError) as exc:
                # InvalidStateError: a write after the server ended the RPC (it died mid-stream).
                self._note_error(str(exc) or type(exc).__name__)
            except Exception as exc:  # noqa: BLE001 - e.g. sqlite3.Error from the spool (disk full, I/O error)
                # Delivery must not end quietly while sampling goes on: say so and retry with backoff.
                log.exception("delivery failed unexpectedly")
                self._note_error(f"{type(exc).__name__}: {exc}")
            finally:
                self.counters.connected = False
            if self.counters.reports_acked_total > acked_before:
                attempt = 0  # the stream made progress: the next outage starts backing off afresh
            else:
                attempt += 1
            if stopping.is_set() and (await asyncio.to_thread(self.spool.stats)).depth == 0:
                return
            self.counters.reconnects_total += 1
            cap = min(self.cfg.backoff_max_seconds, self.cfg.backoff_initial_seconds * (2 ** min(attempt, 20)))
            delay = random.uniform(0, cap) if attempt else 0.0
            try:
                await asyncio.wait_for(stopping.wait(), delay) if not stopping.is_set() else await asyncio.sleep(min(delay, 0.5))
            except asyncio.TimeoutError:
                pass

    def _note_error(self, text: str) -> None:
        if text != self.counters.last_error:
            log.warning("delivery to %s failed: %s", self.cfg.target, text)  # never the token: it is only in metadata
        self.counters.last_error = text

    async def _one_stream(self, stopping: asyncio.Event) -> None:
        channel = self.make_channel()
        try:
            call = channel.stream_stream(
                STREAM_METHOD, request_serializer=lambda b: b, response_deserializer=ingest_pb2.ServerMessage.FromString
            )(metadata=self.metadata, compression=grpc.Compression.Gzip, timeout=self.cfg.stream_max_age_seconds + 60)
            in_flight: set[int] = set()
            sent_payloads: dict[int, bytes] = {}  # newest report of each batch, to remember once acked
            started = time.monotonic()

            async def sender() -> None:
                cursor = 0
                if self.last_acked is not None and not await asyncio.to_thread(self.spool.pending, 0, 1, 1 << 30):
                    await call.write(encode_agent_message([self.last_acked[1]], self.spool.dropped_total))
                    in_flight.add(self.last_acked[0])
                while True:
                    self.wake.clear()
                    rotating = time.monotonic() - started > self.cfg.stream_max_age_seconds and not stopping.is_set()
                    closing = rotating or stopping.is_set()
                    window = self.cfg.max_in_flight - len(in_flight)
                    batch = await asyncio.to_thread(
                        self.spool.pending, cursor, min(self.cfg.batch_max_reports, window), self.cfg.max_message_bytes // 2
                    ) if window > 0 and not rotating else []
                    if batch:
                        newest = batch[-1]
                        body = encode_agent_message([p for _, p in batch], self.spool.dropped_total)
                        await call.write(body)
                        cursor = batch[-1][0]
                        in_flight.update(s for s, _ in batch)
                        self.counters.reports_sent_total += len(batch)
                        sent_payloads[newest[0]] = newest[1]
                        continue
                    if closing and not in_flight:
                        # Shutting down with nothing outstanding, or rotating the stream so agents
                        # rebalance across aggregator replicas: say so, then close our side cleanly.
                        await call.write(DEPARTING_MESSAGE)
                        await call.done_writing()
                        return
                    try:
                        await asyncio.wait_for(self.wake.wait(), 1.0)
                    except asyncio.TimeoutError:
                        pass

            async def receiver() -> None:
                async for smsg in call:
                    self.counters.connected = True
                    done: list[int] = []
                    rejected: set[int] = set()
                    instance = self.spool.agent_instance
                    mine = [ack for ack in smsg.acks if ack.agent_instance == instance]
                    high_water = max((a.high_water_sequence for a in mine if a.status == ingest_pb2.ACK_STATUS_DUPLICATE), default=0)
                    rewound = high_water > 0 and await asyncio.to_thread(self.spool.restart_instance, high_water) is not None
                    for ack in mine:
                        if rewound and ack.status == ingest_pb2.ACK_STATUS_DUPLICATE:
                            # A sequence the aggregator already held under the old instance may be a
                            # different, newer sample made after the rewind: keep it, it is resent
                            # restamped as the new instance.
                            continue
                        done.append(ack.sequence)
                        if ack.status == ingest_pb2.ACK_STATUS_REJECTED:
                            rejected.add(ack.sequence)
                            self.counters.reports_rejected_total += 1
                            log.error("report %d rejected by the aggregator: %s", ack.sequence, ack.reason)
                    await asyncio.to_thread(self.spool.ack, done)
                    self.counters.reports_acked_total += len(done)
                    for seq in sorted(done):
                        payload = sent_payloads.pop(seq, None)
                        # A rejected report is never the one resent to a new replica: it would be refused again.
                        if payload is not None and seq not in rejected and (self.last_acked is None or seq > self.last_acked[0]):
                            self.last_acked = (seq, payload)
                    in_flight.difference_update(done)
                    self.wake.set()
                    if rewound:
                        self.counters.instance_restarts_total += 1
                        self.last_acked = None  # stamped with the old instance
                        log.warning("aggregator %s acked sequences up to %d of our agent instance as duplicates: the spool "
                                    "was rewound; now agent instance %s", self.cfg.target, high_water, self.spool.agent_instance)
                        raise SpoolRewound(high_water)

            send_task = asyncio.create_task(sender())
            recv_task = asyncio.create_task(receiver())
            try:
                done, _ = await asyncio.wait({send_task, recv_task}, return_when=asyncio.FIRST_EXCEPTION)
                for t in done:
                    t.result()
                if send_task.done() and not recv_task.done():
                    await recv_task  # our side is closed: collect the last acks until the server ends
            finally:
                for t in (send_task, recv_task):
                    t.cancel()
                call.cancel()
        finally:
            await channel.close()
