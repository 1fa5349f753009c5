"""Live fan-out of committed events to Subscribe streams; a slow subscriber is cut, never waited for."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from amoskys.eventbus.ingest import Committed
from amoskys.eventbus.rows import EventRow
from amoskys.eventbus.turns import Steps, Turns
from amoskys.v1 import bus_pb2, events_pb2

__all__ = ["OVERFLOW", "Broker", "Outgoing", "Subscriber", "matches"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One event as subscribers are sent it: its cursor and its `StoredEvent`, serialized once for all of them."""

    cursor: int
    raw: bytes

    @classmethod
    def of(cls, stored: bus_pb2.StoredEvent) -> Outgoing:
        return cls(stored.cursor, stored.SerializeToString())


OVERFLOW = Outgoing(-1, b"")  # sentinel: the subscriber fell behind and must resume from its cursor


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
    queue: asyncio.Queue[Outgoing] = field(default_factory=lambda: asyncio.Queue(maxsize=10_000))
    overflowed: bool = False


FANOUT = "broker fan-out"  # the broker's place in the loop's turns (no agent id has a space)
STEP_OFFERS = 500  # (event, subscriber) pairs looked at per step


class Broker:
    def __init__(self, turns: Turns) -> None:
        self.subscribers: set[Subscriber] = set()
        self.turns = turns

    def publish(self, committed: list[Committed]) -> None:
        """Runs on the event loop, called from the writer thread after each commit: the fan-out is
        queued in steps (commits stay in order), so a large commit never holds the loop at once."""
        if self._live():
            self.turns.add(FANOUT, self._fan_out(committed)).add_done_callback(_log_failure)

    def _fan_out(self, committed: list[Committed]) -> Steps:
        """Each stored event is decoded and serialized once, for all the subscribers it matches."""
        subscribers, budget = self._live(), STEP_OFFERS
        for item in committed:
            for offset, row in enumerate(item.rows):
                if budget <= 0:
                    yield
                    subscribers, budget = self._live(), STEP_OFFERS
                if not subscribers:
                    return
                budget -= len(subscribers)
                outgoing: Outgoing | None = None
                for sub in subscribers:
                    if sub.overflowed or not matches(sub.flt, item.agent_id, row):
                        continue
                    if outgoing is None:
                        outgoing = Outgoing.of(
                            bus_pb2.StoredEvent(
                                cursor=item.first_cursor + offset,
                                agent_id=item.agent_id,
                                received_ns=item.received_ns,
                                event=events_pb2.Event.FromString(row.body),
                            )
                        )
                    _offer(sub, outgoing)

    def _live(self) -> list[Subscriber]:
        return [sub for sub in self.subscribers if not sub.overflowed]


def _log_failure(done: asyncio.Future[None]) -> None:
    if not done.cancelled() and done.exception() is not None:
        log.error("fan-out to subscribers failed", exc_info=done.exception())


def _offer(sub: Subscriber, outgoing: Outgoing) -> None:
    """Queue one event for a subscriber; a full queue marks it overflowed (it is cut with its cursor)."""
    try:
        sub.queue.put_nowait(outgoing)
    except asyncio.QueueFull:
        sub.overflowed = True
        while not sub.queue.empty():
            sub.queue.get_nowait()
        sub.queue.put_nowait(OVERFLOW)
