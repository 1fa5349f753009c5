"""Sends sealed envelopes over PublishStream, in order, a window at a time, and acts on every ack.

OK forgets the envelope; RETRY waits the hub's backoff (jittered) and resends from the first
unacknowledged envelope on a new stream; INVALID dead-letters that envelope and restarts the
chain; a broken connection reconnects with jittered exponential backoff and resends whatever
is unacknowledged (the hub acks exact resends without storing them twice).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
from collections.abc import Callable
from typing import Any

import grpc

from amoskys.agents.metrics import AgentMetrics
from amoskys.agents.outbox import Outbox, SealedEnvelope
from amoskys.client import hub_channel
from amoskys.config import AgentConfig
from amoskys.v1 import envelope_pb2

__all__ = ["Backoff", "Publisher", "wait_event"]

log = logging.getLogger(__name__)
Status = envelope_pb2.PublishAck.Status
METHOD = "/amoskys.v1.EventBus/PublishStream"


async def wait_event(event: asyncio.Event, timeout: float) -> None:
    """Wait until `event` is set or `timeout` passes (unlike wait_for on 3.11, never swallows a cancel)."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter}, timeout=timeout)
    finally:
        waiter.cancel()


class Backoff:
    """Exponential with full jitter: sleep a random time in [0, min(cap, base * 2^n)]."""

    def __init__(self, base_s: float = 0.5, cap_s: float = 30.0) -> None:
        self.base_s, self.cap_s, self.attempt = base_s, cap_s, 0

    def next(self) -> float:
        delay = random.uniform(0, min(self.cap_s, self.base_s * 2**self.attempt))  # noqa: S311 - jitter
        self.attempt = min(self.attempt + 1, 16)
        return delay

    def reset(self) -> None:
        self.attempt = 0


def hinted(backoff_ms: int) -> float:
    """The hub's backoff hint with ±50 % jitter, so agents do not return in step."""
    return backoff_ms / 1000 * random.uniform(0.5, 1.5)  # noqa: S311 - jitter


class Publisher:
    def __init__(
        self, outbox: Outbox, config: AgentConfig, metrics: AgentMetrics, wake: asyncio.Event,
        on_acked: Callable[[], None] | None = None,
    ) -> None:  # fmt: skip
        self.outbox = outbox
        self.config = config
        self.metrics = metrics
        self.wake = wake
        self.on_acked = on_acked
        self.backoff = Backoff()
        self.connected = False

    async def run(self) -> None:
        """Publish forever: one stream per session, reconnecting as needed."""
        while True:
            try:
                async with hub_channel(self.config.hub, self.config.tls, self.config.hub_server_name) as channel:
                    call: Any = channel.stream_stream(METHOD, None, envelope_pb2.PublishAck.FromString)()
                    pause = await self._session(call)
            except grpc.aio.AioRpcError as exc:
                self._set_connected(False)
                self.metrics.publish_errors.labels(exc.code().name).inc()
                pause = self.backoff.next()
                log.warning("hub unreachable; retrying", extra={"code": exc.code().name, "retry_in_s": round(pause, 2)})
            await asyncio.sleep(pause)

    def _set_connected(self, value: bool) -> None:
        self.connected = value
        self.metrics.connected.set(1 if value else 0)

    async def _session(self, call: Any) -> float:
        """Send and track acks until something needs a new stream; return the pause before it."""
        inflight: collections.deque[tuple[SealedEnvelope, float]] = collections.deque()
        last_sent = 0
        try:
            while True:
                last_sent = await self._fill(call, inflight, last_sent)
                if not inflight:
                    self.wake.clear()
                    await wait_event(self.wake, 1.0)
                    continue
                ack = await call.read()
                if ack is grpc.aio.EOF:
                    return self.backoff.next()
                self._set_connected(True)
                sent, started = inflight.popleft()
                pause = self._on_ack(sent, ack, time.perf_counter() - started)
                if pause is not None:
                    return pause
        finally:
            call.cancel()

    async def _fill(self, call: Any, inflight: collections.deque[tuple[SealedEnvelope, float]], last: int) -> int:
        room = self.config.batch.max_inflight - len(inflight)
        if room <= 0:
            return last
        for envelope in self.outbox.unacked(after_seq=last, limit=room):
            await call.write(envelope.raw)
            inflight.append((envelope, time.perf_counter()))
            last = envelope.seq
        return last

    def _on_ack(self, sent: SealedEnvelope, ack: envelope_pb2.PublishAck, latency: float) -> float | None:
        """Apply one ack; None to go on, else the pause before a new stream."""
        if ack.status == Status.OK:
            self.backoff.reset()
            self.metrics.events_acked.inc(self.outbox.ack(sent.seq))
            self.metrics.ack_latency.observe(latency)
            if self.on_acked is not None:
                self.on_acked()
            return None
        reason = ack.reason.split(":")[0] or "unknown"
        if ack.status == Status.RETRY:
            self.metrics.retries.labels(reason).inc()
            if reason == "chain_unknown":
                log.warning("the hub does not know this chain; starting a new one")
                self.outbox.restart_chain()
            return hinted(ack.backoff_ms or 500)
        if ack.status == Status.INVALID:
            log.error("hub refused an envelope; dead-lettered", extra={"seq": sent.seq, "reason": ack.reason})
            self.metrics.dead_letters.inc()
            self.outbox.dead_letter(sent.seq, ack.reason)
            return 0.0
        log.error("hub refused this agent", extra={"status": Status.Name(ack.status), "reason": ack.reason})
        self.metrics.publish_errors.labels(Status.Name(ack.status)).inc()
        return self.backoff.next() + 5.0
