"""The hub's gRPC service: Publish and PublishStream (admission, then the writer's ack), and the
consumers' Subscribe, Query, ListAgents and GetStatus. The parts it uses are built and run by `Hub`."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

import grpc

from amoskys import __version__
from amoskys.config import EventBusConfig
from amoskys.eventbus.acks import Ack
from amoskys.eventbus.admission import Admission
from amoskys.eventbus.auth import Peer, TrustState, peer_of
from amoskys.eventbus.broker import OVERFLOW, Broker, Outgoing, Subscriber
from amoskys.eventbus.edge import filter_refusal
from amoskys.eventbus.ingest import Ingest
from amoskys.eventbus.metrics import BusMetrics
from amoskys.eventbus.store import Store, StoreReads
from amoskys.eventbus.streams import OpenStreams, StreamHandle
from amoskys.v1 import bus_pb2, envelope_pb2

__all__ = ["SERVICE_NAME", "BusService"]

SERVICE_NAME = "amoskys.v1.EventBus"
Context = grpc.aio.ServicerContext[Any, Any]
MAX_PAGE = 1000
REPLAY_PAGE = 1000


@dataclass(eq=False)
class BusService:
    """The RPC handlers, over the parts of the hub they use."""

    config: EventBusConfig
    metrics: BusMetrics
    trust: TrustState
    store: Store
    broker: Broker
    ingest: Ingest
    admission: Admission
    streams: OpenStreams
    reads: StoreReads
    started_ns: int = field(default_factory=time.time_ns)
    _rate_window: list[tuple[float, int]] = field(default_factory=list)  # (when, events stored) over a minute

    # ---- ingest -------------------------------------------------------------------------------

    async def handle_envelope(self, raw: bytes, peer: Peer | None) -> Ack:
        """Checks in order of cost, then the group commit; every outcome is an ack."""
        return await self._finish(time.perf_counter(), self._begin(raw, peer))

    def _begin(self, raw: bytes, peer: Peer | None) -> Ack | asyncio.Future[Any]:
        """The synchronous part: an immediate ack, or a future of it (the checks queued in turn, then the commit)."""
        self.metrics.envelopes_received.inc()
        outcome = self.admission.check(raw, peer)
        if isinstance(outcome, Ack):
            self.metrics.count_answer(outcome)
        return outcome

    async def _finish(self, started: float, outcome: Ack | asyncio.Future[Any]) -> Ack:
        ack = outcome
        while isinstance(ack, asyncio.Future):
            ack = await ack
        if ack is not outcome:
            self.metrics.count_answer(ack)
            self.metrics.ack_latency.observe(time.perf_counter() - started)
        if ack.hold_s:
            await asyncio.sleep(ack.hold_s)
        return ack

    async def publish(self, raw: bytes, context: Context) -> envelope_pb2.PublishAck:
        return (await self.handle_envelope(raw, peer_of(context))).message()

    async def publish_stream(self, requests: AsyncIterator[bytes], context: Context) -> AsyncIterator[bytes]:
        """Acks in order; the next envelope is checked while earlier ones wait for their commit.

        A stream counts against its identity's cap, ends when no envelope came for `stream_idle_s`, and
        ends at once when a reload revokes its identity.
        """
        peer = peer_of(context)
        handle = await self._open_stream(peer, context)
        pending: asyncio.Queue[tuple[float, Ack | asyncio.Future[Any]] | None] = asyncio.Queue(maxsize=64)
        idle_s = self.config.limits.stream_idle_s
        idle = _IdleTimer(
            idle_s, lambda: handle.end(f"idle: no envelope for {idle_s:g} s", grpc.StatusCode.UNAVAILABLE)
        )

        async def read() -> None:
            try:
                async for raw in requests:
                    idle.waiting_since = None
                    await pending.put((time.perf_counter(), self._begin(raw, peer)))
                    idle.waiting_since = idle.loop.time()
            finally:
                await pending.put(None)

        reader = asyncio.ensure_future(read())
        handle.wake = reader.cancel
        self.metrics.count_stream(+1)
        try:
            while (item := await pending.get()) is not None:
                yield (await self._finish(*item)).message().SerializeToString()
            await asyncio.gather(reader, return_exceptions=True)
            if handle.reason:
                await context.abort(handle.code, handle.reason)
        finally:
            idle.cancel()
            self.metrics.count_stream(-1)
            self.streams.close(handle)
            reader.cancel()

    async def _open_stream(self, peer: Peer | None, context: Context) -> StreamHandle:
        """The stream's handle; aborts when the identity already has its share of streams open."""
        handle = self.streams.open(peer) if peer is not None else None
        if handle is None:
            cap = self.config.limits.max_streams_per_identity
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"streams: at most {cap} per identity")
        assert handle is not None
        return handle

    # ---- consumers ----------------------------------------------------------------------------

    async def _require_consumer(self, context: Context, flt: bus_pb2.EventFilter | None = None) -> None:
        """Only configured consumers, and only filters within the documented limits."""
        peer = peer_of(context)
        refusal = self.trust.refusal(peer, time.time_ns())
        if refusal is not None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, refusal)
        assert peer is not None
        if peer.cn not in self.config.consumers:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{peer.cn!r} is not a configured consumer")
        refusal = filter_refusal(flt) if flt is not None else None
        if refusal is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, refusal)

    async def query(self, request: bus_pb2.QueryRequest, context: Context) -> bus_pb2.QueryResponse:
        await self._require_consumer(context, request.filter)
        size = min(request.page_size or 100, MAX_PAGE)
        try:
            events, token = await self.reads.run(self.store.query, request.filter, size, request.page_token)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return bus_pb2.QueryResponse(events=events, next_page_token=token)

    async def subscribe(self, request: bus_pb2.SubscribeRequest, context: Context) -> None:
        """Replay, then live events; a consumer that does not read is cut with its resume cursor."""
        await self._require_consumer(context, request.filter)
        handle = await self._open_stream(peer_of(context), context)
        sub = Subscriber(request.filter)
        handle.wake = functools.partial(_wake, sub)
        self.broker.subscribers.add(sub)
        self.metrics.subscribers.inc()
        sent = _Sent()
        try:
            if request.replay or request.after_cursor:
                async for stored in self._replay(request):
                    await self._send(context, Outgoing.of(stored), sent, sub, handle)
            while True:
                outgoing = await sub.queue.get()
                if handle.reason:
                    await context.abort(handle.code, handle.reason)
                if outgoing is OVERFLOW:
                    await self._cut(context, sent, sub, handle)
                if outgoing.cursor > sent.cursor:
                    await self._send(context, outgoing, sent, sub, handle)
        finally:
            self._leave(sub, handle)

    async def _send(
        self, context: Context, outgoing: Outgoing, sent: _Sent, sub: Subscriber, handle: StreamHandle
    ) -> None:
        """One write, within `write_timeout_s`: a consumer that stops reading is cut, never waited for."""
        if handle.reason:
            await context.abort(handle.code, handle.reason)
        try:
            await asyncio.wait_for(context.write(outgoing.raw), self.config.limits.write_timeout_s)
        except TimeoutError:
            await self._cut(context, sent, sub, handle)
        sent.cursor = outgoing.cursor

    async def _cut(self, context: Context, sent: _Sent, sub: Subscriber, handle: StreamHandle) -> NoReturn:
        """End a subscriber that fell behind; it resumes from the last cursor it was sent. Its place is
        given up first: the status may wait behind data that a consumer which stopped reading never takes."""
        self.metrics.subscribers_cut.inc()
        self._leave(sub, handle)
        await context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED, f"subscriber too slow; resume with after_cursor={sent.cursor}"
        )

    def _leave(self, sub: Subscriber, handle: StreamHandle) -> None:
        """Once per subscriber: out of the fan-out, the gauge and its identity's stream count."""
        if sub in self.broker.subscribers:
            self.broker.subscribers.discard(sub)
            self.metrics.subscribers.dec()
            self.streams.close(handle)

    async def _replay(self, request: bus_pb2.SubscribeRequest) -> AsyncIterator[bus_pb2.StoredEvent]:
        cursor = request.after_cursor
        if not cursor and request.filter.since_ns:
            cursor = await self.reads.run(self.store.first_cursor_since, request.filter.since_ns)
        while True:
            page = await self.reads.run(self.store.after_cursor, cursor, request.filter, REPLAY_PAGE)
            for stored in page:
                yield stored
            if len(page) < REPLAY_PAGE:
                return
            cursor = page[-1].cursor

    async def list_agents(self, request: bus_pb2.ListAgentsRequest, context: Context) -> bus_pb2.ListAgentsResponse:
        await self._require_consumer(context)
        return bus_pb2.ListAgentsResponse(agents=await self.reads.run(self.store.list_agents))

    async def get_status(self, request: bus_pb2.StatusRequest, context: Context) -> bus_pb2.HubStatus:
        await self._require_consumer(context)
        return await self.reads.run(self.status)

    def status(self) -> bus_pb2.HubStatus:
        totals = self.metrics.totals
        return bus_pb2.HubStatus(
            version=__version__,
            started_ns=self.started_ns,
            events_stored=self.store.count_events(),
            store_bytes=self.store.size_bytes(),
            agents=len(self.store.list_agents()),
            streams=totals.streams,
            inflight=self.ingest.pending_events,
            rejected=dict(totals.rejected),
            retries=totals.retries,
            chain_breaks=totals.chain_breaks,
            ingest_eps=self._ingest_rate(totals.events_stored),
        )

    def _ingest_rate(self, stored: int) -> float:
        now = time.monotonic()
        self._rate_window = [(t, v) for t, v in self._rate_window if now - t <= 60] + [(now, stored)]
        (t0, v0), (t1, v1) = self._rate_window[0], self._rate_window[-1]
        return (v1 - v0) / (t1 - t0) if t1 > t0 else 0.0

    def handlers(self) -> grpc.GenericRpcHandler:
        ser = lambda message: message.SerializeToString()  # noqa: E731
        handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
            "Publish": grpc.unary_unary_rpc_method_handler(self.publish, response_serializer=ser),
            "PublishStream": grpc.stream_stream_rpc_method_handler(self.publish_stream),
            "Subscribe": grpc.unary_stream_rpc_method_handler(  # writes `Outgoing.raw`: serialized once per event
                self.subscribe, bus_pb2.SubscribeRequest.FromString
            ),
            "Query": grpc.unary_unary_rpc_method_handler(self.query, bus_pb2.QueryRequest.FromString, ser),
            "ListAgents": grpc.unary_unary_rpc_method_handler(
                self.list_agents, bus_pb2.ListAgentsRequest.FromString, ser
            ),
            "GetStatus": grpc.unary_unary_rpc_method_handler(self.get_status, bus_pb2.StatusRequest.FromString, ser),
        }
        return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


@dataclass(slots=True)
class _Sent:
    cursor: int = 0  # the last cursor a subscriber was sent: where it resumes


def _wake(sub: Subscriber) -> None:
    """Get a subscriber's handler to look at its stream's handle (it is waiting on its queue)."""
    if not sub.queue.full():
        sub.queue.put_nowait(OVERFLOW)


class _IdleTimer:
    """Calls `on_idle` once the stream's reader has waited `idle_s` for a message: one timer per stream,
    re-armed when it fires (`asyncio.wait_for` around each read cost a task, a future and a timer per envelope)."""

    def __init__(self, idle_s: float, on_idle: Callable[[], object]) -> None:
        self.loop = asyncio.get_running_loop()
        self.idle_s, self.on_idle = idle_s, on_idle
        self.waiting_since: float | None = self.loop.time()  # None while a message is being handled
        self._timer = self.loop.call_later(idle_s, self._check)

    def _check(self) -> None:
        since = self.waiting_since
        remaining = self.idle_s if since is None else since + self.idle_s - self.loop.time()
        if remaining > 0:
            self._timer = self.loop.call_later(remaining, self._check)
        else:
            self.on_idle()

    def cancel(self) -> None:
        self._timer.cancel()
