"""A live hub for tests: real mTLS on 127.0.0.1:0, a temp PKI, trust dir and store."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest_asyncio
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from amoskys import keys
from amoskys.catalog import split_agent_id
from amoskys.client import hub_channel, hub_stub
from amoskys.config import EventBusConfig, TlsConfig, load_config
from amoskys.envelope import ChainState, seal
from amoskys.eventbus.server import Hub, create_server
from amoskys.v1 import bus_pb2, bus_pb2_grpc, envelope_pb2, events_pb2

if TYPE_CHECKING:
    from tests.conftest import TestPki

__all__ = ["AgentIdentity", "LiveHub", "hub_config", "live_hub", "make_events"]


@dataclass
class AgentIdentity:
    agent_id: str
    tls: TlsConfig
    signing_key: Ed25519PrivateKey
    chain: ChainState = field(default_factory=ChainState.fresh)

    def seal(self, events: list[events_pb2.Event]) -> envelope_pb2.Envelope:
        envelope, self.chain = seal(self.agent_id, events_pb2.EventBatch(events=events), self.chain, self.signing_key)
        return envelope


def _body(agent: str, n: int) -> dict[str, object]:
    """A plausible body of the kind `agent` sends (the hub refuses bodies of other kinds)."""
    if agent == "auth":
        return {"auth": events_pb2.AuthEvent(kind=events_pb2.AuthEvent.SSH_FAILED, user=f"user{n}", src_ip="192.0.2.9")}
    if agent == "host":
        return {"host_metrics": events_pb2.HostMetrics(cpu_percent=float(n % 100), mem_total_bytes=1 << 30)}
    return {"process": events_pb2.ProcessEvent(action=events_pb2.ProcessEvent.START, pid=1000 + n, name="bash")}


def make_events(count: int, host: str = "web1", agent: str = "proc", start: int = 0) -> list[events_pb2.Event]:
    now = time.time_ns()
    return [
        events_pb2.Event(
            event_id=f"{host}-{agent}-{start + i}",
            ts_ns=now + i,
            host=host,
            agent=agent,
            severity=events_pb2.SEVERITY_INFO,
            **_body(agent, start + i),  # type: ignore[arg-type]
        )
        for i in range(count)
    ]


def hub_config(test_pki: TestPki, tmp_path: Path, **overrides: object) -> EventBusConfig:
    """A hub config on 127.0.0.1:0 with its own cert, trust dir, CRL path and store."""
    key, cert = test_pki.issue("hub", "server", ["localhost", "127.0.0.1"])
    trust_dir = tmp_path / "trust"
    trust_dir.mkdir(exist_ok=True)
    document: dict[str, object] = {
        "listen": "127.0.0.1:0",
        "tls": {"ca": str(test_pki.ca_cert), "cert": str(cert), "key": str(key)},
        "trust_map": str(trust_dir),
        "crl": str(tmp_path / "crl.pem"),
        "store": {"path": str(tmp_path / "store" / "events.db"), "prune_interval_s": 3600},
        "metrics": {"listen": "127.0.0.1:0"},
        "logging": {"level": "debug", "format": "text"},
    }
    document.update(overrides)
    path = tmp_path / "eventbus.yml"
    path.write_text(yaml.safe_dump(document))
    return load_config(path, EventBusConfig, env={})


@dataclass
class LiveHub:
    hub: Hub
    pki: TestPki
    config: EventBusConfig

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.hub.port}"

    def agent(
        self, agent_id: str, *, trusted: bool = True, cert_cn: str | None = None, host: str = "", kind: str = ""
    ) -> AgentIdentity:
        """A new agent identity: client cert (CN = agent_id unless cert_cn), signing key, trust entry.

        An id of the form HOST-KIND is enrolled for that host and kind (a `.pub` file, as the hub derives
        it); any other id, or an explicit host/kind, gets a `{key, host, kind}` entry (default web1, proc).
        """
        key_path, cert_path = self.pki.issue(cert_cn or agent_id, "client")
        signing = keys.generate_signing_key()
        if trusted:
            key_text = keys.public_key_text(signing.public_key())
            trust_dir = Path(self.config.trust_map)
            if split_agent_id(agent_id) and not host and not kind:
                (trust_dir / f"{agent_id}.pub").write_text(key_text + "\n")
            else:
                entry = {"key": key_text, "host": host or "web1", "kind": kind or "proc"}
                (trust_dir / f"{agent_id}.yml").write_text(yaml.safe_dump({agent_id: entry}))
            self.hub.trust.reload()
        tls = TlsConfig(ca=str(self.pki.ca_cert), cert=str(cert_path), key=str(key_path))
        return AgentIdentity(agent_id, tls, signing)

    def consumer_tls(self, cn: str = "ui") -> TlsConfig:
        """A consumer identity (issued once per CN)."""
        key_path, cert_path = self.pki.root / "certs" / f"{cn}.key", self.pki.root / "certs" / f"{cn}.crt"
        if not cert_path.exists():
            self.pki.issue(cn, "client")
        return TlsConfig(ca=str(self.pki.ca_cert), cert=str(cert_path), key=str(key_path))

    def channel(self, tls: TlsConfig) -> grpc.aio.Channel:
        return hub_channel(self.address, tls, "localhost")

    async def publish(self, identity: AgentIdentity, envelope: envelope_pb2.Envelope) -> envelope_pb2.PublishAck:
        async with self.channel(identity.tls) as channel:
            return await hub_stub(channel).Publish(envelope, timeout=10)

    async def publish_raw(self, identity: AgentIdentity, raw: bytes) -> envelope_pb2.PublishAck:
        async with self.channel(identity.tls) as channel:
            call = channel.unary_unary(
                "/amoskys.v1.EventBus/Publish",
                request_serializer=None,
                response_deserializer=envelope_pb2.PublishAck.FromString,
            )
            ack: envelope_pb2.PublishAck = await call(raw, timeout=10)
            return ack

    async def query(self, flt: bus_pb2.EventFilter | None = None, page_size: int = 1000) -> list[bus_pb2.StoredEvent]:
        async with self.channel(self.consumer_tls()) as channel:
            stub: bus_pb2_grpc.EventBusAsyncStub = hub_stub(channel)
            events: list[bus_pb2.StoredEvent] = []
            token = ""
            while True:
                page = await stub.Query(bus_pb2.QueryRequest(filter=flt, page_size=page_size, page_token=token))
                events += page.events
                token = page.next_page_token
                if not token:
                    return events


@pytest_asyncio.fixture
async def live_hub(test_pki: TestPki, tmp_path: Path) -> AsyncIterator[LiveHub]:
    config = hub_config(test_pki, tmp_path)
    hub = create_server(config)
    await hub.start()
    live = LiveHub(hub, test_pki, config)
    try:
        yield live
    finally:
        await live.hub.stop()  # the hub a test may have restarted, not only the first one
