"""The hub's lifecycle: create_server() builds its parts, Hub.run() serves until SIGTERM (SIGHUP reloads)."""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from prometheus_client import start_http_server

from amoskys import systemd
from amoskys.config import EventBusConfig, parse_address
from amoskys.errors import AmoskysError
from amoskys.eventbus.acks import Ack
from amoskys.eventbus.admission import Admission
from amoskys.eventbus.auth import Peer, TrustState
from amoskys.eventbus.broker import Broker
from amoskys.eventbus.ingest import Ingest
from amoskys.eventbus.metrics import BusMetrics, CertificateExpiry
from amoskys.eventbus.service import REPLAY_PAGE, SERVICE_NAME, BusService
from amoskys.eventbus.store import SqliteStore, Store, StoreReads
from amoskys.eventbus.streams import OpenStreams
from amoskys.eventbus.turns import Turns
from amoskys.v1 import bus_pb2

if TYPE_CHECKING:
    from amoskys.eventbus.jetstream import JetStreamLog

__all__ = ["SERVICE_NAME", "Hub", "create_server"]

log = logging.getLogger(__name__)
LOOP_WATCH_S = 0.05
INDEX_POLL_S = 0.1  # backend jetstream: how often live Subscribe looks for newly indexed events
TURNS_BUSY_SHARE = 0.5  # steps taking more than this share of the loop's time also mean it is saturated


class Hub:
    """Everything the hub owns (trust, store, ingest, broker, metrics), the gRPC server serving `BusService`,
    and the tasks beside it; start, reload on SIGHUP, drain and stop."""

    def __init__(self, config: EventBusConfig) -> None:
        self.config = config
        self.metrics = BusMetrics()
        self.trust = TrustState(config)
        self.turns = Turns()
        self.broker = Broker(self.turns)
        self.stream: JetStreamLog | None = None
        self.store: Store
        self.ingest: Ingest
        if config.store.backend == "jetstream":  # nats is imported only by a hub that uses it
            from amoskys.eventbus.cluster import ClusterIngest, JetStreamStore
            from amoskys.eventbus.jetstream import JetStreamLog

            self.stream = JetStreamLog(config.nats, f"amoskys-hub-{socket.gethostname()}")
            self.store = cluster_store = JetStreamStore(config)
            self.ingest = ClusterIngest(cluster_store, self.stream, config, self.metrics, self._fatal)
        else:
            self.store = SqliteStore(Path(config.store.path), config.store.synchronous, config.store.text_index)
            self.ingest = Ingest(self.store, config.backpressure, self.metrics, self.broker.publish, self._fatal)
        self.health = health_aio.HealthServicer()
        self.reads = StoreReads()
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self.metrics_port = 0
        self._metrics_server: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stop_requested = asyncio.Event()
        self.streams = OpenStreams(config.limits.max_streams_per_identity)
        self.admission = Admission(config, self.trust, self.ingest, self.metrics, self.turns)
        self.service = BusService(
            config,
            self.metrics,
            self.trust,
            self.store,
            self.broker,
            self.ingest,
            self.admission,
            self.streams,
            self.reads,
        )

    async def handle_envelope(self, raw: bytes, peer: Peer | None) -> Ack:
        """One envelope as Publish receives it (for in-process callers: benchmarks, tests)."""
        return await self.service.handle_envelope(raw, peer)

    # ---- lifecycle ----------------------------------------------------------------------------

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
        self.server.add_generic_rpc_handlers((self.service.handlers(),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_secure_port(self.config.listen, self.trust.server_credentials())
        if not self.port:
            raise AmoskysError(f"cannot listen on {self.config.listen}")
        if self.stream is not None:
            await asyncio.to_thread(self.stream.start)
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
        if self.stream is not None:
            self._tasks.append(asyncio.create_task(self._follow_index(), name="follow-index"))
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
        """The registry, read on the store-read pool (every scrape runs on a new thread)."""
        return self.reads.call(self.store.list_agents, timeout_s=10)

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
                self.metrics.store_bytes.set(await self.reads.run(self.store.size_bytes))
            except Exception:
                log.exception("retention pass failed")
            await asyncio.sleep(store_config.prune_interval_s)

    async def _watch_loop(self) -> None:
        """Is the event loop saturated? A timer that fires more than `loop_lag_ms` late says so, and so do
        the checks taken in turn (`Turns`) using more than half its time; admission then shares the loop
        among identities (README, fair admission) for the next second."""
        period, busy_until = LOOP_WATCH_S, 0.0
        limit = self.config.backpressure.loop_lag_ms / 1000
        ticks = 0
        while True:
            started, stepped = time.monotonic(), self.turns.busy_s
            await asyncio.sleep(period)
            now = time.monotonic()
            if now - started - period > limit or self.turns.busy_s - stepped > TURNS_BUSY_SHARE * (now - started):
                busy_until = now + 1.0
            self.admission.loop_busy = now < busy_until
            ticks += 1
            if ticks % int(1 / period) == 0:
                self.admission.share.forget_quiet()

    async def _follow_index(self) -> None:
        """Backend jetstream: live Subscribe from what the indexer commits (polled; README, lag)."""
        from amoskys.eventbus.cluster import JetStreamStore, committed_from_index

        cursor = await self.reads.run(self.store.last_cursor)
        index = self.store.index if isinstance(self.store, JetStreamStore) else None
        assert index is not None
        while True:
            try:
                rows = await self.reads.run(index.rows_after, cursor, REPLAY_PAGE)
            except Exception:
                log.exception("reading the index failed")
                rows = []
            if rows:
                cursor = rows[-1][0]
                self.broker.publish(committed_from_index(rows))
            if len(rows) < REPLAY_PAGE:
                await asyncio.sleep(INDEX_POLL_S)

    async def _checkpoints(self) -> None:
        """Keep the WAL short without making any commit (and its acks) wait for a checkpoint."""
        while True:
            await asyncio.sleep(self.config.store.checkpoint_interval_s)
            try:
                await self.reads.run(self.store.checkpoint)
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
        if self.stream is not None:
            await asyncio.to_thread(self.stream.close)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        await self.reads.finish()  # no read may be under way when the store closes its connections
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


def create_server(config: EventBusConfig) -> Hub:
    """Build the hub (loads and checks identity, trust and store); `await hub.start()` serves."""
    return Hub(config)
