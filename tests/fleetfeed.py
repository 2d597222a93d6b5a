"""Feeding a real aggregator with simulated hosts over gRPC (tests and benchmarks)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import grpc

from eptwatch.server.simulate import SimHost, SimulatedFleet
from eptwatch.v1 import ingest_pb2, ingest_pb2_grpc


async def _feed(target: str, reports: list, batch: int) -> int:  # type: ignore[type-arg]
    applied = 0
    async with grpc.aio.insecure_channel(target) as ch:
        call = ingest_pb2_grpc.IngestStub(ch).Stream(timeout=60)
        for i in range(0, len(reports), batch):
            await call.write(ingest_pb2.AgentMessage(reports=reports[i: i + batch]))
            reply = await call.read()
            applied += sum(1 for a in reply.acks if a.status == ingest_pb2.ACK_STATUS_APPLIED)
        await call.done_writing()
    return applied


def feed(target: str, fleet: SimulatedFleet, hosts: Sequence[SimHost], now: float | None = None, batch: int = 50) -> int:
    now = time.time() if now is None else now
    reports = [fleet.report(h, now) for h in hosts]
    return asyncio.run(_feed(target, reports, batch))
