"""The outbox: chain persisted, payloads exact, bounds explicit and counted, dead letters kept."""

from __future__ import annotations

from pathlib import Path

import pytest

from amoskys import keys
from amoskys.agents.outbox import Outbox, OutboxError
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
    first = box.seal(3)
    second = box.seal(3)
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
    third = reopened.seal(10)
    assert third is not None
    assert decode_header(envelope_pb2.Envelope.FromString(third.raw)).prev_hash == envelope_digest(
        env2.header, env2.payload
    )
    assert reopened.ack(2) == 5
    assert [e.seq for e in reopened.unacked()] == [3]


def test_state_is_saved_with_its_events(tmp_path: Path) -> None:
    box = open_outbox(tmp_path)
    box.add(bodies(2), {"auth.position": "12:345"})
    box.close()
    assert open_outbox(tmp_path).state() == {"auth.position": "12:345"}


def test_drop_oldest_when_full_is_counted(tmp_path: Path) -> None:
    size = len(bodies(1, start=10)[0])  # ids 10..24: every body has the same size
    box = open_outbox(tmp_path, max_bytes=size * 10)
    box.add(bodies(8, start=10))
    dropped = box.add(bodies(5, start=20))
    assert dropped == 3
    assert box.counter("dropped") == 3
    envelope = box.seal(100)
    assert envelope is not None
    ids = [
        e.event_id
        for e in events_pb2.EventBatch.FromString(envelope_pb2.Envelope.FromString(envelope.raw).payload).events
    ]
    assert ids[0] == "h-proc-13"
    assert ids[-1] == "h-proc-24"


def test_drop_newest_when_full_is_counted(tmp_path: Path) -> None:
    size = len(bodies(1)[0])
    box = open_outbox(tmp_path, max_bytes=size * 4, when_full="drop_newest")
    assert box.add(bodies(4)) == 0
    assert box.add(bodies(2, start=50)) == 2
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
    box.dead_letter(2, "INVALID: test")
    assert box.dead_letter_count() == 1
    remaining = box.unacked()
    assert [e.seq for e in remaining] == [1, 2]  # envelopes 1 and 3, resealed on a new chain
    assert box.chain.chain_id != old_chain
    first = envelope_pb2.Envelope.FromString(remaining[0].raw)
    assert decode_header(first).prev_hash == bytes(32)
    assert {e.event_id for e in events_pb2.EventBatch.FromString(first.payload).events} == {"h-proc-0", "h-proc-1"}


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
