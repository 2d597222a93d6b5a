"""The Ingest gRPC servicer: thin. Authenticate, validate, hand to the store, acknowledge."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from eptwatch.v1 import ingest_pb2, ingest_pb2_grpc
from eptwatch.v1 import report_pb2 as pb

from .auth import Principal, TokenTable
from .fleet import FleetState, summarise
from .store import Incoming, Store
from .validate import validate_report

log = logging.getLogger("eptwatch.server.ingest")


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


class IngestServicer(ingest_pb2_grpc.IngestServicer):
    def __init__(self, store: Store, fleet: FleetState, tokens: TokenTable | None, idle_timeout_seconds: float,
                 clock: object = time.time) -> None:
        self.store = store
        self.fleet = fleet
        self.tokens = tokens  # None: authentication explicitly disabled (plaintext demo on loopback)
        self.idle_timeout = idle_timeout_seconds
        self.counters = IngestCounters()
        self._clock = clock

    async def _abort(self, context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> None:
        self.counters.refused(code)
        await context.abort(code, message)

    async def Stream(self, request_iterator: AsyncIterator[ingest_pb2.AgentMessage],
                     context: grpc.aio.ServicerContext) -> AsyncIterator[ingest_pb2.ServerMessage]:
        principal: Principal | None = None
        if self.tokens is not None:
            principal = self.tokens.authenticate(context.invocation_metadata())
            if principal is None:
                log.info("stream from %s refused: missing or unknown bearer token", context.peer())
                await self._abort(context, grpc.StatusCode.UNAUTHENTICATED, "missing or unknown bearer token")
        self.counters.streams_open += 1
        self.counters.streams_total += 1
        try:
            it = request_iterator.__aiter__()
            while True:
                try:
                    # asyncio.timeout, not wait_for: no extra task per message
                    async with asyncio.timeout(self.idle_timeout):
                        msg = await it.__anext__()
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    await self._abort(context, grpc.StatusCode.DEADLINE_EXCEEDED,
                                      f"no message for {self.idle_timeout:.0f} s: stream closed")
                    return
                yield await self._handle(msg, principal, context)
        finally:
            self.counters.streams_open -= 1

    async def _handle(self, msg: ingest_pb2.AgentMessage, principal: Principal | None,
                      context: grpc.aio.ServicerContext) -> ingest_pb2.ServerMessage:
        now = self._clock()  # type: ignore[operator]
        acks: list[ingest_pb2.ReportAck | None] = []
        accepted: list[tuple[int, Incoming]] = []
        for i, r in enumerate(msg.reports):
            if principal is not None and not principal.may_report_for(r.host_id):
                log.warning("token %r may not report for host %r: stream refused", principal.name, r.host_id[:80])
                await self._abort(context, grpc.StatusCode.PERMISSION_DENIED,
                                  f"token {principal.name!r} may not report for host {r.host_id[:80]!r}")
            reason = validate_report(r, now)
            if reason is not None:
                self.counters.reports_rejected_total += 1
                log.warning("report %s/%s/%d rejected: %s", r.host_id[:80], r.agent_instance[:64], r.sequence, reason)
                acks.append(ingest_pb2.ReportAck(host_id=r.host_id, agent_instance=r.agent_instance, sequence=r.sequence,
                                                 status=ingest_pb2.ACK_STATUS_REJECTED, reason=reason))
                continue
            acks.append(None)
            # No payload: the store serialises only the reports it keeps as a host's latest.
            accepted.append((i, Incoming(r, None, msg.spool_dropped_total)))
        if accepted:
            results = await self.store.apply([inc for _, inc in accepted])
            received = self._clock()  # type: ignore[operator]
            latest: dict[str, pb.HostReport] = {}
            for (i, inc), res in zip(accepted, results):
                r = inc.report
                if res.status == ingest_pb2.ACK_STATUS_APPLIED:
                    self.counters.reports_applied_total += 1
                    if res.became_latest:
                        latest[r.host_id] = r  # a later one of the same host in this message supersedes it
                else:
                    self.counters.reports_duplicate_total += 1
                acks[i] = ingest_pb2.ReportAck(host_id=r.host_id, agent_instance=r.agent_instance, sequence=r.sequence,
                                               status=res.status)  # type: ignore[arg-type]
            # Summarised once per host per message: a replayed backlog of 50 costs one summary, not 50.
            for r in latest.values():
                self.fleet.put(summarise(r, received))
        return ingest_pb2.ServerMessage(acks=[a for a in acks if a is not None])
