"""Envelope signing, verification and the per-agent hash chain.

The signed form is fixed bytes, never a re-serialization:

    message = DOMAIN || u32be(len(header)) || header || payload
    sig     = Ed25519(signing_key, message)
    digest  = SHA-256(message)          (chains envelopes: header.prev_hash = digest of seq-1)

`header` is a serialized EnvelopeHeader and `payload` a serialized EventBatch, both exactly as
carried in the Envelope. The length prefix makes the header/payload boundary unambiguous.
"""

from __future__ import annotations

import hashlib
import os
import struct
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Protocol

from google.protobuf.message import DecodeError
from nacl.bindings import crypto_sign_BYTES
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from amoskys.errors import VerificationError
from amoskys.v1 import envelope_pb2, events_pb2

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

__all__ = [
    "GENESIS_HASH",
    "PROTOCOL_VERSION",
    "ChainState",
    "Sealed",
    "decode_header",
    "envelope_digest",
    "new_chain_id",
    "reason_label",
    "seal",
    "signing_message",
    "verify_signature",
]

PROTOCOL_VERSION = 1
DOMAIN = b"AMOSKYS-ENVELOPE-V1\x00"
GENESIS_HASH = bytes(32)
CHAIN_ID_BYTES = 16


def signing_message(header: bytes, payload: bytes) -> bytes:
    """The exact bytes that are signed and hashed."""
    return DOMAIN + struct.pack(">I", len(header)) + header + payload


def envelope_digest(header: bytes, payload: bytes) -> bytes:
    """SHA-256 of the signing message: the envelope's identity in the hash chain."""
    return hashlib.sha256(signing_message(header, payload)).digest()


def reason_label(code: int) -> str:
    """A PublishAck reason's short name, as metrics label it and the ack's text starts with:
    REASON_BAD_SEQ -> "bad_seq"; a value this version does not know -> "reason_<number>"."""
    try:
        name = envelope_pb2.PublishAck.Reason.Name(code)  # type: ignore[arg-type]
    except ValueError:
        return f"reason_{code}"
    return name.removeprefix("REASON_").lower()


def new_chain_id() -> bytes:
    return os.urandom(CHAIN_ID_BYTES)


def verify_signature(envelope: envelope_pb2.Envelope, public_key: VerifyKey | Ed25519PublicKey) -> bytes:
    """The envelope's digest (`envelope_digest`); VerificationError unless `sig` is the key's signature
    over header and payload.

    Verified by libsodium (PyNaCl), which the agents sign with: 64 us a signature here against 126 us for
    `cryptography`'s (OpenSSL), and it refuses the non-canonical and small-order encodings RFC 8032 leaves
    open. The hub passes the `VerifyKey` of the agent's enrolment (`keys.Enrolment.verify_key`)."""
    if not isinstance(public_key, VerifyKey):
        public_key = VerifyKey(public_key.public_bytes_raw())
    message = signing_message(envelope.header, envelope.payload)
    if len(envelope.sig) != crypto_sign_BYTES:
        raise VerificationError("bad signature")
    try:
        public_key.verify(message, envelope.sig)
    except BadSignatureError as exc:
        raise VerificationError("bad signature") from exc
    return hashlib.sha256(message).digest()


def decode_header(envelope: envelope_pb2.Envelope) -> envelope_pb2.EnvelopeHeader:
    """Parse the header bytes; structural problems become VerificationError."""
    header = envelope_pb2.EnvelopeHeader()
    try:
        header.ParseFromString(envelope.header)
    except DecodeError as exc:
        raise VerificationError("malformed header") from exc
    return header


class Signer(Protocol):
    """An Ed25519 private key: `cryptography`'s (hub, CLI, tests) or the agent's own signer."""

    def sign(self, data: bytes, /) -> bytes: ...


@dataclass(frozen=True, slots=True)
class ChainState:
    """Where an agent's chain stands: the next envelope gets seq = last_seq + 1."""

    chain_id: bytes
    last_seq: int = 0
    last_hash: bytes = GENESIS_HASH

    @classmethod
    def fresh(cls) -> ChainState:
        return cls(chain_id=new_chain_id())


class Sealed(NamedTuple):
    envelope: envelope_pb2.Envelope
    chain: ChainState  # the chain after it (`chain` given to seal() is left as it was)


def seal(
    agent_id: str,
    batch: events_pb2.EventBatch | bytes,
    chain: ChainState,
    signing_key: Signer,
    event_count: int | None = None,
) -> Sealed:
    """Build and sign the next envelope of `chain`; return it with the chain it leads to."""
    payload = batch if isinstance(batch, bytes) else batch.SerializeToString()
    if event_count is None:
        event_count = len(batch.events) if isinstance(batch, events_pb2.EventBatch) else 0
    header = envelope_pb2.EnvelopeHeader(
        version=PROTOCOL_VERSION,
        agent_id=agent_id,
        seq=chain.last_seq + 1,
        prev_hash=chain.last_hash,
        created_ns=time.time_ns(),
        chain_id=chain.chain_id,
        event_count=event_count,
    ).SerializeToString()
    message = signing_message(header, payload)
    envelope = envelope_pb2.Envelope(header=header, payload=payload, sig=signing_key.sign(message))
    return Sealed(envelope, ChainState(chain.chain_id, chain.last_seq + 1, hashlib.sha256(message).digest()))
