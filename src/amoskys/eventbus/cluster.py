"""The hub in a cluster (`store.backend: jetstream`): envelopes go to JetStream, queries read the index.

`ClusterIngest` keeps the SQLite path's chain decision (`Ingest._decide`) and replaces the commit:
each accepted envelope is appended to the agent's subject with the subject's expected last
sequence and a message id (agent/chain/seq). The agent is acked only after the PubAck (a quorum
of the stream's replicas has it). When another hub appended first, JetStream answers "wrong last
sequence": the head is re-read from the stream and the envelope decided again (duplicate, next,
fork or gap), exactly as if this hub had appended the other envelope itself. Agents are appended
concurrently; one agent's envelopes in order.

`JetStreamStore` is the `Store` such a hub holds: reads come from the index the indexer writes
(the same SQLite schema, read here only), writes never reach it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import nats.errors
import nats.js.errors

from amoskys.config import EventBusConfig
from amoskys.envelope import GENESIS_HASH
from amoskys.eventbus.acks import NO_REASON, STATUS_OK, Ack, Reason, ok, retry
from amoskys.eventbus.ingest import Committed, Ingest, Submission
from amoskys.eventbus.jetstream import Head, JetStreamLog, WrongLastSequenceError
from amoskys.eventbus.metrics import BusMetrics
from amoskys.eventbus.rows import EventRow
from amoskys.eventbus.store import AcceptedEnvelope, ChainRecord, SqliteStore
from amoskys.v1 import bus_pb2, envelope_pb2, events_pb2

__all__ = ["ClusterIngest", "JetStreamStore"]

log = logging.getLogger(__name__)
MAX_RACES = 8  # re-decisions of one envelope after "wrong last sequence" before answering RETRY
NATS_ERRORS = (nats.errors.Error, nats.js.errors.Error, TimeoutError, ConnectionError)


class JetStreamStore:
    """`Store` for a hub on JetStream: the index (read only here) answers queries; the stream holds the log."""

    def __init__(self, config: EventBusConfig) -> None:
        store = config.store
        self.index = SqliteStore(Path(store.path), store.synchronous, store.text_index)

    def load_chains(self) -> dict[str, ChainRecord]:
        return {}  # heads are read from the stream when an agent is first seen

    def stored_digest(self, agent_id: str, chain_id: bytes, seq: int) -> bytes | None:
        return None  # `ClusterIngest` hands the chain decision the stored digests it needs (`_known`)

    def indexed_digest(self, agent_id: str, chain_id: bytes, seq: int) -> bytes | None:
        return self.index.indexed_digest(agent_id, chain_id, seq)

    def chain_of(self, agent_id: str) -> ChainRecord | None:
        return self.index.indexed_chain(agent_id)

    def commit(
        self,
        accepted: Sequence[AcceptedEnvelope],
        chains: dict[str, ChainRecord],
        now_ns: int,
        position: tuple[str, int] | None = None,
    ) -> None:
        raise NotImplementedError("a jetstream hub appends to the stream; the indexer commits")

    def commit_parts(
        self, accepted: Sequence[AcceptedEnvelope], chains: dict[str, ChainRecord], now_ns: int, part_events: int
    ) -> Iterator[None]:
        raise NotImplementedError("a jetstream hub appends to the stream; the indexer commits")

    def query(self, flt: bus_pb2.EventFilter, page_size: int, page_token: str) -> tuple[list[bus_pb2.StoredEvent], str]:
        return self.index.query(flt, page_size, page_token)

    def after_cursor(self, cursor: int, flt: bus_pb2.EventFilter, limit: int) -> list[bus_pb2.StoredEvent]:
        return self.index.after_cursor(cursor, flt, limit)

    def first_cursor_since(self, since_ns: int) -> int:
        return self.index.first_cursor_since(since_ns)

    def last_cursor(self) -> int:
        return self.index.last_cursor()

    def list_agents(self) -> list[bus_pb2.AgentInfo]:
        return self.index.list_agents()

    def count_events(self) -> int:
        return self.index.count_events()

    def size_bytes(self) -> int:
        return self.index.size_bytes()

    def prune(self, older_than_ns: int, max_bytes: int) -> int:
        return 0  # the stream ages out by its limits; the index is pruned by the indexer

    def checkpoint(self) -> None:
        return None  # the indexer's writer checkpoints

    def close(self) -> None:
        self.index.close()


class ClusterIngest(Ingest):
    """Group commit into JetStream: the chain decision of `Ingest`, the append of `JetStreamLog`."""

    def __init__(
        self,
        store: JetStreamStore,
        stream: JetStreamLog,
        config: EventBusConfig,
        metrics: BusMetrics,
        on_fatal: Callable[[BaseException], None] | None = None,
    ) -> None:
        super().__init__(store, config.backpressure, metrics, None, on_fatal)
        self.index = store
        self.stream = stream
        self._head_seq: dict[str, int] = {}  # agent -> stream sequence of its head; lives on the stream's loop
        self._cached: set[str] = set()  # agents whose head was last taken from `_head_seq`, not read from the stream
        self._alerts: list[events_pb2.Event] = []

    def _process(self, group: list[Submission]) -> None:
        started = time.monotonic()
        acks = self.stream.call(self._append_group(group))
        stored = sum(len(sub.rows) for sub, ack in acks if ack.status == STATUS_OK and not ack.reason)
        self.metrics.events_stored.inc(stored)
        self.metrics.commit_batch.observe(stored)
        self._finish_group(group, started, acks, stored)

    async def _append_group(self, group: list[Submission]) -> list[tuple[Submission, Ack]]:
        by_agent: dict[str, list[Submission]] = {}
        for sub in group:
            by_agent.setdefault(sub.header.agent_id, []).append(sub)
        results = await asyncio.gather(*(self._append_agent(subs) for subs in by_agent.values()))
        await self._append_alerts()
        return [pair for result in results for pair in result]

    async def _append_agent(self, subs: list[Submission]) -> list[tuple[Submission, Ack]]:
        return [(sub, await self._append_one(sub)) for sub in subs]

    async def _append_one(self, sub: Submission) -> Ack:
        """Decide and append one envelope; again (up to MAX_RACES) while other hubs append first."""
        try:
            for _ in range(MAX_RACES):
                ack = await self._try_append(sub)
                if ack is not None:
                    return ack
        except NATS_ERRORS as exc:
            self._forget(sub.header.agent_id)
            return self._append_failed(exc)
        return retry(Reason.REASON_CONTENDED, "other hubs kept appending for this agent", self.config.base_backoff_ms)

    async def _try_append(self, sub: Submission) -> Ack | None:
        """The envelope's answer, or None when another hub appended to its agent's subject first."""
        agent_id = sub.header.agent_id
        head = await self._head(agent_id)
        if agent_id in self._cached and (sub.header.seq == 1 or not _links(sub.header, head.chain)):
            # Not plainly the next envelope of the head this hub knows: decide on the stream's head.
            # (A new chain too: its decision counts and alerts, which a lost race would repeat.)
            self._forget(agent_id)
            head = await self._head(agent_id)
        decision = self._decide(sub, {}, await self._known(sub.header, head))
        if decision.alert is not None:
            self._alerts.append(decision.alert)
        if decision.ack is not None:
            return decision.ack
        chain = decision.chain
        assert chain is not None
        try:
            pub = await self.stream.append(agent_id, sub.raw, chain, sub.agent, head.stream_seq)
        except WrongLastSequenceError:
            self.metrics.retries.labels("append_race").inc()
            self._forget(agent_id)
            return None
        if pub.duplicate:  # another hub appended this (agent, chain, seq) within the window
            self._forget(agent_id)
            return self._resent_at(sub, await self.stream.digest_at(pub.seq))
        self.chains[agent_id], self._head_seq[agent_id] = chain, pub.seq
        self._store_down_until = 0.0
        return ok(NO_REASON, chain.last_seq, chain.chain_id)

    def _resent_at(self, sub: Submission, stored: bytes | None) -> Ack:
        decision = self._resent(sub, stored or b"")
        if decision.alert is not None:
            self._alerts.append(decision.alert)
        assert decision.ack is not None
        return decision.ack

    async def _head(self, agent_id: str) -> Head:
        """The agent's head, from the cache or (first sight, after a race) the stream, else the index."""
        if agent_id in self._head_seq:
            self._cached.add(agent_id)
            return Head(self.chains.get(agent_id), self._head_seq[agent_id])
        self._cached.discard(agent_id)
        head = await self.stream.head(agent_id)
        chain = head.chain
        if chain is None and head.stream_seq == 0:
            chain = await asyncio.to_thread(self.index.chain_of, agent_id)  # the subject aged out of the stream
        if chain is None:
            self.chains.pop(agent_id, None)
        else:
            self.chains[agent_id] = chain
        self._head_seq[agent_id] = head.stream_seq
        return Head(chain, head.stream_seq)

    async def _known(self, h: envelope_pb2.EnvelopeHeader, head: Head) -> dict[tuple[str, bytes, int], bytes]:
        """What `_decide` must know is stored: the head, and for a resend of an older envelope of its chain
        the digest the index has (a resend of the head or before it is a duplicate or a fork)."""
        chain = head.chain
        if chain is None or chain.chain_id != h.chain_id or h.seq > chain.last_seq:
            return {}  # a new envelope: no lookup (were it stored already, the append would say so)
        known = {(h.agent_id, chain.chain_id, chain.last_seq): chain.last_hash}
        if h.seq < chain.last_seq:
            digest = await asyncio.to_thread(self.index.indexed_digest, h.agent_id, h.chain_id, h.seq)
            if digest is not None:
                known[(h.agent_id, h.chain_id, h.seq)] = digest
        return known

    def _forget(self, agent_id: str) -> None:
        self._head_seq.pop(agent_id, None)

    def _append_failed(self, exc: BaseException) -> Ack:
        """RETRY, and for a while every new envelope is answered RETRY at admission (as when SQLite fails)
        instead of each waiting out its own request timeout."""
        self._store_down_until = time.monotonic() + self.config.max_backoff_ms / 1000 / 4
        self.metrics.store_errors.labels("error").inc()
        log.warning("jetstream append failed; answering RETRY", extra={"error": repr(exc)})
        return retry(Reason.REASON_STORE_UNAVAILABLE, "jetstream did not confirm", self.config.base_backoff_ms * 10)

    async def _append_alerts(self) -> None:
        alerts, self._alerts = self._alerts, []
        for alert in alerts:
            try:
                await self.stream.append_alert(self.hostname, alert.event_id, alert.SerializeToString())
            except NATS_ERRORS as exc:
                log.error("hub alert not stored", extra={"error": repr(exc), "event_id": alert.event_id})


def _links(h: envelope_pb2.EnvelopeHeader, chain: ChainRecord | None) -> bool:
    """Would `h` be accepted after `chain` (the next envelope, or the start of a new chain)?"""
    if h.seq == 1 and h.prev_hash == GENESIS_HASH:
        return True
    return (
        chain is not None
        and h.chain_id == chain.chain_id
        and h.seq == chain.last_seq + 1
        and h.prev_hash == chain.last_hash
    )


def committed_from_index(rows: list[tuple[int, str, int, EventRow]]) -> list[Committed]:
    """Index rows (`SqliteStore.rows_after`) as what the broker fans out to subscribers."""
    return [Committed(agent_id, cursor, received_ns, [row]) for cursor, agent_id, received_ns, row in rows]
