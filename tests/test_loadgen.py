"""The load generator's in-memory outbox: the chain the publisher sends, acks, restarts, dead letters."""

from __future__ import annotations

import io

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from amoskys import keys
from amoskys.agents.runtime.identity import load_signer
from amoskys.envelope import GENESIS_HASH, decode_header, envelope_digest, verify_signature
from amoskys.loadgen import MemoryOutbox, synthetic_events
from amoskys.v1 import envelope_pb2, events_pb2
from tests.conftest import TestPki

AGENT = "web00000-proc"


def filled(test_pki: TestPki, envelopes: int) -> tuple[MemoryOutbox, io.StringIO, Ed25519PrivateKey]:
    path = test_pki.signing_key(AGENT)
    ack_log = io.StringIO()
    outbox = MemoryOutbox(AGENT, load_signer(path), ack_log)
    for n in range(envelopes):
        outbox.seal(synthetic_events(outbox.event_prefix, "web00000", n * 10, 10), 10, n * 10)
    return outbox, ack_log, keys.load_signing_key(path)


def assert_chain(outbox: MemoryOutbox, signing: Ed25519PrivateKey, first_events: list[int]) -> None:
    """Seq 1, 2, ... of one chain, each signed and linked to the one before, holding these events."""
    prev = GENESIS_HASH
    for seq, (sealed, first) in enumerate(outbox.held, start=1):
        envelope = envelope_pb2.Envelope.FromString(sealed.raw)
        header = decode_header(envelope)
        verify_signature(envelope, signing.public_key())
        assert (header.seq, header.chain_id, header.prev_hash) == (seq, outbox.chain.chain_id, prev)
        assert (sealed.seq, sealed.chain_id) == (seq, outbox.chain.chain_id)
        events = events_pb2.EventBatch.FromString(envelope.payload).events
        assert [e.event_id for e in events] == [f"{outbox.event_prefix}:{first + i}" for i in range(10)]
        assert all((e.host, e.agent) == ("web00000", "proc") for e in events)
        prev = envelope_digest(envelope.header, envelope.payload)
    assert [first for _, first in outbox.held] == first_events


def test_acks_forget_in_order_and_log_the_events(test_pki: TestPki) -> None:
    outbox, ack_log, signing = filled(test_pki, 4)
    assert_chain(outbox, signing, [0, 10, 20, 30])
    assert [e.seq for e in outbox.unacked(after_seq=1, limit=2)] == [2, 3]
    assert outbox.ack(2, outbox.chain.chain_id) == 20
    assert outbox.ack(2, b"another chain") == 0
    assert [e.seq for e in outbox.unacked()] == [3, 4]
    assert ack_log.getvalue() == f"{outbox.event_prefix} 1 0 10\n{outbox.event_prefix} 2 10 10\n"
    assert outbox.sent_envelopes == 4


def test_restart_reseals_what_is_held_as_a_new_chain(test_pki: TestPki) -> None:
    outbox, _, signing = filled(test_pki, 3)
    old_chain = outbox.chain.chain_id
    outbox.restart_chain()
    assert outbox.chain.chain_id != old_chain
    assert_chain(outbox, signing, [0, 10, 20])
    assert outbox.ack(3, old_chain) == 0  # an ack for the old chain forgets nothing
    assert len(outbox.held) == 3


def test_dead_letter_drops_that_envelope_and_restarts_the_chain(test_pki: TestPki) -> None:
    outbox, _, signing = filled(test_pki, 3)
    outbox.dead_letter(2, "bad event")
    assert outbox.dead_letters == 1
    assert_chain(outbox, signing, [0, 20])
