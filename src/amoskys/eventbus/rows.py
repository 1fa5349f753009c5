"""Turning events into store rows: index columns plus a lower-cased searchable text."""

from __future__ import annotations

from typing import NamedTuple

from amoskys.bodies import search_terms
from amoskys.v1 import events_pb2

__all__ = ["EventRow", "event_kind", "searchable_text", "to_row"]


class EventRow(NamedTuple):
    ts_ns: int
    host: str
    agent: str
    kind: str
    severity: int
    event_id: str
    text: str
    body: bytes


def event_kind(event: events_pb2.Event) -> str:
    """The body's field name (process, flow, ...), or 'none'."""
    return event.WhichOneof("body") or "none"


def searchable_text(event: events_pb2.Event, kind: str) -> str:
    base = search_terms(event, kind)
    if event.labels:
        base += " " + " ".join(f"{k}={v}" for k, v in event.labels.items())
    return base.lower().replace("\0", " ")  # the store's text index (FTS5) would stop reading at a NUL


def to_row(event: events_pb2.Event) -> EventRow:
    kind = event_kind(event)
    return EventRow(
        event.ts_ns,
        event.host,
        event.agent,
        kind,
        event.severity,
        event.event_id,
        searchable_text(event, kind),
        event.SerializeToString(),
    )
