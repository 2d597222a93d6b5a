"""Which hosts a live stream carries, so a host counts only on the replica that holds it.

A thin wrapper over the ingest servicer: it taps the request stream for host ids and tells the fleet
state when the stream ends, and whether the agent said it was departing (rotating to another replica
or stopping: its hosts leave at once) or the stream just ended or broke (the agent is probably coming
back: its hosts stay until they go stale).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from eptwatch.v1 import ingest_pb2

from .ingest import IngestServicer


class TrackingIngestServicer(IngestServicer):
    async def Stream(self, request_iterator: AsyncIterator[ingest_pb2.AgentMessage],  # noqa: N802 - gRPC naming
                     context: grpc.aio.ServicerContext) -> AsyncIterator[ingest_pb2.ServerMessage]:
        carried: set[str] = set()
        departing = False

        async def tap() -> AsyncIterator[ingest_pb2.AgentMessage]:
            nonlocal departing
            async for msg in request_iterator:
                for r in msg.reports:
                    if r.host_id and r.host_id not in carried:
                        carried.add(r.host_id)
                        self.fleet.stream_carries(r.host_id)
                departing = departing or msg.departing
                yield msg

        try:
            async for out in super().Stream(tap(), context):
                yield out
        finally:
            self.fleet.stream_ended(carried, clean=departing)
