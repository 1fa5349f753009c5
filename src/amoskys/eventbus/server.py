"""The hub's gRPC service and lifecycle: create_server() builds, Hub.run() serves until SIGTERM."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from prometheus_client import start_http_server

from amoskys import __version__, systemd
from amoskys.config import EventBusConfig, parse_address
from amoskys.errors import AmoskysError
from amoskys.eventbus.acks import Ack
from amoskys.eventbus.admission import Admission
from amoskys.eventbus.auth import Peer, TrustState, peer_of
from amoskys.eventbus.broker import OVERFLOW, Broker, Subscriber
from amoskys.eventbus.edge import filter_refusal
from amoskys.eventbus.ingest import Ingest
from amoskys.eventbus.metrics import BusMetrics, CertificateExpiry
from amoskys.eventbus.store import SqliteStore
from amoskys.eventbus.streams import OpenStreams, StreamHandle
from amoskys.eventbus.turns import Turns
from amoskys.v1 import bus_pb2, envelope_pb2

__all__ = ["SERVICE_NAME", "Hub", "create_server"]

log = logging.getLogger(__name__)
SERVICE_NAME = "amoskys.v1.EventBus"
Context = grpc.aio.ServicerContext[Any, Any]
MAX_PAGE = 1000
LOOP_WATCH_S = 0.05
REPLAY_PAGE = 1000


class Hub:
    """Everything the hub owns: trust, store, ingest, broker, metrics, and the gRPC server."""

    def __init__(self, config: EventBusConfig) -> None:
        self.config = config
        self.metrics = BusMetrics()
        self.trust = TrustState(config)
        self.store = SqliteStore(Path(config.store.path), config.store.synchronous, config.store.text_index)
        self.turns = Turns()
        self.broker = Broker(self.turns)
        self.ingest = Ingest(self.store, config.backpressure, self.metrics, self.broker.publish, self._fatal)
        self.health = health_aio.HealthServicer()
        self.started_ns = time.time_ns()
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self.metrics_port = 0
        self._metrics_server: Any = None
        self._scrape_reader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="metrics-reader")
        self._tasks: list[asyncio.Task[None]] = []
        self._rate_window: list[tuple[float, int]] = []
        self._stop_requested = asyncio.Event()
        self.streams = OpenStreams(config.limits.max_streams_per_identity)
        self.admission = Admission(config, self.trust, self.ingest, self.metrics, self.turns)

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

        async def read() -> None:
            try:
                async for raw in _idle_limited(requests, self.config.limits.stream_idle_s):
                    await pending.put((time.perf_counter(), self._begin(raw, peer)))
            except TimeoutError:
                reason = f"idle: no envelope for {self.config.limits.stream_idle_s:g} s"
                handle.end(reason, grpc.StatusCode.UNAVAILABLE)
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
            events, token = await asyncio.to_thread(self.store.query, request.filter, size, request.page_token)
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
                    await self._send(context, stored, sent, handle)
            while True:
                stored = await sub.queue.get()
                if handle.reason:
                    await context.abort(handle.code, handle.reason)
                if stored is OVERFLOW:
                    await self._cut(context, sent)
                if stored.cursor > sent.cursor:
                    await self._send(context, stored, sent, handle)
        finally:
            self.broker.subscribers.discard(sub)
            self.metrics.subscribers.dec()
            self.streams.close(handle)

    async def _send(self, context: Context, stored: bus_pb2.StoredEvent, sent: _Sent, handle: StreamHandle) -> None:
        """One write, within `write_timeout_s`: a consumer that stops reading is cut, never waited for."""
        if handle.reason:
            await context.abort(handle.code, handle.reason)
        try:
            await asyncio.wait_for(context.write(stored), self.config.limits.write_timeout_s)
        except TimeoutError:
            await self._cut(context, sent)
        sent.cursor = stored.cursor

    async def _cut(self, context: Context, sent: _Sent) -> None:
        """End a subscriber that fell behind; it resumes from the last cursor it was sent."""
        self.metrics.subscribers_cut.inc()
        await context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED, f"subscriber too slow; resume with after_cursor={sent.cursor}"
        )

    async def _replay(self, request: bus_pb2.SubscribeRequest) -> AsyncIterator[bus_pb2.StoredEvent]:
        cursor = request.after_cursor
        if not cursor and request.filter.since_ns:
            cursor = await asyncio.to_thread(self.store.first_cursor_since, request.filter.since_ns)
        while True:
            page = await asyncio.to_thread(self.store.after_cursor, cursor, request.filter, REPLAY_PAGE)
            for stored in page:
                yield stored
            if len(page) < REPLAY_PAGE:
                return
            cursor = page[-1].cursor

    async def list_agents(self, request: bus_pb2.ListAgentsRequest, context: Context) -> bus_pb2.ListAgentsResponse:
        await self._require_consumer(context)
        return bus_pb2.ListAgentsResponse(agents=await asyncio.to_thread(self.store.list_agents))

    async def get_status(self, request: bus_pb2.StatusRequest, context: Context) -> bus_pb2.HubStatus:
        await self._require_consumer(context)
        return await asyncio.to_thread(self.status)

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

    # ---- lifecycle ----------------------------------------------------------------------------

    def _handlers(self) -> grpc.GenericRpcHandler:
        ser = lambda message: message.SerializeToString()  # noqa: E731
        handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
            "Publish": grpc.unary_unary_rpc_method_handler(self.publish, response_serializer=ser),
            "PublishStream": grpc.stream_stream_rpc_method_handler(self.publish_stream),
            "Subscribe": grpc.unary_stream_rpc_method_handler(self.subscribe, bus_pb2.SubscribeRequest.FromString, ser),
            "Query": grpc.unary_unary_rpc_method_handler(self.query, bus_pb2.QueryRequest.FromString, ser),
            "ListAgents": grpc.unary_unary_rpc_method_handler(
                self.list_agents, bus_pb2.ListAgentsRequest.FromString, ser
            ),
            "GetStatus": grpc.unary_unary_rpc_method_handler(self.get_status, bus_pb2.StatusRequest.FromString, ser),
        }
        return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)

    async def start(self) -> None:
        """Bind, start serving, start the writer, metrics and maintenance; READY=1 to systemd."""
        limits = self.config.limits
        options = [
            ("grpc.max_receive_message_length", limits.max_envelope_bytes * 2 + 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.so_reuseport", 0),
            ("grpc.server_handshake_timeout_ms", int(limits.handshake_timeout_s * 1000)),
        ]
        self.server = grpc.aio.server(options=options)
        self.server.add_generic_rpc_handlers((self._handlers(),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_secure_port(self.config.listen, self.trust.server_credentials())
        if not self.port:
            raise AmoskysError(f"cannot listen on {self.config.listen}")
        self.ingest.start(asyncio.get_running_loop())
        await self.server.start()
        self._start_metrics()
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self._tasks = [
            asyncio.create_task(self._maintain(), name="maintenance"),
            asyncio.create_task(self._checkpoints(), name="checkpoints"),
            asyncio.create_task(systemd.watchdog_loop(), name="watchdog"),
            asyncio.create_task(self._watch_loop(), name="loop-watch"),
        ]
        systemd.notify("READY=1", f"STATUS=serving on port {self.port}")
        log.info(
            "eventbus serving",
            extra={"listen": self.config.listen, "port": self.port, "metrics_port": self.metrics_port},
        )

    def _start_metrics(self) -> None:
        if not self.config.metrics.listen:
            return
        host, port = parse_address(self.config.metrics.listen)
        self.metrics.registry.register(CertificateExpiry(self._cert_not_after, self._agents_for_scrape))
        server, _thread = start_http_server(port, addr=host, registry=self.metrics.registry)
        self._metrics_server = server
        self.metrics_port = server.server_port

    def _agents_for_scrape(self) -> list[bus_pb2.AgentInfo]:
        """The registry, read on one thread of its own: every scrape runs on a new thread, and the
        store keeps a reader connection per thread until it closes."""
        return self._scrape_reader.submit(self.store.list_agents).result(timeout=10)

    def _cert_not_after(self) -> float:
        identity = self.trust.identity
        return identity.cert.not_valid_after_utc.timestamp() if identity is not None else 0.0

    async def _maintain(self) -> None:
        """Retention by age and size, and the store-size gauge, every prune_interval_s."""
        store_config = self.config.store
        while True:
            cutoff = time.time_ns() - int(store_config.retention_days * 86400 * 1e9)
            try:
                prune = functools.partial(self.store.prune, cutoff, store_config.max_bytes)
                pruned = await self.ingest.in_writer(prune)
                self.metrics.pruned.inc(pruned)
                self.metrics.store_bytes.set(await asyncio.to_thread(self.store.size_bytes))
            except Exception:
                log.exception("retention pass failed")
            await asyncio.sleep(store_config.prune_interval_s)

    async def _watch_loop(self) -> None:
        """Is the event loop saturated? A timer that fires more than `loop_lag_ms` late says so; admission
        then shares the loop among identities (README, fair admission) for the next second."""
        period, busy_until = LOOP_WATCH_S, 0.0
        limit = self.config.backpressure.loop_lag_ms / 1000
        ticks = 0
        while True:
            started = time.monotonic()
            await asyncio.sleep(period)
            now = time.monotonic()
            if now - started - period > limit:
                busy_until = now + 1.0
            self.admission.loop_busy = now < busy_until
            ticks += 1
            if ticks % int(1 / period) == 0:
                self.admission.share.forget_quiet()

    async def _checkpoints(self) -> None:
        """Keep the WAL short without making any commit (and its acks) wait for a checkpoint."""
        while True:
            await asyncio.sleep(self.config.store.checkpoint_interval_s)
            try:
                await asyncio.to_thread(self.store.checkpoint)
            except Exception:
                log.exception("checkpoint failed")

    def reload(self) -> None:
        """SIGHUP: trust map, revocation list and server cert/key; streams stay up."""
        systemd.reloading()
        try:
            self.trust.reload()
        except AmoskysError as exc:
            log.error("reload failed; keeping the previous trust state", extra={"error": str(exc)})
        ended = self.streams.end_where(self._stream_refusal)
        if ended:
            log.warning("ended streams of identities no longer trusted", extra={"streams": ended})
        systemd.notify("READY=1")

    def _stream_refusal(self, peer: Peer) -> str | None:
        """Why an open stream's identity may no longer speak (revoked, expired, or gone from trust)."""
        refusal = self.trust.refusal(peer, time.time_ns())
        if refusal is None and peer.cn not in self.trust.agents and peer.cn not in self.config.consumers:
            refusal = "identity removed from the trust map"
        return f"peer: {refusal}" if refusal else None

    def _fatal(self, error: BaseException) -> None:
        """A thread the hub depends on died: stop answering SERVING and feeding the watchdog, then exit non-zero."""
        self.admission.draining = True
        for task in self._tasks:
            if task.get_name() == "watchdog":
                task.cancel()
        self._tasks.append(asyncio.create_task(self._not_serving(), name="not-serving"))
        systemd.notify(f"STATUS=failed: {type(error).__name__}")
        self._stop_requested.set()

    async def _not_serving(self) -> None:
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def stop(self) -> None:
        """Drain: refuse new envelopes, finish in-flight ones, commit, close."""
        systemd.notify("STOPPING=1")
        self.admission.draining = True
        await self.health.enter_graceful_shutdown()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        deadline = time.monotonic() + self.config.drain_timeout_s
        while self.ingest.pending_events and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self.server is not None:
            await self.server.stop(grace=1.0)
        await self.turns.stop()
        await asyncio.to_thread(self.ingest.stop)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        self._scrape_reader.shutdown()
        self.store.close()
        log.info("eventbus stopped")

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT (exit status 0) or a fatal failure (1); SIGHUP reloads."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stop_requested.set)
        loop.add_signal_handler(signal.SIGINT, self._stop_requested.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        await self.start()
        await self._stop_requested.wait()
        await self.stop()
        if self.ingest.failure is not None:
            log.critical("eventbus exits after a fatal failure", extra={"error": repr(self.ingest.failure)})
            return 1
        return 0


@dataclass(slots=True)
class _Sent:
    cursor: int = 0  # the last cursor a subscriber was sent: where it resumes


def _wake(sub: Subscriber) -> None:
    """Get a subscriber's handler to look at its stream's handle (it is waiting on its queue)."""
    if not sub.queue.full():
        sub.queue.put_nowait(OVERFLOW)


async def _idle_limited(requests: AsyncIterator[bytes], idle_s: float) -> AsyncIterator[bytes]:
    """The stream's messages; TimeoutError when none came for `idle_s`."""
    iterator = aiter(requests)
    while True:
        try:
            raw = await asyncio.wait_for(anext(iterator), idle_s)
        except StopAsyncIteration:
            return
        yield raw


def create_server(config: EventBusConfig) -> Hub:
    """Build the hub (loads and checks identity, trust and store); `await hub.start()` serves."""
    return Hub(config)
