"""The outbox: chain persisted, payloads exact, bounds explicit and counted, dead letters kept."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from amoskys import keys
from amoskys.agents.runtime.outbox import Outbox, OutboxError
from amoskys.config import OutboxConfig
from amoskys.envelope import decode_header, envelope_digest, verify_signature
from amoskys.v1 import envelope_pb2, events_pb2
from tests.conftest import small_tmpfs
from tests.hubfixture import make_events


def bodies(count: int, start: int = 0, host: str = "h") -> list[bytes]:
    return [e.SerializeToString() for e in make_events(count, host=host, start=start)]


def open_outbox(tmp_path: Path, **config: object) -> Outbox:
    key_path = tmp_path / "sign.key"
    if not key_path.exists():
        keys.write_private_key(key_path, keys.generate_signing_key())
    return Outbox(tmp_path / "outbox.db", OutboxConfig(**config), "agent-1", keys.load_signing_key(key_path))  # type: ignore[arg-type]


def test_seal_builds_a_signed_chain_that_survives_reopening(tmp_path: Path) -> None:
    box = open_outbox(tmp_path)
    box.add(bodies(5))
    first, _ = box.seal(3)
    second, _ = box.seal(3)
    assert first is not None and second is not None
    assert (first.seq, first.events, second.seq, second.events) == (1, 3, 2, 2)
    env1, env2 = (envelope_pb2.Envelope.FromString(e.raw) for e in (first, second))
    public = keys.load_signing_key(tmp_path / "sign.key").public_key()
    verify_signature(env2, public)
    assert decode_header(env2).prev_hash == envelope_digest(env1.header, env1.payload)
    batch = events_pb2.EventBatch.FromString(env1.payload)
    assert [e.event_id for e in batch.events] == ["h-proc-0", "h-proc-1", "h-proc-2"]
    box.close()
    reopened = open_outbox(tmp_path)
    assert [e.seq for e in reopened.unacked()] == [1, 2]
    reopened.add(bodies(1, start=9))
    third, _ = reopened.seal(10)
    assert third is not None
    assert decode_header(envelope_pb2.Envelope.FromString(third.raw)).prev_hash == envelope_digest(
        env2.header, env2.payload
    )
    assert reopened.ack(2, bytes(16)) == 0  # an ack for another chain forgets nothing
    assert reopened.ack(2, reopened.chain.chain_id) == 5
    assert [e.seq for e in reopened.unacked()] == [3]


def test_state_is_saved_with_its_events(tmp_path: Path) -> None:
    box = open_outbox(tmp_path)
    box.add(bodies(2), {"auth.position": "12:345"})
    box.close()
    assert open_outbox(tmp_path).state() == {"auth.position": "12:345"}


def held_ids(box: Outbox) -> list[str]:
    """Every event the outbox holds, oldest first: the sealed envelopes' payloads, then unsealed events."""
    ids = []
    for sealed in box.unacked(limit=100_000):
        payload = envelope_pb2.Envelope.FromString(sealed.raw).payload
        ids += [e.event_id for e in events_pb2.EventBatch.FromString(payload).events]
    for (body,) in box.db.execute("SELECT body FROM events ORDER BY id"):
        ids.append(events_pb2.Event.FromString(body).event_id)
    return ids


def stored_bytes(path: Path) -> int:
    """What the file holds, read independently of the outbox: every BLOB and TEXT value in every table."""
    db = sqlite3.connect(path)
    total = 0
    for (table,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
        for column in db.execute(f"SELECT name FROM pragma_table_info('{table}')").fetchall():
            total += db.execute(
                f"SELECT coalesce(sum(length(CAST({column[0]} AS BLOB))), 0) FROM {table} "
                f"WHERE typeof({column[0]}) IN ('blob', 'text')"
            ).fetchone()[0]
    db.close()
    return total


def test_drop_oldest_when_full_is_counted(tmp_path: Path) -> None:
    size = len(bodies(1, start=10)[0])  # ids 10..24: every body has the same size
    box = open_outbox(tmp_path, max_bytes=size * 10)
    box.add(bodies(8, start=10))
    dropped = box.add(bodies(5, start=20)).dropped
    assert dropped == 3
    assert box.counter("dropped") == 3
    assert held_ids(box) == [f"h-proc-{i}" for i in (*range(13, 18), *range(20, 25))]


def test_outage_with_sealed_envelopes_keeps_the_newest_within_the_bound(tmp_path: Path) -> None:
    """50 rounds of collect-then-seal while the hub is down, into 10,000 bytes: the oldest rounds go.

    Every round is 5 events of 47 bytes sealed into a 393-byte envelope, so 25 envelopes fit (9,825
    bytes); each round's 5 new events push the total over and the oldest envelope goes (the chain is
    re-sealed from seq 1). The newest 25 rounds survive: events 1125..1249, 125 dropped and counted.
    """
    box = open_outbox(tmp_path, max_bytes=10_000)
    dropped = 0
    for round_ in range(50):
        dropped += box.add(bodies(5, start=1000 + round_ * 5)).dropped
        assert box.used_bytes <= 10_000
        _, framing_drops = box.seal(500)
        dropped += framing_drops
        assert box.used_bytes <= 10_000
    assert {len(b) for b in bodies(250, start=1000)} == {47}
    assert [len(e.raw) for e in box.unacked(limit=100)] == [393] * 25
    assert held_ids(box) == [f"h-proc-{i}" for i in range(1125, 1250)]
    assert dropped == box.counter("dropped") == 125
    assert [e.seq for e in box.unacked(limit=100)] == list(range(1, 26))
    first = envelope_pb2.Envelope.FromString(box.unacked(limit=1)[0].raw)
    assert decode_header(first).prev_hash == bytes(32)  # a chain the hub can start again
    box.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert stored_bytes(box.path) - stored_bytes_outside_bound(box) == box.used_bytes == 9825
    assert (tmp_path / "outbox.db-wal").stat().st_size == 0


def test_dropped_envelopes_are_resealed_once_before_they_are_sent_even_after_a_restart(tmp_path: Path) -> None:
    box = open_outbox(tmp_path)
    box.add(bodies(9, start=10))
    for _ in range(3):
        box.seal(3)
    bound = box.used_bytes + 3 * len(bodies(1, start=10)[0]) - 1  # three more events are one byte too many
    box.close()
    box = open_outbox(tmp_path, max_bytes=bound)
    old_chain = box.chain.chain_id
    assert box.add(bodies(3, start=20)).dropped == 3  # the oldest envelope goes: the chain has a gap now
    box.close()  # e.g. kill -9 before anything was sent
    box = open_outbox(tmp_path, max_bytes=bound)
    sealed = box.unacked()
    assert [e.seq for e in sealed] == [1, 2]
    assert {e.chain_id for e in sealed} == {box.chain.chain_id} != {old_chain}
    first, second = (envelope_pb2.Envelope.FromString(e.raw) for e in sealed)
    assert decode_header(first).prev_hash == bytes(32)
    assert decode_header(second).prev_hash == envelope_digest(first.header, first.payload)
    assert held_ids(box) == [f"h-proc-{i}" for i in (*range(13, 19), 20, 21, 22)]


def stored_bytes_outside_bound(box: Outbox) -> int:
    """Bookkeeping the bound does not cover: the chain row, counters and agent positions."""
    row = box.db.execute(
        "SELECT (SELECT coalesce(sum(length(chain_id) + length(last_hash)), 0) FROM chain)"
        " + (SELECT coalesce(sum(length(name)), 0) FROM counters)"
        " + (SELECT coalesce(sum(length(key) + length(value)), 0) FROM state)"
        " + (SELECT coalesce(sum(length(chain_id) + length(reason)), 0) FROM dead_letters)"
        " + (SELECT coalesce(sum(length(chain_id)), 0) FROM envelopes)"
    ).fetchone()
    return int(row[0])


def test_sealing_makes_room_for_its_framing_from_the_events_it_seals(tmp_path: Path) -> None:
    size = len(bodies(1, start=10)[0])
    box = open_outbox(tmp_path, max_bytes=size * 10)
    box.add(bodies(10, start=10))
    envelope, dropped = box.seal(100)
    assert envelope is not None
    assert dropped == 10 - envelope.events > 0
    assert box.used_bytes == len(envelope.raw) <= size * 10
    assert held_ids(box) == [f"h-proc-{i}" for i in range(10 + dropped, 20)]  # the oldest went
    assert box.counter("dropped") == dropped


def test_dead_letters_count_against_the_bound_and_go_first(tmp_path: Path) -> None:
    box = open_outbox(tmp_path)
    box.add(bodies(4, start=10))
    box.seal(2)
    box.seal(2)
    box.dead_letter(1, "INVALID: test")
    held = box.used_bytes
    assert held == stored_bytes(box.path) - stored_bytes_outside_bound(box)
    box.close()
    size = len(bodies(1, start=10)[0])
    box = open_outbox(tmp_path, max_bytes=held + size)  # room for one more event
    assert box.add(bodies(1, start=20)).dropped == 0
    assert box.add(bodies(1, start=21)).dropped == 2  # the dead letter's two events
    assert box.dead_letter_count() == 1
    assert box.db.execute("SELECT count(*) FROM dead_letters").fetchone()[0] == 0
    assert held_ids(box) == ["h-proc-12", "h-proc-13", "h-proc-20", "h-proc-21"]


def test_aged_data_goes_wherever_it_is_held(tmp_path: Path) -> None:
    box = open_outbox(tmp_path)
    box.add(bodies(4, start=10))
    box.seal(2)
    box.db.execute("UPDATE events SET created_ns = 1")
    box.db.execute("UPDATE envelopes SET created_ns = 1")
    box.close()
    box = open_outbox(tmp_path, max_age_days=1)
    assert box.add(bodies(1, start=20)).dropped == 4
    assert held_ids(box) == ["h-proc-20"]
    assert box.used_bytes == stored_bytes(box.path) - stored_bytes_outside_bound(box)


def test_an_outbox_with_payload_copies_loses_them_on_open(tmp_path: Path) -> None:
    box = open_outbox(tmp_path)
    box.add(bodies(3, start=10))
    box.seal(3)
    box.db.execute("ALTER TABLE envelopes ADD COLUMN payload BLOB NOT NULL DEFAULT x'00'")
    box.close()
    reopened = open_outbox(tmp_path)
    columns = [row[1] for row in reopened.db.execute("PRAGMA table_info(envelopes)")]
    assert "payload" not in columns
    assert held_ids(reopened) == ["h-proc-10", "h-proc-11", "h-proc-12"]


def test_drop_newest_when_full_is_counted(tmp_path: Path) -> None:
    size = len(bodies(1)[0])
    box = open_outbox(tmp_path, max_bytes=size * 4, when_full="drop_newest")
    assert box.add(bodies(4)).dropped == 0
    assert box.add(bodies(2, start=50)) == (0, 2)
    assert box.counter("dropped") == 2
    assert box.take_counter("dropped") == 2
    assert box.counter("dropped") == 0
    assert box.pending_events()[0] == 4


def test_dead_letter_keeps_the_envelope_and_restarts_the_chain(tmp_path: Path) -> None:
    box = open_outbox(tmp_path)
    box.add(bodies(6))
    for _ in range(3):
        box.seal(2)
    old_chain = box.chain.chain_id
    before = [(e.seq, len(e.raw)) for e in box.unacked()]
    box.dead_letter(2, "INVALID: test")
    assert box.dead_letter_count() == 1
    remaining = box.unacked()
    assert [e.seq for e in remaining] == [1, 2]  # envelopes 1 and 3, resealed on a new chain
    assert box.chain.chain_id != old_chain
    first = envelope_pb2.Envelope.FromString(remaining[0].raw)
    assert decode_header(first).prev_hash == bytes(32)
    assert {e.event_id for e in events_pb2.EventBatch.FromString(first.payload).events} == {"h-proc-0", "h-proc-1"}
    assert held_ids(box) == ["h-proc-0", "h-proc-1", "h-proc-4", "h-proc-5"]
    assert box.used_bytes == sum(size for _, size in before)  # the dead letter counts too


def test_a_corrupt_sealed_envelope_is_a_clear_error_and_changes_nothing(tmp_path: Path) -> None:
    box = open_outbox(tmp_path)
    box.add(bodies(6))
    for _ in range(3):
        box.seal(2)
    box.db.execute("UPDATE envelopes SET raw = x'ffff' WHERE seq = 3")
    box.close()
    box = open_outbox(tmp_path)
    used, chain = box.used_bytes, box.chain
    with pytest.raises(OutboxError, match="sealed envelope 3 is corrupt"):
        box.dead_letter(1, "INVALID: test")
    assert [e.seq for e in box.unacked()] == [1, 2, 3]
    assert (box.used_bytes, box.chain, box.dead_letter_count()) == (used, chain, 0)
    assert box.add(bodies(1, start=9)).stored == 1  # still writable: the transaction was rolled back


@pytest.mark.root
def test_full_disk_is_a_clear_error_and_loses_nothing_already_stored(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "small", "1m") as mount:
        box = open_outbox(mount)
        stored = 0
        with pytest.raises(OutboxError, match="full"):
            for i in range(10_000):
                box.add(bodies(50, start=i * 50))
                stored += 50
        assert box.pending_events()[0] == stored
        box.close()
