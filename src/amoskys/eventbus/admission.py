"""Admission: the checks an envelope passes before it reaches the writer, cheapest first.

Size and structure, the sender's identity, fair admission, the signature, then every event against
the sender's enrolment (README, "The hub"). Each refusal is an Ack with a reason code
(`PublishAck.Reason`) and a text naming what failed; what passes is handed to the writer.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Generator
from typing import Any, NamedTuple

from google.protobuf.message import DecodeError

from amoskys.config import EventBusConfig
from amoskys.envelope import PROTOCOL_VERSION, verify_signature
from amoskys.errors import VerificationError
from amoskys.eventbus.acks import STATUS_RETRY, Ack, Reason, invalid, retry, unauthorized
from amoskys.eventbus.auth import Peer, TrustState
from amoskys.eventbus.edge import MAX_HEADER_BYTES, event_refusal, header_refusal, observed_ns
from amoskys.eventbus.ingest import Ingest
from amoskys.eventbus.metrics import BusMetrics
from amoskys.eventbus.rows import EventRow, to_row
from amoskys.eventbus.store import AgentUpdate
from amoskys.eventbus.turns import Turns, run_now
from amoskys.v1 import envelope_pb2, events_pb2

__all__ = ["DRAINING_BACKOFF_MS", "Admission", "Checked", "LoopShare", "agent_update"]

DRAINING_BACKOFF_MS = 1000  # a restart takes about a second; come back then
SHARE_MIN_BYTES = 1 << 20  # bytes a second below which an identity is never over its share (~10k events/s)
SHARE_BACKOFF_MS = 200  # an identity over its share of a saturated event loop comes back after this
MAX_HOLD_S = 1.0  # the longest an answer to an identity ignoring its backoff is held
STEP_EVENTS = 32  # events checked and turned into rows per step (about a millisecond)


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


class Admission:
    def __init__(
        self, config: EventBusConfig, trust: TrustState, ingest: Ingest, metrics: BusMetrics, turns: Turns
    ) -> None:
        self.config = config
        self.turns = turns
        self.trust = trust
        self.ingest = ingest
        self.metrics = metrics
        self.draining = False
        self.loop_busy = False  # set by the hub's loop watcher
        self.share = LoopShare()
        self._retry_until: dict[str, float] = {}  # identity -> end of the backoff it was told to wait

    def check(self, raw: bytes, peer: Peer | None) -> Ack | asyncio.Future[Any]:
        """An immediate answer, or a future of the answer (an Ack, or the future of the envelope's commit).

        What costs per envelope runs here; what costs per event (the payload's checks and rows) runs in
        steps taken in turn with other senders (`Turns`), then the envelope goes to the writer. An envelope
        of at most one step's events is checked at once, unless its sender has envelopes in the turns.
        """
        if peer is not None and len(raw) <= self.config.limits.max_envelope_bytes:
            self.share.add(peer.cn, len(raw))  # what it asks the hub to read, answered or not (oversize is never read)
        early = self._still_backing_off(peer) or self._over_share(peer)
        if early is not None:
            return early
        checked = self._precheck(raw, peer)
        if isinstance(checked, Ack):
            return self._told_to_wait(peer, checked)
        envelope, header = checked
        steps = self._checks(raw, envelope, header, peer)
        if header.event_count <= STEP_EVENTS and not self.turns.has(header.agent_id):
            return run_now(steps)  # a step's worth, and nothing of its sender's waiting to be overtaken
        return self.turns.add(header.agent_id, steps)

    def _over_share(self, peer: Peer | None) -> Ack | None:
        """While the event loop is saturated, an identity that sends more than its share (bytes offered
        over the last second or so) is answered RETRY unread, so others' envelopes get through."""
        if peer is None or not self.loop_busy or not self.share.over(peer.cn):
            return None
        self._retry_until[peer.cn] = time.monotonic() + SHARE_BACKOFF_MS / 2000
        return retry(Reason.REASON_OVER_SHARE, "the hub is busy; others first", SHARE_BACKOFF_MS)

    def _still_backing_off(self, peer: Peer | None) -> Ack | None:
        """RETRY, unread, for an identity that sends again before the backoff it was given: ignoring
        RETRY costs the hub nothing and gains the sender nothing."""
        if peer is None or peer.cn not in self._retry_until:
            return None
        remaining = self._retry_until[peer.cn] - time.monotonic()
        if remaining <= 0:
            del self._retry_until[peer.cn]
            return None
        hold = min(remaining, MAX_HOLD_S)
        backoff_ms = max(int(remaining * 2000), 1)
        return Ack(STATUS_RETRY, Reason.REASON_BACKING_OFF, "wait the backoff you were given", backoff_ms, hold_s=hold)

    def _precheck(
        self, raw: bytes, peer: Peer | None
    ) -> Ack | tuple[envelope_pb2.Envelope, envelope_pb2.EnvelopeHeader]:
        """The checks that cost per envelope, not per event."""
        parsed = self._parse(raw)
        if isinstance(parsed, Ack):
            return parsed
        refusal = self._identity_refusal(parsed[1], peer) or self._admission(parsed[1])
        return refusal or parsed

    def _checks(
        self, raw: bytes, envelope: envelope_pb2.Envelope, header: envelope_pb2.EnvelopeHeader, peer: Peer | None
    ) -> Generator[None, None, Ack | asyncio.Future[Ack]]:
        """The signature and the payload's size; then, at once, the sender's room in the writer's backlog
        (taken now: the checks of its other envelopes may be under way); then its events in steps. The
        last step hands the envelope to the writer."""
        digest = self._signature(envelope, header)
        if isinstance(digest, Ack):
            return digest
        yield
        batch = _batch(envelope, header)
        if isinstance(batch, Ack):
            return batch
        refusal = self._reserve(header, peer)
        if refusal is not None:
            return refusal
        submitted = False
        try:
            checked = yield from self._unpack(batch, header, digest, peer)
            if isinstance(checked, Ack):
                return checked
            submitted = True
            return self.ingest.submit(checked.header, checked.digest, checked.rows, checked.agent, raw)
        finally:
            if not submitted:
                self.ingest.release(header.agent_id, header.event_count)

    def _reserve(self, header: envelope_pb2.EnvelopeHeader, peer: Peer | None) -> Ack | None:
        """Room for the envelope's events among those waiting for commit (fair admission), or RETRY."""
        overload = self.ingest.overload(header.agent_id, header.event_count, self.loop_busy)
        if overload is None:
            self.ingest.reserve(header.agent_id, header.event_count)
            return None
        return self._told_to_wait(peer, retry(Reason.REASON_OVERLOADED, overload.why, overload.backoff_ms))

    def _told_to_wait(self, peer: Peer | None, ack: Ack) -> Ack:
        """Note a RETRY with a backoff: a compliant agent waits at least half of it (its jitter is +-50 %)."""
        if peer is not None and ack.status == STATUS_RETRY and ack.backoff_ms:
            self._retry_until[peer.cn] = time.monotonic() + ack.backoff_ms / 2000
        return ack

    def _parse(self, raw: bytes) -> Ack | tuple[envelope_pb2.Envelope, envelope_pb2.EnvelopeHeader]:
        """Size, structure and version: the checks that cost nothing."""
        if self.draining:
            return retry(Reason.REASON_DRAINING, "hub is shutting down", DRAINING_BACKOFF_MS)
        if not raw:
            return invalid(Reason.REASON_EMPTY, "no envelope bytes")
        if len(raw) > self.config.limits.max_envelope_bytes:
            return invalid(Reason.REASON_TOO_LARGE, f"{len(raw)} bytes > {self.config.limits.max_envelope_bytes}")
        try:
            envelope = envelope_pb2.Envelope.FromString(raw)
            if not envelope.header or not envelope.sig:
                return invalid(Reason.REASON_INCOMPLETE, "header and sig are required")
            if len(envelope.header) > MAX_HEADER_BYTES:
                return invalid(Reason.REASON_HEADER_TOO_LARGE, f"{len(envelope.header)} bytes > {MAX_HEADER_BYTES}")
            header = envelope_pb2.EnvelopeHeader.FromString(envelope.header)
        except DecodeError:
            return invalid(Reason.REASON_MALFORMED, "not an Envelope with an EnvelopeHeader")
        if header.version != PROTOCOL_VERSION:
            return invalid(Reason.REASON_UNSUPPORTED_VERSION, f"{header.version} (this hub speaks {PROTOCOL_VERSION})")
        refusal = header_refusal(header)
        return invalid(*refusal) if refusal else (envelope, header)

    def _admission(self, header: envelope_pb2.EnvelopeHeader) -> Ack | None:
        """The batch's size, and fair admission as the backlog stands (before anything is read further)."""
        limit = self.config.limits.max_events_per_batch
        if header.event_count > limit:
            return invalid(Reason.REASON_TOO_MANY_EVENTS, f"{header.event_count} > {limit}")
        overload = self.ingest.overload(header.agent_id, header.event_count, self.loop_busy)
        return None if overload is None else retry(Reason.REASON_OVERLOADED, overload.why, overload.backoff_ms)

    def _signature(self, envelope: envelope_pb2.Envelope, header: envelope_pb2.EnvelopeHeader) -> Ack | bytes:
        """The envelope's digest once its signature verifies with the sender's key, else INVALID."""
        try:
            return verify_signature(envelope, self.trust.agents[header.agent_id].verify_key)
        except VerificationError:
            return invalid(Reason.REASON_BAD_SIGNATURE, "signature does not verify with the agent's key")

    def _identity_refusal(self, header: envelope_pb2.EnvelopeHeader, peer: Peer | None) -> Ack | None:
        reason = self.trust.refusal(peer, time.time_ns())
        if reason is not None:
            return unauthorized(Reason.REASON_PEER, f"{reason}")
        assert peer is not None
        if header.agent_id != peer.cn:
            return unauthorized(
                Reason.REASON_CN_MISMATCH, f"certificate CN {peer.cn!r} != agent_id {header.agent_id!r}"
            )
        if header.agent_id not in self.trust.agents:
            return unauthorized(Reason.REASON_UNKNOWN_AGENT, f"{header.agent_id!r} is not in the trust map")
        return None

    def _unpack(
        self, batch: events_pb2.EventBatch, header: envelope_pb2.EnvelopeHeader, digest: bytes, peer: Peer | None
    ) -> Generator[None, None, Ack | Checked]:
        """Every event against the sender's enrolment, and its row, STEP_EVENTS a step."""
        enrolment = self.trust.agents[header.agent_id]
        rows: list[EventRow] = []
        for index, event in enumerate(batch.events):
            if index and not index % STEP_EVENTS:
                yield
            refusal = event_refusal(event, index, enrolment)
            if refusal is not None:
                return invalid(*refusal)
            rows.append(to_row(event))
            if len(rows[-1].body) > self.config.limits.max_event_bytes:
                return invalid(
                    Reason.REASON_EVENT_TOO_LARGE, f"{len(rows[-1].body)} bytes > {self.config.limits.max_event_bytes}"
                )
        self.metrics.events_received.inc(len(rows))
        rows = self._file_times(rows)
        update = agent_update(batch, rows, enrolment.host, enrolment.kind, peer.not_after_ns if peer else 0)
        return Checked(header, rows, update, digest)

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


def _batch(envelope: envelope_pb2.Envelope, header: envelope_pb2.EnvelopeHeader) -> events_pb2.EventBatch | Ack:
    """The payload as an EventBatch of `event_count` events, or INVALID."""
    try:
        batch = events_pb2.EventBatch.FromString(envelope.payload)
    except DecodeError:
        return invalid(Reason.REASON_MALFORMED_PAYLOAD, "not an EventBatch")
    if len(batch.events) != header.event_count:
        count = len(batch.events)
        return invalid(Reason.REASON_EVENT_COUNT_MISMATCH, f"header says {header.event_count}, payload has {count}")
    return batch


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
