"""The Ingest gRPC servicer: thin. Authenticate, check, hand to the store, acknowledge.

It also tracks which hosts each live stream carries, so that a host counts only on the replica that
holds it: when a stream ends the fleet state hears whether the agent said it was departing (rotating
to another replica or stopping: its hosts leave at once) or the stream just ended or broke (the agent
is probably coming back: its hosts stay until they go stale).

Per-message cost is most of what the aggregator spends on a report (bench/ingest_load.py), so this
path does each thing once: one walk over a report's estimates yields both the checks and the host's
totals, the bytes a report arrived in are what the store keeps (no re-encoding), and the idle timeout
is one timer per stream rather than one per message.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc
from google.protobuf.message import DecodeError

from eptwatch.server.fleet.state import FleetState, HostSummary, summarise
from eptwatch.server.ingest.auth import Principal, TokenTable
from eptwatch.server.ingest.validate import ReportTotals, check_report, check_spool_dropped
from eptwatch.server.store.base import StoreBase
from eptwatch.server.store.commit import ApplyResult, Incoming, StoreError
from eptwatch.v1 import ingest_pb2
from eptwatch.v1 import report_pb2 as pb

log = logging.getLogger("eptwatch.server.ingest.servicer")

INGEST_SERVICE = ingest_pb2.DESCRIPTOR.services_by_name["Ingest"].full_name
ACK_COMPRESSION = grpc.Compression.NoCompression


@dataclass
class IngestCounters:
    """Process-lifetime counters exported on /metrics."""

    streams_open: int = 0
    streams_total: int = 0
    reports_applied_total: int = 0
    reports_duplicate_total: int = 0
    reports_rejected_total: int = 0
    streams_refused: dict[str, int] = field(default_factory=dict)  # by gRPC status name

    def refused(self, code: grpc.StatusCode) -> None:
        self.streams_refused[code.name] = self.streams_refused.get(code.name, 0) + 1


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs a call per field, per message
class Received:
    """An AgentMessage as it came off the wire: the parsed message, its bytes, and where in them each
    report is encoded (None when that could not be told; the store then encodes a report itself)."""

    message: ingest_pb2.AgentMessage
    data: bytes
    spans: list[tuple[int, int]] | None

    def report_bytes(self, i: int) -> bytes | None:
        """The exact bytes report `i` arrived in (a copy: only the reports the store keeps are cut out)."""
        if self.spans is None:
            return None
        start, end = self.spans[i]
        return self.data[start:end]


@dataclass(frozen=True, slots=True)
class Undecodable:
    """A message protobuf could not parse: the stream ends INVALID_ARGUMENT (not UNKNOWN, no traceback)."""

    size_bytes: int
    error: str


def decode_agent_message(data: bytes) -> Received | Undecodable:
    """The request deserializer: protobuf parses the message; a walk over its top-level fields finds
    each report's bytes, a few varints per report. Never raises: what cannot be parsed is Undecodable,
    which the stream turns into INVALID_ARGUMENT."""
    try:
        message = ingest_pb2.AgentMessage.FromString(data)
    except (DecodeError, ValueError, RuntimeError) as exc:  # RuntimeError: protobuf's recursion limit
        return Undecodable(len(data), " ".join(str(exc).split())[:200] or type(exc).__name__)  # one line
    return Received(message, data, report_spans(data, len(message.reports)))


def report_spans(data: bytes, expected: int) -> list[tuple[int, int]] | None:
    """(start, end) of each `reports` entry (field 1) of a serialized AgentMessage, in order."""
    spans: list[tuple[int, int]] = []
    i, n = 0, len(data)
    try:
        while i < n:
            key, i = _varint(data, i)
            wire_type = key & 7
            if wire_type == 2:
                length, i = _varint(data, i)
                if key >> 3 == 1:
                    spans.append((i, i + length))
                i += length
            elif wire_type == 0:
                _, i = _varint(data, i)
            elif wire_type == 1:
                i += 8
            elif wire_type == 5:
                i += 4
            else:
                return None
    except IndexError:
        return None
    return spans if i == n and len(spans) == expected else None


def _varint(data: bytes, i: int) -> tuple[int, int]:
    b = data[i]
    if b < 0x80:
        return b, i + 1
    value, shift = b & 0x7F, 7
    while True:
        i += 1
        b = data[i]
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i + 1
        shift += 7
        if shift > 63:
            raise IndexError("varint longer than 10 bytes")


class _IdleWatch:
    """Ends a stream that sends nothing for `timeout` seconds while we wait for its next message. One
    timer per stream, re-armed only when it fires, rather than a timer set and cancelled per message."""

    __slots__ = ("_loop", "_timeout", "_task", "_handle", "deadline", "waiting", "fired")

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float, task: asyncio.Task[object]) -> None:
        self._loop, self._timeout, self._task = loop, timeout, task
        self.deadline = loop.time() + timeout
        self.waiting = True
        self.fired = False
        self._handle = loop.call_at(self.deadline, self._check)

    def reading(self) -> None:
        self.deadline = self._loop.time() + self._timeout
        self.waiting = True

    def _check(self) -> None:
        now = self._loop.time()
        if self.waiting and now >= self.deadline:
            self.fired = True
            self._task.cancel()
            return
        self._handle = self._loop.call_at(self.deadline if self.waiting else now + self._timeout, self._check)

    def close(self) -> None:
        self._handle.cancel()


class IngestServicer:
    def __init__(self, store: StoreBase, fleet: FleetState, tokens: TokenTable | None, idle_timeout_seconds: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.fleet = fleet
        self.tokens = tokens  # None: authentication explicitly disabled (plaintext demo on loopback)
        self.idle_timeout = idle_timeout_seconds
        self.counters = IngestCounters()
        self._clock = clock

    def handler(self) -> grpc.GenericRpcHandler:
        """The Ingest service, registered with our deserializer (which keeps each report's bytes)."""
        return grpc.method_handlers_generic_handler(INGEST_SERVICE, {
            "Stream": grpc.stream_stream_rpc_method_handler(
                self.Stream, request_deserializer=decode_agent_message,
                response_serializer=ingest_pb2.ServerMessage.SerializeToString),
        })

    async def _abort(self, context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> None:
        self.counters.refused(code)
        await context.abort(code, message)

    async def Stream(self, request_iterator: AsyncIterator[Received | Undecodable],  # noqa: N802 - gRPC naming
                     context: grpc.aio.ServicerContext) -> AsyncIterator[ingest_pb2.ServerMessage]:
        """Reads ahead: a reader task checks each message and hands it to the store while earlier ones
        are still committing, and the acks of every message whose transaction has committed go out
        together. So a stream is not held to one message per commit, and one commit that holds several
        of a stream's messages costs one response, not several."""
        principal: Principal | None = None
        if self.tokens is not None:
            principal = self.tokens.authenticate(context.invocation_metadata())
            if principal is None:
                log.info("stream from %s refused: missing or unknown bearer token", context.peer())
                await self._abort(context, grpc.StatusCode.UNAUTHENTICATED, "missing or unknown bearer token")
        # Acks go out uncompressed: a ~60-byte ack only grows under gzip, and compressing each response
        # cost about 110 us per message here (bare server, hot-50: 2,400 against 1,900 reports/core-s).
        # Reports still arrive gzip-compressed; query responses keep the server's default (gzip).
        context.set_compression(ACK_COMPRESSION)
        self.counters.streams_open += 1
        self.counters.streams_total += 1
        stream = _StreamState(asyncio.get_running_loop())
        reader = asyncio.create_task(self._read(request_iterator, principal, stream))
        try:
            queue, ready = stream.queue, stream.ready
            while True:
                if not queue:
                    ready.clear()
                    await ready.wait()
                    continue
                head = queue[0]
                if isinstance(head, _Refusal):
                    await self._abort(context, head.code, head.message)
                    return
                if head is _END:
                    return
                if isinstance(head, BaseException):
                    raise head
                assert isinstance(head, _Admitted)
                if head.future is not None and not head.future.done():
                    # Not `await future`: if this stream is cancelled (the agent went away) the store's
                    # future must live on, so that its done-callback applies the commit. That callback
                    # sets `ready` (cheaper than asyncio.wait, which this path took per message).
                    ready.clear()
                    await ready.wait()
                    continue
                failure = _store_failure(head)
                if failure is not None:
                    # Nothing of this message was stored: no ack for it or anything after it. The agent
                    # keeps its reports and sends them again once the store can take them.
                    log.error("stream from %s ended: %s", context.peer(), failure)
                    await self._abort(context, grpc.StatusCode.UNAVAILABLE, failure)
                    return
                acks: list[ingest_pb2.ReportAck] = []
                while queue and isinstance(queue[0], _Admitted) and (queue[0].future is None or queue[0].future.done()):
                    if _store_failure(queue[0]) is not None:
                        break  # acks so far go out; the next turn ends the stream
                    acks.extend(self._acks(queue.popleft(), stream))  # type: ignore[arg-type]
                stream.room.set()
                if acks:
                    yield ingest_pb2.ServerMessage(acks=acks)
        finally:
            reader.cancel()
            self.counters.streams_open -= 1
            self.fleet.stream_ended(stream.carried, clean=stream.departing)

    async def _read(self, request_iterator: AsyncIterator[Received | Undecodable], principal: Principal | None,
                    stream: _StreamState) -> None:
        queue, ready, room = stream.queue, stream.ready, stream.room
        task = asyncio.current_task()
        assert task is not None  # we run as the reader task
        watch = _IdleWatch(asyncio.get_running_loop(), self.idle_timeout, task)
        try:
            it = request_iterator.__aiter__()
            while True:
                watch.reading()
                try:
                    got = await it.__anext__()
                except StopAsyncIteration:
                    queue.append(_END)
                    return
                except asyncio.CancelledError:
                    if not watch.fired:
                        raise
                    task.uncancel()
                    queue.append(_Refusal(grpc.StatusCode.DEADLINE_EXCEEDED,
                                          f"no message for {self.idle_timeout:.0f} s: stream closed"))
                    return
                watch.waiting = False
                if isinstance(got, Undecodable):
                    log.warning("stream refused: an undecodable AgentMessage of %d bytes (%s)", got.size_bytes, got.error)
                    queue.append(_Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                                          f"undecodable AgentMessage ({got.size_bytes} bytes): {got.error}"))
                    return
                stream.departing = stream.departing or got.message.departing
                item = self._admit(got, principal, stream)
                # What is kept now lives in `item`; do not hold the rest (a backlog message's every
                # report's bytes) while waiting for room or for the next message.
                del got
                queue.append(item)
                if not (isinstance(item, _Admitted) and item.future is not None and not item.future.done()):
                    ready.set()  # else its commit wakes the handler when it lands (one wake-up per message)
                if isinstance(item, _Refusal):
                    return
                while len(queue) >= READ_AHEAD_MESSAGES or stream.queued_reports() >= READ_AHEAD_REPORTS:
                    room.clear()
                    await room.wait()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the handler re-raises it, as if it had read the message itself
            queue.append(exc)
        finally:
            watch.close()
            ready.set()

    def _admit(self, got: Received, principal: Principal | None, stream: _StreamState) -> _Admitted | _Refusal:
        """Checks a message's reports and hands the valid ones to the store (without waiting for it).
        What a commit changes (counters, fleet state) is applied by a callback on the store's future,
        whether or not this stream is still there to send the acks."""
        msg = got.message
        carried = stream.carried
        now = self._clock()
        acks: list[ingest_pb2.ReportAck | None] = []
        checked_reports: list[tuple[int, pb.HostReport, ReportTotals]] = []
        last: dict[str, int] = {}  # host -> index of its last valid report in this message
        # Stored with each of the message's reports: if it cannot be, none of them can be applied.
        dropped_refusal = check_spool_dropped(msg.spool_dropped_total)
        for i, r in enumerate(msg.reports):
            host_id = r.host_id
            # A host already carried by this stream passed both checks before: its answer cannot change.
            if host_id not in carried and principal is not None and not principal.may_report_for(host_id):
                log.warning("token %r may not report for host %r: stream refused", principal.name, host_id[:80])
                return _Refusal(grpc.StatusCode.PERMISSION_DENIED,
                                f"token {principal.name!r} may not report for host {host_id[:80]!r}")
            checked = dropped_refusal or check_report(r, now, (got.data, *got.spans[i]) if got.spans is not None else None)
            if isinstance(checked, str):
                self.counters.reports_rejected_total += 1
                log.warning("report %s/%s/%d rejected: %s", host_id[:80], r.agent_instance[:64], r.sequence, checked)
                acks.append(ingest_pb2.ReportAck(host_id=host_id, agent_instance=r.agent_instance, sequence=r.sequence,
                                                 status=ingest_pb2.ACK_STATUS_REJECTED, reason=checked))
                continue
            if host_id not in carried:
                carried.add(host_id)
                self.fleet.stream_carries(host_id)
            acks.append(None)
            last[host_id] = i
            checked_reports.append((i, r, checked))
        if not checked_reports:
            return _Admitted(acks, [], None)
        # Wire bytes go with a host's last report in the message only: the one that normally becomes its
        # stored latest. Holding every report's bytes of a 50-report backlog until the commit costs
        # more (memory churn) than the writer serialising the rare other one that wins.
        dropped = msg.spool_dropped_total
        accepted = [(i, Incoming(r, got.report_bytes(i) if last[r.host_id] == i else None, dropped, checked), checked)
                    for i, r, checked in checked_reports]
        # Hurried when an earlier message of this stream is still unacknowledged: the agent is sending
        # ahead (a backlog, a busy host) and the commit's latency bounds its throughput. A paced agent's
        # lone report lets the store gather a larger group (GroupCommitWriter).
        future = self.store.submit([inc for _, inc, _ in accepted], hurry=bool(stream.queue), loop=stream.loop)
        ready = stream.ready

        def committed(f: asyncio.Future[list[ApplyResult]]) -> None:
            self._applied(accepted, f)
            ready.set()  # the handler sends the acks (if the stream is still there)

        future.add_done_callback(committed)
        return _Admitted(acks, accepted, future)

    def _applied(self, accepted: list[tuple[int, Incoming, ReportTotals]], future: asyncio.Future[list[ApplyResult]]) -> None:
        """A message's transaction ended: count its reports and put each host's newest into the fleet state."""
        if future.cancelled() or future.exception() is not None:
            return  # nothing was applied; the stream, if still there, fails with the error
        received = self._clock()
        latest: dict[str, tuple[Incoming, ReportTotals, HostSummary | None]] = {}
        for (_, inc, totals), res in zip(accepted, future.result()):
            if res.status == ingest_pb2.ACK_STATUS_APPLIED:
                self.counters.reports_applied_total += 1
                if res.became_latest:
                    # A later one of the same host supersedes it.
                    latest[inc.report.host_id] = (inc, totals, res.summary)
            elif res.status == ingest_pb2.ACK_STATUS_REJECTED:  # the store could not write this one
                self.counters.reports_rejected_total += 1
            else:
                self.counters.reports_duplicate_total += 1
        # Summarised once per host per message: a replayed backlog of 50 costs one summary, not 50; none
        # where the store made it already (PostgreSQL, received at its transaction's time).
        for inc, totals, summary in latest.values():
            self.fleet.put(summary if summary is not None else summarise(inc.report, received, inc.spool_dropped_total, totals))

    @staticmethod
    def _acks(item: _Admitted, stream: _StreamState) -> list[ingest_pb2.ReportAck]:
        """A committed message's acks, in the order of its reports. A DUPLICATE carries the high-water
        mark, so that an agent whose spool was rewound (restored from a snapshot, its meta rewritten)
        can tell and move on with a new instance instead of being acked DUPLICATE until it passes it."""
        acks = item.acks
        if item.future is not None:
            for (i, inc, _), res in zip(item.accepted, item.future.result()):
                r = inc.report
                ack = acks[i] = ingest_pb2.ReportAck(host_id=r.host_id, agent_instance=r.agent_instance, sequence=r.sequence,
                                                     status=res.status)  # type: ignore[arg-type]
                if res.high_water_sequence:
                    ack.high_water_sequence = res.high_water_sequence
                    if not stream.rewind_logged:  # once per stream: a rewound spool resends many
                        stream.rewind_logged = True
                        log.info("host %s instance %s: sequence %d is at or below the high-water mark %d: acked "
                                 "DUPLICATE with the mark (a resend after a lost ack, or a rewound spool); logged once per stream",
                                 r.host_id[:80], r.agent_instance[:64], r.sequence, res.high_water_sequence)
                elif res.reason:
                    ack.reason = res.reason
        return [a for a in acks if a is not None]


# What a stream may have read but not yet acknowledged: a few messages of one report each (the steady
# state), but no more than about one backlog batch. Parsed reports are several times their wire size,
# so reading further ahead costs memory and cache without saving any work. It also bounds what one
# stream holds: at most READ_AHEAD_MESSAGES x max_message_bytes.
READ_AHEAD_MESSAGES = 8
READ_AHEAD_REPORTS = 64

_END = object()  # the agent closed its side


@dataclass(frozen=True, slots=True)
class _Refusal:
    code: grpc.StatusCode
    message: str


@dataclass(slots=True)
class _Admitted:
    acks: list[ingest_pb2.ReportAck | None]  # REJECTED acks in place; None where the store decides
    accepted: list[tuple[int, Incoming, ReportTotals]]  # (index in the message, report, its totals)
    future: asyncio.Future[list[ApplyResult]] | None  # None: nothing went to the store


def _store_failure(item: object) -> str | None:
    """What to tell the agent if `item`'s transaction failed in the store; None if it did not (yet)."""
    if not isinstance(item, _Admitted) or item.future is None or not item.future.done() or item.future.cancelled():
        return None
    exc = item.future.exception()
    if exc is None:
        return None
    if isinstance(exc, StoreError):
        return f"aggregator cannot store reports: {exc} (nothing acknowledged: send again later)"
    return f"aggregator cannot store reports: {type(exc).__name__}: {exc} (nothing acknowledged: send again later)"


class _Signal:
    """asyncio.Event for one waiter, bound to its loop when made: asyncio.Event asks for the running loop
    at every wait, a getpid() system call each on Python 3.11, twice per message on this path."""

    __slots__ = ("_is_set", "_loop", "_waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._is_set = False
        self._waiter: asyncio.Future[None] | None = None

    def set(self) -> None:
        self._is_set = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def clear(self) -> None:
        self._is_set = False

    async def wait(self) -> None:
        if self._is_set:
            return
        waiter = self._waiter = self._loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None


class _StreamState:
    __slots__ = ("loop", "queue", "ready", "room", "carried", "departing", "rewind_logged")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: deque[_Admitted | _Refusal | BaseException | object] = deque()
        # Wakes the handler: the reader added what the handler can act on now (a refusal, the end, a
        # message with nothing to commit), or a queued message's commit ended.
        self.ready = _Signal(loop)
        self.room = _Signal(loop)  # the handler took something
        self.carried: set[str] = set()
        self.departing = False
        self.rewind_logged = False

    def queued_reports(self) -> int:
        return sum(len(item.acks) for item in self.queue if isinstance(item, _Admitted))  # one ack slot per report
