"""The store's SQL filter (with its text index) and the broker's `matches` select the same events.

Property style, seeded: random events made into rows as the hub does (`to_row`), their text with
spaces, punctuation, quotes, NUL, upper case, unicode that lower-cases to more characters or
folds differently, and random filters (needles of 1 to 8 characters), many of them.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from amoskys.eventbus.broker import matches
from amoskys.eventbus.rows import EventRow, to_row
from amoskys.eventbus.store import AcceptedEnvelope, SqliteStore
from amoskys.v1 import bus_pb2, events_pb2

HOSTS = ("web1", "web2", "db1")
AGENTS = ("proc", "auth", "flow")
KINDS = ("process", "auth", "flow", "alert", "heartbeat")
ALPHABET = (
    "abcdefg xyz",
    " ",
    ".,:;-_/=\"'()*%?[]^~\\",
    "0123",
    "ÄéßİI\u03c3\u03c2\u03a3",  # Greek sigma: small, final, capital
    "\u0307\u0301",
    "日本語",
    "🙂\U0001d538",  # a double-struck A, outside the BMP
    "\x00\t\n",
)
AGENT_IDS = ("agent-a", "agent-b", "agent-c")


def random_text(pick: random.Random, length: int) -> str:
    return "".join(pick.choice(pick.choice(ALPHABET)) for _ in range(length))


def random_event(pick: random.Random, n: int) -> events_pb2.Event:
    """An event of a random kind whose searchable parts are random text."""
    event = events_pb2.Event(
        host=pick.choice(HOSTS), agent=pick.choice(AGENTS), event_id=f"{n:032x}", severity=pick.randrange(0, 6)
    )
    event.ts_ns = 1_000 + pick.randrange(100)  # few distinct times: ties exercise the (ts, id) paging
    words = lambda: random_text(pick, pick.randrange(0, 25))  # noqa: E731
    match pick.choice(KINDS):
        case "process":
            event.process.name = words()
            event.process.cmdline.extend([words(), words()])
        case "auth":
            event.auth.raw = words()
        case "alert":
            event.alert.rule, event.alert.summary = words(), words()
        case "flow":
            event.flow.interface = words()
        case _:
            event.heartbeat.interval_s = 30  # no text
    if pick.random() < 0.1:
        event.labels[words()] = words()
    return event


def random_needle(pick: random.Random, rows: list[tuple[str, EventRow]]) -> str:
    """Mostly a piece of a stored text (often re-cased), sometimes made up; 1 to 8 characters."""
    text = pick.choice(rows)[1].text
    if text and pick.random() < 0.7:
        start = pick.randrange(len(text))
        needle = text[start : start + pick.randrange(1, 9)]
        return needle.upper() if pick.random() < 0.3 else needle
    return random_text(pick, pick.randrange(1, 9))


def random_filter(pick: random.Random, rows: list[tuple[str, EventRow]]) -> bus_pb2.EventFilter:
    flt = bus_pb2.EventFilter()
    if pick.random() < 0.3:
        flt.since_ns = 1_000 + pick.randrange(100)
    if pick.random() < 0.3:
        flt.until_ns = 1_000 + pick.randrange(100)
    for field, values in (("hosts", HOSTS), ("agent_ids", AGENT_IDS), ("kinds", KINDS), ("agents", AGENTS)):
        if pick.random() < 0.2:
            getattr(flt, field).extend(pick.sample(values, pick.randrange(1, 3)))
    if pick.random() < 0.3:
        flt.min_severity = pick.randrange(0, 6)  # type: ignore[assignment]
    if pick.random() < 0.9:
        flt.text = random_needle(pick, rows)
    return flt


def paged(store: SqliteStore, flt: bus_pb2.EventFilter) -> list[int]:
    """Every page of `query`, newest first."""
    cursors: list[int] = []
    token = ""
    while True:
        events, token = store.query(flt, 7, token)
        cursors += [e.cursor for e in events]
        if not token:
            return cursors


@pytest.mark.parametrize("text_index", ["trigram", "none"])
def test_store_and_broker_select_the_same_events(tmp_path: Path, text_index: str) -> None:
    pick = random.Random(16)
    store = SqliteStore(tmp_path / "events.db", text_index="trigram" if text_index == "trigram" else "none")
    rows = [(pick.choice(AGENT_IDS), to_row(random_event(pick, n))) for n in range(1500)]
    for start in range(0, len(rows), 100):
        batch = rows[start : start + 100]
        store.commit([AcceptedEnvelope(agent, b"", 0, b"", [row]) for agent, row in batch], {}, 1)
    stored = {e.cursor: e for e in store.after_cursor(0, bus_pb2.EventFilter(), 10_000)}
    by_cursor = dict(zip(sorted(stored), rows, strict=True))
    with_text = 0
    for _ in range(400):
        flt = random_filter(pick, rows)
        expected = sorted(c for c, (agent, row) in by_cursor.items() if matches(flt, agent, row))
        assert [e.cursor for e in store.after_cursor(0, flt, 10_000)] == expected, flt
        newest_first = sorted(expected, key=lambda c: (stored[c].event.ts_ns, c), reverse=True)
        assert paged(store, flt) == newest_first, flt
        resumed = store.after_cursor(expected[len(expected) // 2], flt, 10_000) if expected else []
        assert [e.cursor for e in resumed] == expected[len(expected) // 2 + 1 :], flt
        with_text += bool(flt.text and expected)
    assert with_text > 150  # most filters found something through the text
    store.close()
