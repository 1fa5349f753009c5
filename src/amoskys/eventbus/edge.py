"""What the hub checks before anything of an envelope reaches a shared thread.

Every field an agent sends is hostile input: the header's numbers must fit their SQLite columns,
every event must be one the sender's enrolment allows (its host, its kind, its kind's bodies and
alert namespace), and timestamps may not claim the future. Each check returns the Refusal for an
INVALID ack (its reason code, and a text naming the field), or None.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from amoskys.catalog import AGENT_KINDS
from amoskys.eventbus.acks import Reason, Refusal
from amoskys.keys import Enrolment
from amoskys.v1 import bus_pb2, envelope_pb2, events_pb2

__all__ = [
    "INT64_MAX",
    "MAX_HEADER_BYTES",
    "MAX_ID_CHARS",
    "event_refusal",
    "filter_refusal",
    "header_refusal",
    "observed_ns",
]

INT64_MAX = 2**63 - 1  # SQLite INTEGER, protobuf int64, nanoseconds up to the year 2262
MAX_HEADER_BYTES = 512  # a real header is ~110 bytes
MAX_ID_CHARS = 128  # event_id, host: longer is garbage, and it is indexed
CHAIN_ID_BYTES = 16
HASH_BYTES = 32
MAX_PORT = 65535
MAX_HEARTBEAT_INTERVAL_S = 86_400
MAX_FILTER_VALUES = 1000  # per list: SQLite binds each as a variable (its limit is 32,766)
MAX_FILTER_TEXT = 1024
SEVERITIES = frozenset(events_pb2.Severity.values())


def header_refusal(header: envelope_pb2.EnvelopeHeader) -> Refusal | None:
    """The header's numbers and sizes at their edges."""
    if not 1 <= header.seq <= INT64_MAX:
        return Refusal(Reason.REASON_BAD_SEQ, f"seq {header.seq} is outside 1..{INT64_MAX}")
    if len(header.chain_id) != CHAIN_ID_BYTES:
        return Refusal(Reason.REASON_BAD_CHAIN_ID, f"chain_id is {len(header.chain_id)} bytes, not {CHAIN_ID_BYTES}")
    if len(header.prev_hash) != HASH_BYTES:
        return Refusal(Reason.REASON_BAD_PREV_HASH, f"prev_hash is {len(header.prev_hash)} bytes, not {HASH_BYTES}")
    return None


def event_refusal(event: events_pb2.Event, index: int, enrolment: Enrolment) -> Refusal | None:
    """Why the sender may not store this event, or None. `index` is its place in the batch."""
    where = f"event {index}"
    if event.host != enrolment.host:
        return Refusal(
            Reason.REASON_HOST_MISMATCH,
            f"{where} host {_shown(event.host)} but this identity is enrolled for {enrolment.host!r}",
        )
    if event.agent != enrolment.kind:
        return Refusal(
            Reason.REASON_AGENT_MISMATCH,
            f"{where} agent {_shown(event.agent)} but this identity is a {enrolment.kind!r} agent",
        )
    body = event.WhichOneof("body")
    kind = AGENT_KINDS[enrolment.kind]
    if body is None or not kind.may_send(body):
        return Refusal(
            Reason.REASON_BODY_NOT_ALLOWED, f"{where} body {body or 'none'!r} is not one a {kind.name!r} agent sends"
        )
    if body == "alert" and not kind.may_raise(event.alert.rule):
        return Refusal(
            Reason.REASON_RULE_NOT_ALLOWED,
            f"{where} alert rule {_shown(event.alert.rule)} is outside {kind.name}.* and agent.*",
        )
    if not 1 <= len(event.event_id) <= MAX_ID_CHARS:
        return Refusal(Reason.REASON_BAD_EVENT_ID, f"{where} event_id must have 1..{MAX_ID_CHARS} characters")
    if event.ts_ns <= 0:
        return Refusal(Reason.REASON_BAD_TS, f"{where} ts_ns {event.ts_ns} is not a time")
    if event.severity not in SEVERITIES:
        return Refusal(Reason.REASON_BAD_SEVERITY, f"{where} severity {event.severity} is not a known level")
    return _body_refusal(event, body, where)


def _body_refusal(event: events_pb2.Event, body: str, where: str) -> Refusal | None:
    """Numbers inside bodies that the hub, the UI or a rule reads: ports, intervals, finite floats."""
    if body == "heartbeat" and not 1 <= event.heartbeat.interval_s <= MAX_HEARTBEAT_INTERVAL_S:
        return Refusal(
            Reason.REASON_BAD_INTERVAL, f"{where} heartbeat interval_s {event.heartbeat.interval_s} is outside 1..86400"
        )
    ports = _ports(event, body)
    if any(port > MAX_PORT for port in ports):
        return Refusal(Reason.REASON_BAD_PORT, f"{where} has a port above {MAX_PORT}")
    if not all(math.isfinite(value) for value in _floats(event, body)):
        return Refusal(Reason.REASON_BAD_NUMBER, f"{where} has a NaN or infinite value")
    return None


def _ports(event: events_pb2.Event, body: str) -> Iterable[int]:
    if body == "flow":
        return (event.flow.src_port, event.flow.dst_port)
    if body == "auth":
        return (event.auth.src_port,)
    if body == "port":
        return (event.port.socket.port,)
    if body == "host_metrics":
        return (s.port for s in event.host_metrics.listening)
    return ()


def _floats(event: events_pb2.Event, body: str) -> Iterable[float]:
    if body == "host_metrics":
        m = event.host_metrics
        return (m.cpu_percent, m.load1, m.load5, m.load15)
    if body == "snmp":
        return (value for i in event.snmp.interfaces for value in (i.in_bps, i.out_bps))
    return ()


def filter_refusal(flt: bus_pb2.EventFilter) -> str | None:
    """A consumer's filter within what one query may ask (each list, the text)."""
    for name in ("hosts", "agent_ids", "kinds", "agents"):
        values = getattr(flt, name)
        if len(values) > MAX_FILTER_VALUES:
            return f"filter.{name}: {len(values)} values > {MAX_FILTER_VALUES}"
    if len(flt.text) > MAX_FILTER_TEXT:
        return f"filter.text: {len(flt.text)} characters > {MAX_FILTER_TEXT}"
    return None


def observed_ns(ts_ns: int, received_ns: int, max_skew_ns: int) -> int:
    """The time the hub files an event under: the agent's, unless it claims to be more than `max_skew_ns`
    ahead of the hub; then the hub's own (it sorts, and counts as a heartbeat, as if it came now)."""
    return ts_ns if ts_ns <= received_ns + max_skew_ns else received_ns


def _shown(text: str) -> str:
    """A hostile string, quoted and cut short for a reason text."""
    return repr(text[:64] + ("..." if len(text) > 64 else ""))
