"""Large commits written in parts (`SqliteStore.commit_parts`): nothing of one shows, counts or survives a
crash before its last part; light agents' envelopes are committed between the parts; cursors stay in order."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from amoskys.eventbus.rows import to_row
from amoskys.eventbus.store import AcceptedEnvelope, ChainRecord, SqliteStore
from amoskys.v1 import bus_pb2, envelope_pb2
from tests.conftest import TestPki
from tests.eventbus.test_fairness import _hub
from tests.hostile.client import subscribe
from tests.hostile.hub import HubProcess, new_pki
from tests.hubfixture import make_events

OK = envelope_pb2.PublishAck.OK
CHAIN = b"c" * 16
EVERYTHING = bus_pb2.EventFilter()


def _envelope(agent_id: str, count: int, start: int = 0) -> tuple[AcceptedEnvelope, dict[str, ChainRecord]]:
    rows = [to_row(e) for e in make_events(count, agent=agent_id, start=start)]
    return AcceptedEnvelope(agent_id, CHAIN, 1, agent_id.encode() * 4, rows), {
        agent_id: ChainRecord(CHAIN, 1, agent_id.encode() * 4)
    }


def _text_index_agrees(path: Path) -> None:
    """FTS5's own check of the text index against the events table (raises when they disagree)."""
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO events_fts (events_fts, rank) VALUES ('integrity-check', 1)")


def _pending(path: Path) -> list[tuple[int, int]]:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        return conn.execute("SELECT first_id, last_id FROM pending_parts").fetchall()


def test_a_commit_in_parts_shows_nothing_until_its_last_part(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "events.db")
    try:
        big, big_chain = _envelope("big", 25)
        small, small_chain = _envelope("small", 3)
        parts = store.commit_parts([big], big_chain, time.time_ns(), part_events=10)
        next(parts)  # the first part (10 events) is committed
        assert store.query(EVERYTHING, 100, "") == ([], "")
        assert (store.after_cursor(0, EVERYTHING, 100), store.last_cursor()) == ([], 0)
        assert (store.load_chains(), store.stored_digest("big", CHAIN, 1)) == ({}, None)
        store.commit([small], small_chain, time.time_ns())  # a light envelope between the parts
        assert small.first_cursor == big.first_cursor + 25  # after the whole reserved range
        assert [s.agent_id for s in store.query(EVERYTHING, 100, "")[0]] == ["small"] * 3  # acked: it shows
        assert store.after_cursor(0, EVERYTHING, 100) == []  # replay stops before what is still in parts
        assert store.last_cursor() == 0
        assert list(parts) == [None]  # the second part, then the last
        replayed = store.after_cursor(0, EVERYTHING, 100)
        assert [s.cursor for s in replayed] == list(range(1, 29))
        assert [s.event.event_id for s in replayed] == [r.event_id for r in big.rows] + [r.event_id for r in small.rows]
        assert len(store.query(EVERYTHING, 100, "")[0]) == 28
        assert store.last_cursor() == 28 and store.load_chains().keys() == {"big", "small"}
        assert store.stored_digest("big", CHAIN, 1) == big.digest
        assert _pending(store.path) == []
        _text_index_agrees(store.path)
    finally:
        store.close()


CRASHING_WRITER = """
import sys, time
from pathlib import Path
from amoskys.eventbus.rows import to_row
from amoskys.eventbus.store import AcceptedEnvelope, ChainRecord, SqliteStore
from amoskys.v1 import events_pb2
rows = [to_row(events_pb2.Event(event_id=f"e{n}", ts_ns=time.time_ns(), host="web1", agent="proc")) for n in range(100)]
store = SqliteStore(Path(sys.argv[1]))
parts = store.commit_parts(
    [AcceptedEnvelope("a", b"c" * 16, 1, b"d" * 32, rows)], {"a": ChainRecord(b"c" * 16, 1, b"d" * 32)}, 1, 10
)
next(parts), next(parts)
print("between parts", flush=True)
time.sleep(60)
"""


def test_a_store_opened_after_a_crash_between_parts_deletes_them(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    SqliteStore(path).close()
    writer = subprocess.Popen([sys.executable, "-c", CRASHING_WRITER, str(path)], stdout=subprocess.PIPE)
    try:
        assert writer.stdout is not None and writer.stdout.readline() == b"between parts\n"
        writer.send_signal(signal.SIGKILL)
    finally:
        writer.kill()
        writer.wait()
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 20  # two parts were committed
    assert _pending(path) == [(1, 100)]
    store = SqliteStore(path)  # the open deletes them
    try:
        assert (store.count_events(), store.load_chains(), _pending(path)) == (0, {}, [])
        _text_index_agrees(path)
        again, chain = _envelope("a", 100)  # the agent sends it again: stored once
        assert list(store.commit_parts([again], chain, time.time_ns(), part_events=10)) == [None] * 9
        assert len({s.event.event_id for s in store.query(EVERYTHING, 1000, "")[0]}) == 100
        _text_index_agrees(path)
    finally:
        store.close()


async def test_light_envelopes_are_acked_between_parts_and_subscribers_get_cursor_order(
    test_pki: TestPki, tmp_path: Path
) -> None:
    async with _hub(test_pki, tmp_path, backpressure={"commit_part_events": 5}) as live:
        big_agent, small_agent = live.agent("web1-proc"), live.agent("db1-proc")
        async with live.channel(live.consumer_tls()) as channel:
            stream = subscribe(channel, bus_pb2.SubscribeRequest(filter=EVERYTHING))
            big = asyncio.create_task(live.publish(big_agent, big_agent.seal(make_events(4000))))
            store = Path(live.config.store.path)
            while not _pending(store):
                await asyncio.sleep(0.005)
            small = await live.publish(small_agent, small_agent.seal(make_events(10, host="db1")))
            assert small.status == OK and not big.done()  # acked while the large commit is in parts
            assert (await big).status == OK
            received = [await asyncio.wait_for(stream.read(), 10) for _ in range(4010)]
            stream.cancel()
        cursors = [s.cursor for s in received]
        assert cursors == sorted(cursors) and len(set(cursors)) == 4010
        assert [s.agent_id for s in received] == ["web1-proc"] * 4000 + ["db1-proc"] * 10
        assert [s.event.event_id for s in received[:4000]] == [f"web1-proc-{n}" for n in range(4000)]
        assert cursors[3999] - cursors[0] == 3999  # one envelope, contiguous ids
        queried = {s.cursor: s.event.event_id for s in await live.query(EVERYTHING)}
        assert queried == {s.cursor: s.event.event_id for s in received}


async def test_kill_9_between_parts_then_the_resent_envelope_is_stored_once(tmp_path: Path) -> None:
    hub = HubProcess(tmp_path / "hub", new_pki(tmp_path / "pki"), backpressure={"commit_part_events": 2})
    agent = hub.enrol("web1-proc", "web1", "proc")
    store = tmp_path / "hub" / "store" / "events.db"
    try:
        hub.start()
        envelope = agent.seal(agent.events(1000, "parted"))  # 500 parts: a kill between two is sure
        publish = asyncio.create_task(agent.publish(hub.address, envelope, timeout=120))
        while not _pending(store):
            await asyncio.sleep(0.005)
        assert hub.proc is not None
        hub.proc.send_signal(signal.SIGKILL)
        hub.proc.wait()
        with pytest.raises(grpc.aio.AioRpcError):
            await publish
        assert _pending(store)
        hub.log.unlink()  # the new process's log only
        hub.start()
        assert [
            e for e in hub.entries() if e.get("msg") == "deleted the events of a commit cut short between its parts"
        ]
        ack = await agent.publish(hub.address, envelope, timeout=120)  # the agent sends it again, the same bytes
        assert (ack.status, ack.reason_code, ack.acked_seq) == (OK, envelope_pb2.PublishAck.REASON_UNSPECIFIED, 1)
        stored = await hub.consumer().marked("parted")
        assert len(stored) == len({s.event.event_id for s in stored}) == 1000
        assert _pending(store) == []
        _text_index_agrees(store)
    finally:
        hub.stop()
