"""`amoskys indexer`: the JetStream stream into the query store that hubs on `store.backend: jetstream` read.

A durable pull consumer (ack policy "all") hands over batches in stream order; each batch is
committed to SQLite in one transaction together with the stream sequence it reached, and only then
acked. The index advances one stream sequence at a time: a message the consumer does not hand over
in order (delivered to an indexer that was killed, and not yet due again) is read from the stream
directly before anything after it. A redelivered message is at or below the committed sequence and
skipped, and an envelope already indexed (agent, chain, seq) is never stored twice: every envelope
in the stream is in the index exactly once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats.errors
import nats.js.errors
from google.protobuf.message import DecodeError
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from amoskys import systemd
from amoskys.catalog import HUB_AGENT
from amoskys.config import IndexerConfig, parse_address
from amoskys.envelope import GENESIS_HASH, envelope_digest
from amoskys.eventbus.admission import agent_update
from amoskys.eventbus.edge import observed_ns
from amoskys.eventbus.jetstream import HEADER_CERT, HEADER_HOST, HEADER_KIND, connect, ensure_stream, when_ready
from amoskys.eventbus.rows import to_row
from amoskys.eventbus.store import AcceptedEnvelope, ChainRecord, SqliteStore, StoreUnavailableError
from amoskys.v1 import envelope_pb2, events_pb2

__all__ = ["Indexer", "IndexerMetrics"]

log = logging.getLogger(__name__)
FETCH_WAIT_S = 1.0
ACK_WAIT_S = 60.0  # a batch not acked by then is delivered again (and skipped: already committed)
RETRY_PAUSE_S = 1.0


class IndexerMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.envelopes = Counter("amoskys_indexer_envelopes", "Envelopes committed to the index", registry=r)
        self.events = Counter("amoskys_indexer_events", "Events committed to the index", registry=r)
        self.skipped = Counter(
            "amoskys_indexer_skipped", "Messages delivered again and not stored twice, by reason", ["reason"],
            registry=r,
        )  # fmt: skip
        self.chain_gaps = Counter(
            "amoskys_indexer_chain_gaps",
            "Envelopes that do not follow their agent's previous envelope in the stream (never expected)",
            registry=r,
        )
        self.lag_messages = Gauge(
            "amoskys_indexer_lag_messages", "Stream messages not yet indexed (the consumer's pending count)", registry=r
        )
        self.lag_seconds = Gauge(
            "amoskys_indexer_lag_seconds",
            "Age of the newest indexed message while more are pending, else 0",
            registry=r,
        )
        self.position = Gauge("amoskys_indexer_stream_sequence", "The last stream sequence indexed", registry=r)
        self.store_errors = Counter("amoskys_indexer_store_errors", "Failed index commits (retried)", registry=r)


@dataclass(frozen=True, slots=True)
class StreamMessage:
    """One stream message, as the consumer delivered it or as read from the stream by sequence."""

    seq: int
    subject: str
    data: bytes
    headers: dict[str, str]
    received_ns: int  # when the stream stored it

    @classmethod
    def delivered(cls, message: Msg) -> StreamMessage:
        meta = message.metadata
        stamp = int(meta.timestamp.timestamp() * 1e9)
        return cls(meta.sequence.stream, message.subject, message.data, dict(message.headers or {}), stamp)

    @classmethod
    def read(cls, message: api.RawStreamMsg) -> StreamMessage:
        stamp = int(message.time.timestamp() * 1e9) if message.time else time.time_ns()
        return cls(message.seq or 0, message.subject or "", message.data or b"", dict(message.headers or {}), stamp)


@dataclass(slots=True)
class _Batch:
    items: list[AcceptedEnvelope]
    chains: dict[str, ChainRecord]
    last_seq: int


class Indexer:
    def __init__(self, config: IndexerConfig) -> None:
        self.config = config
        store = config.store
        self.store = SqliteStore(Path(store.path), store.synchronous, store.text_index)
        self.metrics = IndexerMetrics()
        self.chains = self.store.load_chains()
        self.position = self.store.stream_position(config.nats.stream)
        self.metrics.position.set(self.position)
        self.metrics_port = 0
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="indexer-writer")
        self._stop = asyncio.Event()
        self._metrics_server: Any = None
        self._js: JetStreamContext | None = None

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> int:
        """Index until SIGTERM/SIGINT (or `request_stop`)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        self._start_metrics()
        nc = await connect(self.config.nats, "amoskys-indexer")
        try:
            sub = await self._subscribe(nc.jetstream(timeout=self.config.nats.request_timeout_s))
            systemd.notify("READY=1", f"STATUS=indexing from stream sequence {self.position}")
            log.info("indexer running", extra={"position": self.position, "metrics_port": self.metrics_port})
            tasks = [asyncio.create_task(self._maintain()), asyncio.create_task(systemd.watchdog_loop())]
            try:
                while not self._stop.is_set():
                    await self._step(sub)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            await nc.close()
            self._close()
        return 0

    async def _subscribe(self, js: JetStreamContext) -> JetStreamContext.PullSubscription:
        """The stream (created if missing) and the durable consumer, ack policy "all"."""
        self._js = js
        await ensure_stream(js, self.config.nats)
        return await when_ready(
            lambda: js.pull_subscribe(
                f"{self.config.nats.subject_prefix}.>",
                durable=self.config.nats.consumer,
                stream=self.config.nats.stream,
                config=api.ConsumerConfig(ack_policy=api.AckPolicy.ALL, ack_wait=ACK_WAIT_S, max_ack_pending=-1),
            )
        )

    async def _step(self, sub: JetStreamContext.PullSubscription) -> None:
        """Fetch, commit, ack one batch (or note that nothing is pending)."""
        try:
            messages: list[Msg] = await sub.fetch(self.config.batch, timeout=FETCH_WAIT_S)
        except TimeoutError:
            messages = []
        except (nats.errors.Error, nats.js.errors.Error) as exc:
            log.warning("fetch failed; retrying", extra={"error": repr(exc)})
            await asyncio.sleep(RETRY_PAUSE_S)
            return
        if not messages:  # nothing pending
            self.metrics.lag_messages.set(0)
            self.metrics.lag_seconds.set(0)
            return
        try:
            complete = await self._in_order([StreamMessage.delivered(m) for m in messages])
        except (nats.errors.Error, nats.js.errors.Error) as exc:
            log.warning("reading skipped messages failed; the batch comes again", extra={"error": repr(exc)})
            await asyncio.sleep(RETRY_PAUSE_S)
            return
        await self._commit(self._batch(complete))
        try:
            await messages[-1].ack_sync(timeout=self.config.nats.request_timeout_s)
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            log.warning("ack failed; the batch comes again and is skipped", extra={"error": repr(exc)})
        last = messages[-1].metadata
        self.metrics.lag_messages.set(last.num_pending)
        self.metrics.lag_seconds.set(max(time.time() - last.timestamp.timestamp(), 0.0) if last.num_pending else 0)

    async def _commit(self, batch: _Batch) -> None:
        """Commit the batch with its stream position; retried until it lands (nothing is acked before)."""
        loop = asyncio.get_running_loop()
        position = (self.config.nats.stream, batch.last_seq)
        while True:
            try:
                commit = self.store.commit
                await loop.run_in_executor(self._writer, commit, batch.items, batch.chains, time.time_ns(), position)
                break
            except StoreUnavailableError as exc:
                self.metrics.store_errors.inc()
                log.error("index commit failed; retrying", extra={"error": str(exc)})
                await asyncio.sleep(RETRY_PAUSE_S)
        self.position = batch.last_seq
        self.chains.update(batch.chains)
        self.metrics.position.set(batch.last_seq)
        self.metrics.envelopes.inc(sum(1 for item in batch.items if item.seq))
        self.metrics.events.inc(sum(len(item.rows) for item in batch.items))

    async def _in_order(self, delivered: list[StreamMessage]) -> list[StreamMessage]:
        """The messages after the committed position without a hole: what the consumer skipped is read
        from the stream (None there: removed by the stream's limits)."""
        assert self._js is not None
        fresh = sorted((m for m in delivered if m.seq > self.position), key=lambda m: m.seq)
        skipped = len(delivered) - len(fresh)
        if skipped:
            self.metrics.skipped.labels("redelivered").inc(skipped)
        complete: list[StreamMessage] = []
        expected = self.position + 1
        for message in fresh:
            if message.seq > expected:
                first = (await self._js.stream_info(self.config.nats.stream)).state.first_seq
                complete += await self._read_range(max(expected, first), message.seq)
            if not complete or message.seq > complete[-1].seq:
                complete.append(message)
            expected = message.seq + 1
        return complete

    async def _read_range(self, first: int, end: int) -> list[StreamMessage]:
        """Messages `first` .. `end - 1` read from the stream by sequence (those that still exist)."""
        assert self._js is not None
        found: list[StreamMessage] = []
        for seq in range(first, end):
            try:
                found.append(StreamMessage.read(await self._js.get_msg(self.config.nats.stream, seq)))
            except nats.js.errors.NotFoundError:
                continue
        if found:
            log.info("read messages the consumer had handed elsewhere", extra={"first": first, "count": len(found)})
            self.metrics.skipped.labels("read_directly").inc(len(found))
        return found

    def _batch(self, messages: list[StreamMessage]) -> _Batch:
        batch = _Batch([], {}, self.position)
        seen: set[tuple[str, bytes, int]] = set()
        prefix = self.config.nats.subject_prefix
        for message in messages:
            batch.last_seq = max(batch.last_seq, message.seq)
            if message.subject.startswith(f"{prefix}.alert."):
                item = self._alert(message)
            else:
                item = self._envelope(message, message.received_ns, batch.chains, seen)
            if item is not None:
                batch.items.append(item)
        return batch

    def _alert(self, message: StreamMessage) -> AcceptedEnvelope | None:
        try:
            event = events_pb2.Event.FromString(message.data)
        except DecodeError:
            self.metrics.skipped.labels("malformed").inc()
            log.error("malformed hub alert in the stream", extra={"subject": message.subject})
            return None
        return AcceptedEnvelope(HUB_AGENT, b"", 0, b"", [to_row(event)])

    def _envelope(
        self,
        message: StreamMessage,
        received_ns: int,
        chains: dict[str, ChainRecord],
        seen: set[tuple[str, bytes, int]],
    ) -> AcceptedEnvelope | None:
        """The index rows of one envelope message; None when it is already indexed or unreadable."""
        try:
            envelope = envelope_pb2.Envelope.FromString(message.data)
            h = envelope_pb2.EnvelopeHeader.FromString(envelope.header)
            batch = events_pb2.EventBatch.FromString(envelope.payload)
        except DecodeError:
            self.metrics.skipped.labels("malformed").inc()
            log.error("malformed envelope in the stream", extra={"subject": message.subject})
            return None
        key = (h.agent_id, h.chain_id, h.seq)
        if key in seen or self.store.indexed_digest(*key) is not None:
            self.metrics.skipped.labels("indexed").inc()
            return None
        seen.add(key)
        digest = envelope_digest(envelope.header, envelope.payload)
        self._check_link(h, chains.get(h.agent_id) or self.chains.get(h.agent_id))
        chains[h.agent_id] = ChainRecord(h.chain_id, h.seq, digest)
        skew_ns = int(self.config.max_clock_skew_s * 1e9)
        rows = [to_row(event) for event in batch.events]
        rows = [row._replace(ts_ns=observed_ns(row.ts_ns, received_ns, skew_ns)) for row in rows]
        headers = message.headers
        update = agent_update(
            batch, rows, headers.get(HEADER_HOST, ""), headers.get(HEADER_KIND, ""), int(headers.get(HEADER_CERT, "0"))
        )
        return AcceptedEnvelope(h.agent_id, h.chain_id, h.seq, digest, rows, update)

    def _check_link(self, h: envelope_pb2.EnvelopeHeader, previous: ChainRecord | None) -> None:
        """Count an envelope that does not follow its agent's previous one (the hubs' decisions exclude it)."""
        if h.seq == 1 and h.prev_hash == GENESIS_HASH:
            return
        if previous is None or previous.chain_id != h.chain_id:
            return  # the chain's start aged out of the stream before this index existed
        if h.seq != previous.last_seq + 1 or h.prev_hash != previous.last_hash:
            self.metrics.chain_gaps.inc()
            log.error("chain gap in the stream", extra={"agent_id": h.agent_id, "seq": h.seq})

    async def _maintain(self) -> None:
        """Retention by age and size, and WAL checkpoints, on the writer thread between commits."""
        store_config = self.config.store
        loop = asyncio.get_running_loop()
        last_prune = 0.0
        while True:
            await asyncio.sleep(store_config.checkpoint_interval_s)
            try:
                await loop.run_in_executor(self._writer, self.store.checkpoint)
                if time.monotonic() - last_prune >= store_config.prune_interval_s:
                    last_prune = time.monotonic()
                    cutoff = time.time_ns() - int(store_config.retention_days * 86400 * 1e9)
                    await loop.run_in_executor(self._writer, self.store.prune, cutoff, store_config.max_bytes)
            except Exception:
                log.exception("index maintenance failed")

    def _start_metrics(self) -> None:
        if not self.config.metrics.listen:
            return
        host, port = parse_address(self.config.metrics.listen)
        server, _thread = start_http_server(port, addr=host, registry=self.metrics.registry)
        self._metrics_server = server
        self.metrics_port = server.server_port

    def _close(self) -> None:
        self._writer.shutdown(wait=True)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        self.store.close()
        log.info("indexer stopped", extra={"position": self.position})
