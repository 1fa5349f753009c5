"""Live fan-out of committed events to Subscribe streams; a slow subscriber is cut, never waited for."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from amoskys.eventbus.ingest import Committed
from amoskys.eventbus.rows import EventRow
from amoskys.v1 import bus_pb2, events_pb2

__all__ = ["OVERFLOW", "Broker", "Subscriber", "matches"]

OVERFLOW = bus_pb2.StoredEvent()  # sentinel: the subscriber fell behind and must resume from its cursor


def matches(flt: bus_pb2.EventFilter, agent_id: str, row: EventRow) -> bool:
    """The Python twin of the store's SQL filter."""
    return (
        (not flt.since_ns or row.ts_ns >= flt.since_ns)
        and (not flt.until_ns or row.ts_ns < flt.until_ns)
        and (not flt.hosts or row.host in flt.hosts)
        and (not flt.agent_ids or agent_id in flt.agent_ids)
        and (not flt.kinds or row.kind in flt.kinds)
        and (not flt.agents or row.agent in flt.agents)
        and row.severity >= flt.min_severity
        and (not flt.text or flt.text.lower() in row.text)
    )


@dataclass(eq=False)
class Subscriber:
    flt: bus_pb2.EventFilter
    queue: asyncio.Queue[bus_pb2.StoredEvent] = field(default_factory=lambda: asyncio.Queue(maxsize=10_000))
    overflowed: bool = False


class Broker:
    def __init__(self) -> None:
        self.subscribers: set[Subscriber] = set()

    def publish(self, committed: list[Committed]) -> None:
        """Runs on the event loop, called from the writer thread after each commit.

        Each stored event is decoded once, for all the subscribers it matches.
        """
        subscribers = [sub for sub in self.subscribers if not sub.overflowed]
        if not subscribers:
            return
        for item in committed:
            for offset, row in enumerate(item.rows):
                stored: bus_pb2.StoredEvent | None = None
                for sub in subscribers:
                    if sub.overflowed or not matches(sub.flt, item.agent_id, row):
                        continue
                    if stored is None:
                        stored = bus_pb2.StoredEvent(
                            cursor=item.first_cursor + offset,
                            agent_id=item.agent_id,
                            received_ns=item.received_ns,
                            event=events_pb2.Event.FromString(row.body),
                        )
                    _offer(sub, stored)


def _offer(sub: Subscriber, stored: bus_pb2.StoredEvent) -> None:
    """Queue one event for a subscriber; a full queue marks it overflowed (it is cut with its cursor)."""
    try:
        sub.queue.put_nowait(stored)
    except asyncio.QueueFull:
        sub.overflowed = True
        while not sub.queue.empty():
            sub.queue.get_nowait()
        sub.queue.put_nowait(OVERFLOW)
