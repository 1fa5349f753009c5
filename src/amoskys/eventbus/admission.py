"""Admission: the checks an envelope passes before it reaches the writer, cheapest first.

Size and structure, the sender's identity, fair admission, the signature, then every event against
the sender's enrolment (README, "The hub"). Each refusal is an Ack whose reason starts with a word
naming what failed; what passes is handed to the writer as `Checked`.
"""

from __future__ import annotations

import math
import time
from typing import NamedTuple

from google.protobuf.message import DecodeError

from amoskys.config import EventBusConfig
from amoskys.envelope import PROTOCOL_VERSION, envelope_digest, verify_signature
from amoskys.errors import VerificationError
from amoskys.eventbus.auth import Peer, TrustState
from amoskys.eventbus.edge import MAX_HEADER_BYTES, event_refusal, header_refusal, observed_ns
from amoskys.eventbus.ingest import Ack, Ingest
from amoskys.eventbus.metrics import BusMetrics
from amoskys.eventbus.rows import EventRow, to_row
from amoskys.eventbus.store import AgentUpdate
from amoskys.v1 import envelope_pb2, events_pb2

__all__ = ["DRAINING_BACKOFF_MS", "Admission", "Checked", "LoopShare", "agent_update"]

Status = envelope_pb2.PublishAck.Status
DRAINING_BACKOFF_MS = 1000  # a restart takes about a second; come back then
SHARE_MIN_BYTES = 1 << 20  # bytes a second below which an identity is never over its share (~10k events/s)
SHARE_BACKOFF_MS = 200  # an identity over its share of a saturated event loop comes back after this
MAX_HOLD_S = 1.0  # the longest an answer to an identity ignoring its backoff is held


class Checked(NamedTuple):
    """An envelope that passed every check, ready for the writer's chain decision and commit."""

    header: envelope_pb2.EnvelopeHeader
    rows: list[EventRow]
    agent: AgentUpdate
    digest: bytes


class LoopShare:
    """Bytes each identity sent the hub, decaying over about a second."""

    def __init__(self, tau_s: float = 1.0) -> None:
        self.tau_s = tau_s
        self.rates: dict[str, tuple[float, float]] = {}  # identity -> (decayed bytes, when)
        self.total, self.total_at = 0.0, time.monotonic()

    def _decayed(self, value: float, since: float, now: float) -> float:
        return value * math.exp(-(now - since) / self.tau_s)

    def add(self, identity: str, size: int) -> None:
        now = time.monotonic()
        value, since = self.rates.get(identity, (0.0, now))
        self.rates[identity] = (self._decayed(value, since, now) + size, now)
        self.total, self.total_at = self._decayed(self.total, self.total_at, now) + size, now

    def over(self, identity: str) -> bool:
        """More than an even share of what all identities heard from lately sent, and a lot (over
        SHARE_MIN_BYTES a second): an ordinary agent is never held back, a flood is."""
        if identity not in self.rates or len(self.rates) < 2:
            return False
        now = time.monotonic()
        value, since = self.rates[identity]
        mine = self._decayed(value, since, now)
        even = self._decayed(self.total, self.total_at, now) / len(self.rates)
        return mine > max(even, SHARE_MIN_BYTES * self.tau_s)

    def forget_quiet(self) -> None:
        """Drop identities not heard from for a while (called about once a second)."""
        now = time.monotonic()
        self.rates = {k: (v, t) for k, (v, t) in self.rates.items() if now - t < 5 * self.tau_s}


def _invalid(reason: str) -> Ack:
    return Ack(Status.INVALID, reason)


class Admission:
    def __init__(self, config: EventBusConfig, trust: TrustState, ingest: Ingest, metrics: BusMetrics) -> None:
        self.config = config
        self.trust = trust
        self.ingest = ingest
        self.metrics = metrics
        self.draining = False
        self.loop_busy = False  # set by the hub's loop watcher
        self.share = LoopShare()
        self._retry_until: dict[str, float] = {}  # identity -> end of the backoff it was told to wait

    def check(self, raw: bytes, peer: Peer | None) -> Ack | Checked:
        """An immediate answer, or the checked envelope."""
        if peer is not None and len(raw) <= self.config.limits.max_envelope_bytes:
            self.share.add(peer.cn, len(raw))  # what it asks the hub to read, answered or not (oversize is never read)
        early = self._still_backing_off(peer) or self._over_share(peer)
        if early is not None:
            return early
        checked = self._precheck(raw, peer)
        if peer is not None and isinstance(checked, Ack) and checked.status == Status.RETRY and checked.backoff_ms:
            # A compliant agent waits at least half the backoff (its jitter is +-50 %).
            self._retry_until[peer.cn] = time.monotonic() + checked.backoff_ms / 2000
        return checked

    def _over_share(self, peer: Peer | None) -> Ack | None:
        """While the event loop is saturated, an identity that sends more than its share (bytes offered
        over the last second or so) is answered RETRY unread, so others' envelopes get through."""
        if peer is None or not self.loop_busy or not self.share.over(peer.cn):
            return None
        self.metrics.retries.labels("over_share").inc()
        self._retry_until[peer.cn] = time.monotonic() + SHARE_BACKOFF_MS / 2000
        return Ack(Status.RETRY, "over_share: the hub is busy; others first", SHARE_BACKOFF_MS)

    def _still_backing_off(self, peer: Peer | None) -> Ack | None:
        """RETRY, unread, for an identity that sends again before the backoff it was given: ignoring
        RETRY costs the hub nothing and gains the sender nothing."""
        if peer is None or peer.cn not in self._retry_until:
            return None
        remaining = self._retry_until[peer.cn] - time.monotonic()
        if remaining <= 0:
            del self._retry_until[peer.cn]
            return None
        self.metrics.retries.labels("backing_off").inc()
        hold = min(remaining, MAX_HOLD_S)
        return Ack(
            Status.RETRY, "backing_off: wait the backoff you were given", max(int(remaining * 2000), 1), hold_s=hold
        )

    def _precheck(self, raw: bytes, peer: Peer | None) -> Ack | Checked:
        parsed = self._parse(raw)
        if isinstance(parsed, Ack):
            return parsed
        envelope, header = parsed
        refusal = self._identity_refusal(header, peer) or self._admission(header) or self._signature(envelope, header)
        return refusal or self._unpack(envelope, header, peer)

    def _parse(self, raw: bytes) -> Ack | tuple[envelope_pb2.Envelope, envelope_pb2.EnvelopeHeader]:
        """Size, structure and version: the checks that cost nothing."""
        if self.draining:
            return Ack(Status.RETRY, "draining: hub is shutting down", DRAINING_BACKOFF_MS)
        if not raw:
            return _invalid("empty: no envelope bytes")
        if len(raw) > self.config.limits.max_envelope_bytes:
            return _invalid(f"too_large: {len(raw)} bytes > {self.config.limits.max_envelope_bytes}")
        try:
            envelope = envelope_pb2.Envelope.FromString(raw)
            if not envelope.header or not envelope.sig:
                return _invalid("incomplete: header and sig are required")
            if len(envelope.header) > MAX_HEADER_BYTES:
                return _invalid(f"header_too_large: {len(envelope.header)} bytes > {MAX_HEADER_BYTES}")
            header = envelope_pb2.EnvelopeHeader.FromString(envelope.header)
        except DecodeError:
            return _invalid("malformed: not an Envelope with an EnvelopeHeader")
        if header.version != PROTOCOL_VERSION:
            return _invalid(f"unsupported_version: {header.version} (this hub speaks {PROTOCOL_VERSION})")
        refusal = header_refusal(header)
        return _invalid(refusal) if refusal else (envelope, header)

    def _admission(self, header: envelope_pb2.EnvelopeHeader) -> Ack | None:
        limit = self.config.limits.max_events_per_batch
        if header.event_count > limit:
            return _invalid(f"too_many_events: {header.event_count} > {limit}")
        backoff = self.ingest.overload_backoff(header.agent_id, header.event_count)
        if backoff is not None:
            return Ack(Status.RETRY, "overloaded: backlog above high-water mark", backoff)
        return None

    def _signature(self, envelope: envelope_pb2.Envelope, header: envelope_pb2.EnvelopeHeader) -> Ack | None:
        try:
            verify_signature(envelope, self.trust.agents[header.agent_id].key)
        except VerificationError:
            return _invalid("bad_signature: signature does not verify with the agent's key")
        return None

    def _identity_refusal(self, header: envelope_pb2.EnvelopeHeader, peer: Peer | None) -> Ack | None:
        reason = self.trust.refusal(peer, time.time_ns())
        if reason is not None:
            return Ack(Status.UNAUTHORIZED, f"peer: {reason}")
        assert peer is not None
        if header.agent_id != peer.cn:
            return Ack(Status.UNAUTHORIZED, f"cn_mismatch: certificate CN {peer.cn!r} != agent_id {header.agent_id!r}")
        if header.agent_id not in self.trust.agents:
            return Ack(Status.UNAUTHORIZED, f"unknown_agent: {header.agent_id!r} is not in the trust map")
        return None

    def _unpack(
        self, envelope: envelope_pb2.Envelope, header: envelope_pb2.EnvelopeHeader, peer: Peer | None
    ) -> Ack | Checked:
        try:
            batch = events_pb2.EventBatch.FromString(envelope.payload)
        except DecodeError:
            return _invalid("malformed_payload: not an EventBatch")
        if len(batch.events) != header.event_count:
            count = len(batch.events)
            return _invalid(f"event_count_mismatch: header says {header.event_count}, payload has {count}")
        if len(batch.events) > self.config.limits.max_events_per_batch:
            return _invalid(f"too_many_events: {len(batch.events)} > {self.config.limits.max_events_per_batch}")
        enrolment = self.trust.agents[header.agent_id]
        refusal = next(filter(None, (event_refusal(e, i, enrolment) for i, e in enumerate(batch.events))), None)
        if refusal is not None:
            return _invalid(refusal)
        rows = [to_row(event) for event in batch.events]
        too_big = next((r for r in rows if len(r.body) > self.config.limits.max_event_bytes), None)
        if too_big is not None:
            return _invalid(f"event_too_large: {len(too_big.body)} bytes > {self.config.limits.max_event_bytes}")
        self.metrics.events_received.inc(len(rows))
        rows = self._file_times(rows)
        update = agent_update(batch, rows, enrolment.host, enrolment.kind, peer.not_after_ns if peer else 0)
        return Checked(header, rows, update, envelope_digest(envelope.header, envelope.payload))

    def _file_times(self, rows: list[EventRow]) -> list[EventRow]:
        """Events that claim to be further ahead than the allowed skew are filed at the hub's time (counted)."""
        now_ns = time.time_ns()
        skew_ns = int(self.config.limits.max_clock_skew_s * 1e9)
        future = [i for i, row in enumerate(rows) if row.ts_ns > now_ns + skew_ns]
        if not future:
            return rows
        self.metrics.future_events.inc(len(future))
        for i in future:
            rows[i] = rows[i]._replace(ts_ns=observed_ns(rows[i].ts_ns, now_ns, skew_ns))
        return rows


def agent_update(
    batch: events_pb2.EventBatch, rows: list[EventRow], host: str, kind: str, cert_not_after_ns: int
) -> AgentUpdate:
    """Registry facts from one batch: host and kind from the enrolment; heartbeat times as filed."""
    update = AgentUpdate(host=host, kind=kind, events=len(rows), cert_not_after_ns=cert_not_after_ns)
    for index, row in enumerate(rows):
        if row.kind == "alert":
            update.alerts += 1
        elif row.kind == "heartbeat":
            event = batch.events[index]
            update.heartbeat_ns = max(update.heartbeat_ns, row.ts_ns)
            update.version = event.heartbeat.version
            update.interval_s = event.heartbeat.interval_s
    return update
