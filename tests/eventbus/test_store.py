"""The SQLite store: retention by age and by size, keyset paging, reopening, and text search on its index."""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path

import pytest

from amoskys.eventbus.rows import EventRow, to_row
from amoskys.eventbus.store import INSERT_EVENT, SCHEMA, AcceptedEnvelope, ChainRecord, SqliteStore
from amoskys.v1 import bus_pb2, events_pb2
from tests.hubfixture import make_events


def fill(store: SqliteStore, batches: int, per_batch: int, received_ns: int, agent: str = "a") -> None:
    for n in range(batches):
        rows = [to_row(e) for e in make_events(per_batch, start=n * per_batch)]
        chain = ChainRecord(b"c" * 16, n + 1, bytes(32))
        store.commit(
            [AcceptedEnvelope(agent, b"c" * 16, n + 1, bytes([n % 256]) * 32, rows)], {agent: chain}, received_ns
        )


def test_retention_by_age_keeps_the_recent(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "events.db")
    now = time.time_ns()
    fill(store, 3, 100, now - 10 * 86400 * 10**9, agent="old")
    fill(store, 2, 100, now, agent="new")
    deleted = store.prune(now - 86400 * 10**9, max_bytes=10**12)
    assert deleted == 300
    remaining = store.after_cursor(0, bus_pb2.EventFilter(), 1000)
    assert {s.agent_id for s in remaining} == {"new"}
    assert len(remaining) == 200


def test_retention_by_size_drops_the_oldest_first(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "events.db")
    fill(store, 40, 500, time.time_ns())
    full = store.size_bytes()
    store.prune(0, max_bytes=full // 3)
    assert store.size_bytes() <= full // 3
    remaining = store.after_cursor(0, bus_pb2.EventFilter(), 100_000)
    assert 0 < len(remaining) < 20_000
    assert remaining[-1].cursor == store.last_cursor()  # the newest survived
    store.close()
    reopened = SqliteStore(tmp_path / "events.db")
    assert reopened.load_chains()["a"].last_seq == 40


def auth_rows(lines: list[str], ts_ns: int) -> list[EventRow]:
    """Rows of sshd log lines as the auth agent sends them (the raw line is the searchable text)."""
    return [
        to_row(events_pb2.Event(host="web1", agent="auth", ts_ns=ts_ns + n, auth=events_pb2.AuthEvent(raw=line)))
        for n, line in enumerate(lines)
    ]


SSHD_LINES = [
    "Failed password for root from 198.51.100.7 port 52311 ssh2",
    "Failed password for invalid user admin from 203.0.113.5 port 40022 ssh2",
    "Accepted publickey for deploy from 192.0.2.10 port 51000 ssh2: ED25519 SHA256:abc",
    'Invalid user "o\'brien" from 192.0.2.66 port 1022',
]


def texts(store: SqliteStore, text: str) -> list[str]:
    events, _ = store.query(bus_pb2.EventFilter(text=text), 100, "")
    return sorted(e.event.auth.raw for e in events)


def check_text_index(store: SqliteStore) -> None:
    """FTS5's own check of the index against the events table (raises when they disagree)."""
    with sqlite3.connect(store.path) as conn:
        conn.execute("INSERT INTO events_fts (events_fts, rank) VALUES ('integrity-check', 1)")


def test_text_search_finds_substrings_through_the_index(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "events.db")
    store.commit([AcceptedEnvelope("a", b"", 0, b"", auth_rows(SSHD_LINES, time.time_ns()))], {}, time.time_ns())
    assert texts(store, "ailed pass") == sorted(SSHD_LINES[:2])  # across a space, mid-word
    assert texts(store, "AILED PASS") == texts(store, "ailed pass")
    assert texts(store, "o'brien\"") == [SSHD_LINES[3]]  # quotes are text, not FTS5 syntax
    assert texts(store, '" OR "') == []
    assert texts(store, "d2") == [SSHD_LINES[2]]  # two characters: no trigram, scanned within the other filters
    assert texts(store, "2") == sorted(SSHD_LINES)
    with sqlite3.connect(store.path) as conn:  # committed with the events, in the same transaction
        indexed = conn.execute('SELECT rowid FROM events_fts WHERE events_fts MATCH \'"ile" AND "ass"\'')
        assert [row[0] for row in indexed] == [1, 2]
    check_text_index(store)


def test_common_words_are_scanned_newest_first(tmp_path: Path) -> None:
    """More candidates than the probe takes: the time-ordered scan answers, with the same meaning."""
    store = SqliteStore(tmp_path / "events.db")
    fill(store, 12, 500, time.time_ns())  # 6,000 processes named bash
    newest, token = store.query(bus_pb2.EventFilter(text="bash"), 50, "")
    assert [e.cursor for e in newest] == list(range(6000, 5950, -1)) and token
    assert len(store.after_cursor(5000, bus_pb2.EventFilter(text="ash"), 10_000)) == 1000
    assert store.query(bus_pb2.EventFilter(text="bash-"), 50, "") == ([], "")


def test_retention_keeps_the_text_index_right(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "events.db")
    now = time.time_ns()
    old = auth_rows([f"{line} old" for line in SSHD_LINES], now)
    store.commit([AcceptedEnvelope("a", b"", 0, b"", old)], {}, now - 10 * 86400 * 10**9)
    store.commit([AcceptedEnvelope("a", b"", 0, b"", auth_rows(SSHD_LINES, now))], {}, now)
    fill(store, 4, 500, now)
    metrics = [to_row(e) for e in make_events(100, agent="host")]  # no searchable text: not in the index
    assert {row.text for row in metrics} == {""}
    store.commit([AcceptedEnvelope("h", b"", 0, b"", metrics)], {}, now - 10 * 86400 * 10**9)
    assert store.prune(now - 86400 * 10**9, max_bytes=10**12) == 104
    check_text_index(store)
    assert texts(store, "ssh2 old") == []
    assert texts(store, "ailed pass") == sorted(SSHD_LINES[:2])
    store.prune(0, max_bytes=store.size_bytes() // 2)  # by size: the oldest, the sshd lines among them
    check_text_index(store)
    assert texts(store, "ailed pass") == []


def test_a_store_from_before_the_index_gets_it_on_open(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "events.db"
    with sqlite3.connect(path) as conn:  # the schema and insert of the store before the text index
        conn.executescript(SCHEMA)
        rows = auth_rows(SSHD_LINES, time.time_ns())
        conn.executemany(INSERT_EVENT, [(n, r.ts_ns, 1, r.host, "a", r.agent, r.kind, r.severity, r.event_id,
                                         r.text, r.body) for n, r in enumerate(rows, 1)])  # fmt: skip
    with caplog.at_level(logging.INFO, logger="amoskys.eventbus.store"):
        store = SqliteStore(path)
    assert [r.getMessage() for r in caplog.records] == ["building the text index", "text index built"]
    assert caplog.records[0].__dict__["events"] == 4
    check_text_index(store)
    assert texts(store, "ailed pass") == sorted(SSHD_LINES[:2])
    store.close()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="amoskys.eventbus.store"):
        SqliteStore(path).close()
    assert caplog.records == []  # built once


def test_text_index_none_drops_it_and_search_still_works(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    SqliteStore(path).close()
    store = SqliteStore(path, text_index="none")
    store.commit([AcceptedEnvelope("a", b"", 0, b"", auth_rows(SSHD_LINES, time.time_ns()))], {}, time.time_ns())
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT name FROM sqlite_schema WHERE name LIKE 'events_fts%'").fetchall() == []
    assert texts(store, "ailed pass") == sorted(SSHD_LINES[:2])
    store.close()
    store = SqliteStore(path)  # and back: built from the rows stored meanwhile
    check_text_index(store)
    assert texts(store, "ailed pass") == sorted(SSHD_LINES[:2])


def test_a_rare_needle_is_looked_up_by_id_whatever_the_other_filters(tmp_path: Path) -> None:
    """With host and kind filters SQLite would rather scan their (column, time) index: the store forbids it."""
    store = SqliteStore(tmp_path / "events.db")
    store.commit([AcceptedEnvelope("a", b"", 0, b"", auth_rows(SSHD_LINES, time.time_ns()))], {}, time.time_ns())
    flt = bus_pb2.EventFilter(since_ns=1, hosts=["web1"], kinds=["auth", "process"], text="ailed pass")
    conn = sqlite3.connect(store.path)
    source, clauses, params = store._filter(conn, flt)
    sql = f"EXPLAIN QUERY PLAN SELECT id FROM {source} WHERE {' AND '.join(clauses)} ORDER BY ts_ns DESC"
    plan = [row[3] for row in conn.execute(sql, params)]
    assert plan[0] == "SEARCH events USING INTEGER PRIMARY KEY (rowid=?)", plan
    assert texts(store, "ailed pass") == sorted(SSHD_LINES[:2])
    conn.close()
