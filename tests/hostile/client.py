"""A hostile client written from `proto/` and README's wire protocol only.

It uses the generated message classes, grpcio and `cryptography`'s Ed25519, never the project's
own envelope, publisher or load generator code: the signed form and the chain are implemented
here from their description, so a misreading on either side shows up as a failed test.

    sig       = Ed25519(DOMAIN || u32be(len(header)) || header || payload)
    prev_hash = SHA-256(that same message) of the previous envelope (32 zero bytes for seq 1)
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from amoskys.v1 import bus_pb2, envelope_pb2, events_pb2

__all__ = [
    "DOMAIN",
    "GENESIS",
    "AckStream",
    "Chain",
    "Consumer",
    "Credentials",
    "EventStream",
    "HostileAgent",
    "event",
    "header_bytes",
    "next_ack",
    "next_event",
    "publish_on",
    "publish_stream",
    "sign",
    "signing_message",
    "subscribe",
]

DOMAIN = b"AMOSKYS-ENVELOPE-V1\0"
GENESIS = bytes(32)
SERVICE = "/amoskys.v1.EventBus/"
SERVER_NAME = "localhost"  # the name in the hub's test certificate


def signing_message(header: bytes, payload: bytes) -> bytes:
    return DOMAIN + struct.pack(">I", len(header)) + header + payload


def sign(key: Ed25519PrivateKey, header: bytes, payload: bytes) -> envelope_pb2.Envelope:
    """An envelope over exactly these bytes, whatever they hold."""
    return envelope_pb2.Envelope(header=header, payload=payload, sig=key.sign(signing_message(header, payload)))


def digest(header: bytes, payload: bytes) -> bytes:
    return hashlib.sha256(signing_message(header, payload)).digest()


def header_bytes(
    agent_id: str, seq: int, prev_hash: bytes, chain_id: bytes, event_count: int, **extra: object
) -> bytes:
    """A serialized EnvelopeHeader; `extra` overrides any field (version, created_ns, ...)."""
    fields: dict[str, object] = {
        "version": 1, "agent_id": agent_id, "seq": seq, "prev_hash": prev_hash, "created_ns": time.time_ns(),
        "chain_id": chain_id, "event_count": event_count,
    }  # fmt: skip
    fields.update(extra)
    return envelope_pb2.EnvelopeHeader(**fields).SerializeToString()  # type: ignore[arg-type]


@dataclass
class Chain:
    """One hash chain: the next envelope is seq `last_seq + 1` linking to `last_hash`."""

    chain_id: bytes = field(default_factory=lambda: os.urandom(16))
    last_seq: int = 0
    last_hash: bytes = GENESIS


def event(host: str, agent: str, mark: str, **body: object) -> events_pb2.Event:
    """One event of `host`/`agent` labelled `mark` (a process start unless a body is given)."""
    if not body:
        body = {"process": events_pb2.ProcessEvent(action=events_pb2.ProcessEvent.START, pid=4242, name="sh")}
    return events_pb2.Event(
        event_id=os.urandom(16).hex(), ts_ns=time.time_ns(), host=host, agent=agent,
        severity=events_pb2.SEVERITY_INFO, labels={"mark": mark}, **body,  # type: ignore[arg-type]
    )  # fmt: skip


@dataclass(frozen=True)
class Credentials:
    """PEM files of one TLS identity (client certificate and key, and the CA that checks the hub)."""

    ca: Path
    cert: Path
    key: Path

    def channel(self, address: str) -> grpc.aio.Channel:
        credentials = grpc.ssl_channel_credentials(self.ca.read_bytes(), self.key.read_bytes(), self.cert.read_bytes())
        return grpc.aio.secure_channel(address, credentials, [("grpc.ssl_target_name_override", SERVER_NAME)])


@dataclass
class HostileAgent:
    """An enrolled identity as an attacker holds it: certificate, signing key, its own chain."""

    agent_id: str
    host: str
    kind: str
    tls: Credentials
    key: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    chain: Chain = field(default_factory=Chain)

    def trust_line(self) -> str:
        """The trust map's `ed25519:<base64>` form of the public key."""
        raw = self.key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return "ed25519:" + base64.b64encode(raw).decode()

    def events(self, count: int, mark: str) -> list[events_pb2.Event]:
        return [event(self.host, self.kind, mark) for _ in range(count)]

    def seal(self, events: list[events_pb2.Event]) -> envelope_pb2.Envelope:
        """The next envelope of this agent's chain."""
        payload = events_pb2.EventBatch(events=events).SerializeToString()
        return self.seal_bytes(payload, len(events))

    def seal_bytes(self, payload: bytes, event_count: int, **header: object) -> envelope_pb2.Envelope:
        """The next envelope of the chain over any payload bytes; `header` overrides header fields."""
        chain = self.chain
        head = header_bytes(self.agent_id, chain.last_seq + 1, chain.last_hash, chain.chain_id, event_count, **header)
        envelope = sign(self.key, head, payload)
        chain.last_seq, chain.last_hash = chain.last_seq + 1, digest(head, payload)
        return envelope

    def signed(self, header: bytes, payload: bytes) -> envelope_pb2.Envelope:
        """These exact bytes, signed with this agent's key (the chain is left alone)."""
        return sign(self.key, header, payload)

    async def publish(
        self, address: str, envelope: envelope_pb2.Envelope | bytes, timeout: float = 10
    ) -> envelope_pb2.PublishAck:
        raw = envelope if isinstance(envelope, bytes) else envelope.SerializeToString()
        async with self.tls.channel(address) as channel:
            return await publish_on(channel, raw, timeout)


async def publish_on(channel: grpc.aio.Channel, raw: bytes, timeout: float = 10) -> envelope_pb2.PublishAck:
    call: grpc.aio.UnaryUnaryMultiCallable[bytes, envelope_pb2.PublishAck] = channel.unary_unary(
        SERVICE + "Publish", None, envelope_pb2.PublishAck.FromString
    )
    ack: envelope_pb2.PublishAck = await call(raw, timeout=timeout)
    return ack


AckStream = grpc.aio.StreamStreamCall[bytes, envelope_pb2.PublishAck]
EventStream = grpc.aio.UnaryStreamCall[bus_pb2.SubscribeRequest, bus_pb2.StoredEvent]


def publish_stream(channel: grpc.aio.Channel) -> AckStream:
    call: grpc.aio.StreamStreamMultiCallable[bytes, envelope_pb2.PublishAck] = channel.stream_stream(
        SERVICE + "PublishStream", None, envelope_pb2.PublishAck.FromString
    )
    return call()


async def next_ack(call: AckStream) -> envelope_pb2.PublishAck:
    ack = await call.read()
    assert isinstance(ack, envelope_pb2.PublishAck), "the stream ended"
    return ack


async def next_event(call: EventStream) -> bus_pb2.StoredEvent:
    stored = await call.read()
    assert isinstance(stored, bus_pb2.StoredEvent), "the stream ended"
    return stored


@dataclass(frozen=True)
class Consumer:
    """A configured consumer identity: Query, ListAgents, Subscribe."""

    tls: Credentials
    address: str

    async def query(self, flt: bus_pb2.EventFilter | None = None, **request: object) -> list[bus_pb2.StoredEvent]:
        """Every page of a query (or one request's answer when `request` sets a page_token)."""
        async with self.tls.channel(self.address) as channel:
            call = channel.unary_unary(
                SERVICE + "Query", bus_pb2.QueryRequest.SerializeToString, bus_pb2.QueryResponse.FromString
            )
            events: list[bus_pb2.StoredEvent] = []
            token = str(request.pop("page_token", ""))
            while True:
                query = bus_pb2.QueryRequest(filter=flt, page_size=1000, page_token=token, **request)
                page = await call(query, timeout=30)
                events += page.events
                token = page.next_page_token
                if not token:
                    return events

    async def first_page(self, size: int) -> list[bus_pb2.StoredEvent]:
        async with self.tls.channel(self.address) as channel:
            call = channel.unary_unary(
                SERVICE + "Query", bus_pb2.QueryRequest.SerializeToString, bus_pb2.QueryResponse.FromString
            )
            page: bus_pb2.QueryResponse = await call(bus_pb2.QueryRequest(page_size=size), timeout=30)
            return list(page.events)

    async def agents(self) -> dict[str, bus_pb2.AgentInfo]:
        async with self.tls.channel(self.address) as channel:
            call = channel.unary_unary(
                SERVICE + "ListAgents",
                bus_pb2.ListAgentsRequest.SerializeToString,
                bus_pb2.ListAgentsResponse.FromString,
            )
            answer: bus_pb2.ListAgentsResponse = await call(bus_pb2.ListAgentsRequest(), timeout=30)
            return {info.agent_id: info for info in answer.agents}

    async def marked(self, mark: str) -> list[bus_pb2.StoredEvent]:
        """Stored events carrying the label `mark` (what a case must not have stored)."""
        return [s for s in await self.query() if s.event.labels.get("mark") == mark]


def subscribe(channel: grpc.aio.Channel, request: bus_pb2.SubscribeRequest) -> EventStream:
    call: grpc.aio.UnaryStreamMultiCallable[bus_pb2.SubscribeRequest, bus_pb2.StoredEvent] = channel.unary_stream(
        SERVICE + "Subscribe", bus_pb2.SubscribeRequest.SerializeToString, bus_pb2.StoredEvent.FromString
    )
    return call(request)
