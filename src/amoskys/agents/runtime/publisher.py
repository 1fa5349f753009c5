"""Sends sealed envelopes over PublishStream, in order, a window at a time, and acts on every ack.

OK forgets the envelope; RETRY waits the hub's backoff (jittered) and resends from the first
unacknowledged envelope on a new stream; INVALID dead-letters that envelope and restarts the
chain; a broken connection reconnects with jittered exponential backoff and resends whatever
is unacknowledged (the hub acks exact resends without storing them twice).

A hub that stops answering (a silent partition) is noticed within 30 s: HTTP/2 pings every
KEEPALIVE_S while the connection lives, and TCP_USER_TIMEOUT on its socket, so the kernel gives up
on a ping left unacknowledged for TCP_USER_TIMEOUT_S; the stream then fails, `connected` turns 0
and the publisher reconnects. (grpclib's own ping timeout only starts a TLS shutdown, which waits
30 s more for the silent peer.)

Agents speak gRPC through grpclib (pure Python, on the standard `ssl` module) rather than grpcio:
an agent needs one client stream, and grpcio's core costs ~23 MB of resident memory in every
agent process. The hub, the UI and the CLI keep grpcio.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import ipaddress
import logging
import random
import socket
import sys
import time
import zlib
from collections.abc import Callable
from typing import Any, Protocol

from grpclib.client import Channel, Stream
from grpclib.config import Configuration
from grpclib.const import Cardinality
from grpclib.encoding.base import CodecBase
from grpclib.exceptions import GRPCError, StreamTerminatedError

from amoskys.agents.runtime.identity import client_tls_context
from amoskys.agents.runtime.metrics import AgentMetrics
from amoskys.agents.runtime.outbox import OutboxError, SealedEnvelope
from amoskys.config import AgentConfig, TlsConfig, parse_address
from amoskys.envelope import ChainState, reason_label
from amoskys.v1 import envelope_pb2

__all__ = ["Backoff", "Publisher", "SealedQueue", "agent_channel", "wait_event"]

log = logging.getLogger(__name__)
Status = envelope_pb2.PublishAck.Status
Reason = envelope_pb2.PublishAck.Reason
METHOD = "/amoskys.v1.EventBus/PublishStream"
PublishStream = Stream[bytes, envelope_pb2.PublishAck]
Inflight = collections.deque[tuple[SealedEnvelope, float]]
Acks = asyncio.Future[envelope_pb2.PublishAck | None]
# The hub admits pings 10 s apart (grpc.http2.min_ping_interval_without_data_ms): a little more here.
KEEPALIVE_S = 12.0
KEEPALIVE_TIMEOUT_S = 5.0
TCP_USER_TIMEOUT_S = 10


class SealedCodec(CodecBase):
    """Envelopes leave the outbox already serialized (and signed): send the bytes as they are."""

    __content_subtype__ = "proto"

    def encode(self, message: Any, message_type: Any) -> bytes:
        return bytes(message)

    def decode(self, data: bytes, message_type: Any) -> Any:
        return message_type.FromString(data)


def agent_channel(address: str, tls: TlsConfig, server_name: str = "") -> Channel:
    """A channel to the hub; `server_name` overrides the name checked against the hub's certificate."""
    host, port = parse_address(address)
    # grpclib has keepalive settings only as these underscored fields. Without the minimum interval
    # (default 300 s) it would ping once and then stay silent for five minutes.
    config = Configuration(
        _keepalive_time=KEEPALIVE_S, _keepalive_timeout=KEEPALIVE_TIMEOUT_S, _keepalive_permit_without_calls=True,
        _http2_max_pings_without_data=0, _http2_min_sent_ping_interval_without_data=KEEPALIVE_S - 1,
        ssl_target_name_override=server_name or None,
    )  # fmt: skip
    return Channel(host, port, ssl=client_tls_context(tls), codec=SealedCodec(), config=config)


_UNACKED_LIMITS: dict[tuple[str, int], int] = {}  # hub (ip, port) -> TCP_USER_TIMEOUT (ms) of connections to it


def limit_unacked_time(address: str, seconds: int) -> None:
    """Every TCP connection this process opens to `address` from now on gets TCP_USER_TIMEOUT `seconds`.

    grpclib opens its socket inside asyncio and offers no hook; Python's audit hooks (PEP 578) do:
    the `socket.connect` event carries the socket as it connects. One dictionary look-up per
    connection (it used to be a walk of /proc/self/fd per stream: with 2,500 publishers in one
    process, 0.18 s of blocked event loop for every stream that started)."""
    host, port = parse_address(address)
    for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        _UNACKED_LIMITS[(plain_ip(str(info[4][0])), port)] = seconds * 1000
    _install_connect_hook()


@functools.cache
def _install_connect_hook() -> None:
    sys.addaudithook(_on_audit_event)  # once per process: hooks cannot be removed


def _on_audit_event(event: str, args: tuple[Any, ...]) -> None:
    """Runs for every audited operation of the process: returns at once unless a socket connects to a hub.

    It must never raise (that would fail the caller's operation)."""
    if event != "socket.connect":
        return
    try:
        sock, address = args
        limit = _UNACKED_LIMITS.get((plain_ip(str(address[0])), address[1]))
        if limit is not None and sock.type == socket.SOCK_STREAM:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, limit)
    except (OSError, ValueError, TypeError, IndexError):
        pass  # not an inet address (a unix socket's path), or a socket already closed


def plain_ip(text: str) -> str:
    """An address as written by its own family (::ffff:10.0.0.1, a dual-stack socket's view, is 10.0.0.1)."""
    address = ipaddress.ip_address(text)
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return str(mapped or address)


async def wait_event(event: asyncio.Event, timeout: float) -> None:
    """Wait until `event` is set or `timeout` passes (unlike wait_for on 3.11, never swallows a cancel)."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter}, timeout=timeout)
    finally:
        waiter.cancel()


def discard(future: asyncio.Future[Any]) -> None:
    """Cancel `future` if pending, else take its exception (so asyncio does not log it as never retrieved)."""
    if not future.done():
        future.cancel()
    elif not future.cancelled():
        future.exception()


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


class EndSession(Exception):
    """Leave the current stream (it is reset on the way out) and open a new one after `pause` seconds."""

    def __init__(self, pause: float) -> None:
        super().__init__(pause)
        self.pause = pause


def failure_code(exc: BaseException) -> str:
    """A metric label for a failed session: the gRPC status, or UNAVAILABLE for transport errors."""
    if isinstance(exc, GRPCError):
        return exc.status.name
    if isinstance(exc, TimeoutError):
        return "DEADLINE_EXCEEDED"
    return "UNAVAILABLE"


class SealedQueue(Protocol):
    """What the publisher needs of an outbox: the agent's `Outbox`, or the load generator's in-memory one."""

    chain: ChainState

    def unacked(self, after_seq: int = 0, limit: int = 64) -> list[SealedEnvelope]: ...
    def ack(self, seq: int, chain_id: bytes) -> int: ...
    def restart_chain(self) -> None: ...
    def dead_letter(self, seq: int, reason: str) -> None: ...


class Publisher:
    def __init__(
        self, outbox: SealedQueue, config: AgentConfig, metrics: AgentMetrics, wake: asyncio.Event,
        on_acked: Callable[[], None] | None = None, on_idle: Callable[[], None] | None = None,
    ) -> None:  # fmt: skip
        self.outbox = outbox
        self.config = config
        self.metrics = metrics
        self.wake = wake
        self.on_acked = on_acked
        self.on_idle = on_idle  # called when the publisher becomes idle (see `idle`)
        self.backoff = Backoff()
        self.hubs = config.hubs()
        self.hub = self.hubs[zlib.crc32(config.agent_id.encode()) % len(self.hubs)]  # agents spread over hubs
        self.connected = False
        self._inflight: Inflight | None = None  # the open stream's window; None between streams
        self._stream_chain = b""  # the chain of what this stream has sent
        self._stopping = False  # see `stop`

    @property
    def idle(self) -> bool:
        """A stream is open and nothing is in flight: an envelope sealed now would go out at once."""
        return self._inflight is not None and not self._inflight

    @property
    def streaming(self) -> bool:
        """A stream to the hub is open: what is sealed now can be sent."""
        return self._inflight is not None

    def stop(self) -> None:
        """Say that the task running `run` is being cancelled: then cancel it. A cancel alone can be lost:
        grpclib turns the CancelledError of a task inside a stream whose connection is lost at that
        moment into StreamTerminatedError, which `run` would take for a broken connection and retry
        (simulated agents kept reconnecting minutes after the load generator cancelled them)."""
        self._stopping = True

    async def run(self) -> None:
        """Publish until stopped: one stream per session, reconnecting as needed."""
        while not self._stopping:
            try:
                limit_unacked_time(self.hub, TCP_USER_TIMEOUT_S)  # its connection's socket, as it connects
                async with agent_channel(self.hub, self.config.tls, self.config.hub_server_name) as channel:
                    request = channel.request(METHOD, Cardinality.STREAM_STREAM, bytes, envelope_pb2.PublishAck)
                    async with request as stream:  # leaving it with an exception resets the stream
                        await self._session(stream)
            except EndSession as end:
                pause = end.pause
            except (GRPCError, StreamTerminatedError, OSError) as exc:  # OSError includes TimeoutError
                self._set_connected(False)
                if self._stopping:
                    return  # the cancel `stop` announced, turned into a stream error (see `stop`)
                code = failure_code(exc)
                self.metrics.publish_errors.labels(code).inc()
                pause = self.backoff.next()
                lost, self.hub = self.hub, self._next_hub()
                log.warning(
                    "hub unreachable; retrying",
                    extra={"code": code, "hub": lost, "next_hub": self.hub, "retry_in_s": round(pause, 2)},
                )
            except OutboxError as exc:  # e.g. an ack not recorded: what is unacked is sent again
                self.metrics.publish_errors.labels("OUTBOX").inc()
                pause = self.backoff.next()
                log.error("outbox unwritable; retrying", extra={"error": str(exc), "retry_in_s": round(pause, 2)})
            await asyncio.sleep(pause)

    def _next_hub(self) -> str:
        """Fail over: the hub after the current one (the chain goes on there: the hubs share it)."""
        return self.hubs[(self.hubs.index(self.hub) + 1) % len(self.hubs)]

    def _set_connected(self, value: bool) -> None:
        self.connected = value
        self.metrics.connected.set(1 if value else 0)

    async def _session(self, stream: PublishStream) -> None:
        """Send and track acks until something needs a new stream (raises EndSession with the pause)."""
        inflight: Inflight = collections.deque()
        last_sent = 0
        await stream.send_request()
        self._inflight = inflight
        self._became_idle()
        acks: Acks = asyncio.ensure_future(stream.recv_message())  # always pending: a broken stream fails it
        try:
            while True:
                last_sent = await self._fill(stream, inflight, last_sent)
                if not inflight:
                    await self._idle(acks)
                    if not acks.done():
                        continue
                ack = await acks
                if ack is None:  # the hub ended the stream: its status says why
                    await stream.recv_trailing_metadata()
                    raise EndSession(self.backoff.next())
                acks = asyncio.ensure_future(stream.recv_message())
                self._on_ack_received(inflight, ack)
        finally:
            self._inflight = None
            discard(acks)

    async def _idle(self, acks: Acks) -> None:
        """Nothing in flight: wait (1 s at most) for an envelope to send, or for the stream to end or break."""
        self.wake.clear()
        woken = asyncio.ensure_future(self.wake.wait())
        pending: set[asyncio.Future[Any]] = {acks, woken}
        try:
            await asyncio.wait(pending, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
        finally:
            woken.cancel()

    def _on_ack_received(self, inflight: Inflight, ack: envelope_pb2.PublishAck) -> None:
        """Apply the ack to the oldest envelope in flight (raises EndSession when a new stream is needed)."""
        if not inflight:
            raise EndSession(self.backoff.next())  # an ack for nothing sent: start over on a new stream
        self._set_connected(True)
        sent, started = inflight.popleft()
        pause = self._on_ack(sent, ack, time.perf_counter() - started)
        if pause is not None:
            raise EndSession(pause)
        if not inflight:
            self._became_idle()

    def _became_idle(self) -> None:
        if self.on_idle is not None:
            self.on_idle()

    async def _fill(self, stream: PublishStream, inflight: Inflight, last: int) -> int:
        room = self.config.batch.max_inflight - len(inflight)
        if room <= 0:
            return last
        envelopes = self.outbox.unacked(after_seq=last, limit=room)  # re-sealed first if the bound dropped some
        if last and self.outbox.chain.chain_id != self._stream_chain:
            raise EndSession(0.0)  # a new chain: everything unacked goes again from its seq 1
        self._stream_chain = self.outbox.chain.chain_id
        for envelope in envelopes:
            await stream.send_message(envelope.raw)
            inflight.append((envelope, time.perf_counter()))
            last = envelope.seq
        return last

    def _on_ack(self, sent: SealedEnvelope, ack: envelope_pb2.PublishAck, latency: float) -> float | None:
        """Apply one ack; None to go on, else the pause before a new stream."""
        if sent.chain_id != self.outbox.chain.chain_id:  # the outbox restarted the chain (drop, dead letter)
            log.warning("the outbox re-sealed its envelopes; resending them", extra={"seq": sent.seq})
            return 0.0
        if ack.status == Status.OK:
            self.backoff.reset()
            self.metrics.events_acked.inc(self.outbox.ack(sent.seq, sent.chain_id))
            self.metrics.ack_latency.observe(latency)
            if self.on_acked is not None:
                self.on_acked()
            return None
        if ack.status == Status.RETRY:
            self.metrics.retries.labels(reason_label(ack.reason_code)).inc()
            if ack.reason_code == Reason.REASON_CHAIN_UNKNOWN:
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
