"""Hostile load around a hub: identities that flood and ignore RETRY, consumers that never read.

Used by the suite (a well-behaved agent must get OK on every publish meanwhile) and by
benchmarks/hub_fairness.py (its ack latency, measured).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from types import TracebackType

import grpc

from amoskys.v1 import bus_pb2, envelope_pb2
from tests.hostile.client import Chain, HostileAgent, publish_on, subscribe
from tests.hostile.hub import HubProcess

__all__ = ["Pressure"]

EVENTS_PER_ENVELOPE = 1000


def _flood_envelopes(agent: HostileAgent, count: int) -> list[bytes]:
    """New content each: every envelope starts a chain of its own (seq 1); sent again, they are duplicates."""
    envelopes = []
    for _ in range(count):
        agent.chain = Chain()
        envelopes.append(agent.seal(agent.events(EVENTS_PER_ENVELOPE, "flood")).SerializeToString())
    return envelopes


class Pressure:
    """`async with Pressure(hub, flooders, stalled_consumers)`: the load runs inside the block.

    Each flooder has `senders` publishes in flight at once, cycling through `pool` envelopes of 1000
    events. `answers` counts the floods' acks by status name (and gRPC errors by code).
    """

    def __init__(
        self, hub: HubProcess, flooders: list[HostileAgent], stalled: list[str], senders: int = 6, pool: int = 40
    ) -> None:
        self.hub, self.flooders, self.stalled = hub, flooders, stalled
        self.senders, self.pool = senders, pool
        self.answers: collections.Counter[str] = collections.Counter()
        self.stalls_cut = 0
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Pressure:
        pools = [await asyncio.to_thread(_flood_envelopes, agent, self.pool) for agent in self.flooders]
        self._tasks = [asyncio.create_task(self._stall(cn)) for cn in self.stalled]
        self._tasks += [
            asyncio.create_task(self._flood(agent, pool, k))
            for agent, pool in zip(self.flooders, pools, strict=True)
            for k in range(self.senders)
        ]
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def until_held_back(self, timeout: float = 60) -> None:
        """Wait until the hub answers the floods RETRY (their backlog reached its limits)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while not self.answers["RETRY"]:
            assert asyncio.get_running_loop().time() < deadline, f"the floods were never held back: {self.answers}"
            await asyncio.sleep(0.05)

    async def _flood(self, agent: HostileAgent, pool: list[bytes], offset: int) -> None:
        """Send, never wait: RETRY and its backoff are ignored."""
        async with agent.tls.channel(self.hub.address) as channel:
            n = offset
            while not self._stop.is_set():
                try:
                    ack = await publish_on(channel, pool[n % len(pool)], timeout=30)
                    self.answers[envelope_pb2.PublishAck.Status.Name(ack.status)] += 1
                except grpc.aio.AioRpcError as exc:
                    self.answers[exc.code().name] += 1
                n += self.senders

    async def _stall(self, cn: str) -> None:
        """Subscribe and never read; subscribe again whenever the hub cuts the stream."""
        tls = self.hub.credentials(cn)
        async with tls.channel(self.hub.address) as channel:
            while not self._stop.is_set():
                call = subscribe(channel, bus_pb2.SubscribeRequest())
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await call.code()  # the end of the call, without reading a message
                self.stalls_cut += 1
                await asyncio.sleep(0.1)
