"""The SQLite store: retention by age and by size, keyset paging, and reopening."""

from __future__ import annotations

import time
from pathlib import Path

from amoskys.eventbus.rows import to_row
from amoskys.eventbus.store import AcceptedEnvelope, ChainRecord, SqliteStore
from amoskys.v1 import bus_pb2
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
