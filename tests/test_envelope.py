"""Envelope signing: the signed form is pinned, every byte is covered, the chain links."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from amoskys import envelope
from amoskys.errors import VerificationError
from amoskys.v1 import envelope_pb2, events_pb2

GOLDEN_KEY_SEED = bytes(range(32))
GOLDEN_HEADER = bytes.fromhex(
    "08011209776562312d70726f6318072220ababababababababababababababababababababababababababab"
    "ababababab288080a8b1e39fe7cb173210000102030405060708090a0b0c0d0e0f3801"
)
GOLDEN_PAYLOAD = bytes.fromhex(
    "0a590a203030313132323333343435353636373738383939616162626363646465656666108080a8b1e39fe7"
    "cb171a0477656231220470726f632802521d080210922118012204737368642a0e2f7573722f7362696e2f73"
    "736864"
)
GOLDEN_SIG = bytes.fromhex(
    "85a5cbce21bfa01edc8a83c8d14825cac63bc7340d0ae932262c97889b0cb34e"
    "f75ddbd4a2f1498f7657c418754c67298c36859e7b033e29543da14cb191440c"
)
GOLDEN_DIGEST = bytes.fromhex("4bb7c4763385a5d4f151e72f261dbdd6ca932b4b667feadb9f86c9b0db59118c")


@pytest.fixture
def golden_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(GOLDEN_KEY_SEED)


def test_golden_vector_pins_the_signed_form(golden_key: Ed25519PrivateKey) -> None:
    message = envelope.signing_message(GOLDEN_HEADER, GOLDEN_PAYLOAD)
    assert golden_key.sign(message) == GOLDEN_SIG
    assert envelope.envelope_digest(GOLDEN_HEADER, GOLDEN_PAYLOAD) == GOLDEN_DIGEST
    golden = envelope_pb2.Envelope(header=GOLDEN_HEADER, payload=GOLDEN_PAYLOAD, sig=GOLDEN_SIG)
    envelope.verify_signature(golden, golden_key.public_key())


def test_golden_header_and_payload_decode_to_the_documented_values() -> None:
    golden = envelope_pb2.Envelope(header=GOLDEN_HEADER, payload=GOLDEN_PAYLOAD, sig=GOLDEN_SIG)
    header = envelope.decode_header(golden)
    assert (header.version, header.agent_id, header.seq, header.event_count) == (1, "web1-proc", 7, 1)
    batch = events_pb2.EventBatch.FromString(GOLDEN_PAYLOAD)
    assert batch.events[0].process.exe == "/usr/sbin/sshd"


@pytest.mark.parametrize("field", ["header", "payload", "sig"])
def test_any_single_byte_tampered_fails(golden_key: Ed25519PrivateKey, field: str) -> None:
    original = {"header": GOLDEN_HEADER, "payload": GOLDEN_PAYLOAD, "sig": GOLDEN_SIG}
    for index in range(len(original[field])):
        for flip in (0x01, 0x80):
            mutated = bytearray(original[field])
            mutated[index] ^= flip
            parts = dict(original, **{field: bytes(mutated)})
            with pytest.raises(VerificationError):
                envelope.verify_signature(envelope_pb2.Envelope(**parts), golden_key.public_key())


def test_moving_bytes_between_header_and_payload_fails(golden_key: Ed25519PrivateKey) -> None:
    shifted = envelope_pb2.Envelope(
        header=GOLDEN_HEADER + GOLDEN_PAYLOAD[:1], payload=GOLDEN_PAYLOAD[1:], sig=GOLDEN_SIG
    )
    with pytest.raises(VerificationError):
        envelope.verify_signature(shifted, golden_key.public_key())


def test_another_key_fails(golden_key: Ed25519PrivateKey) -> None:
    golden = envelope_pb2.Envelope(header=GOLDEN_HEADER, payload=GOLDEN_PAYLOAD, sig=GOLDEN_SIG)
    with pytest.raises(VerificationError):
        envelope.verify_signature(golden, Ed25519PrivateKey.generate().public_key())


def test_seal_builds_a_linked_chain(golden_key: Ed25519PrivateKey) -> None:
    start = envelope.ChainState.fresh()
    batch = events_pb2.EventBatch(events=[events_pb2.Event(event_id="a", host="h")])
    first, after_first = envelope.seal("agent-1", batch, start, golden_key)
    second, chain = envelope.seal("agent-1", batch, after_first, golden_key)
    h1, h2 = envelope.decode_header(first), envelope.decode_header(second)
    assert (h1.seq, h2.seq) == (1, 2)
    assert h1.prev_hash == envelope.GENESIS_HASH
    assert h2.prev_hash == envelope.envelope_digest(first.header, first.payload)
    assert h1.chain_id == h2.chain_id == chain.chain_id
    assert h1.event_count == 1
    assert (chain.last_seq, chain.last_hash) == (2, envelope.envelope_digest(second.header, second.payload))
    assert (start.last_seq, start.last_hash) == (0, envelope.GENESIS_HASH)  # seal() leaves its argument alone
    again, _ = envelope.seal("agent-1", batch, start, golden_key)
    assert envelope.decode_header(again).seq == 1
    for sealed in (first, second):
        envelope.verify_signature(sealed, golden_key.public_key())


def test_malformed_header_is_a_verification_error() -> None:
    with pytest.raises(VerificationError, match="malformed header"):
        envelope.decode_header(envelope_pb2.Envelope(header=b"\xff\xff\xff"))
