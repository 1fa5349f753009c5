"""The hub on `store.backend: jetstream` with real nats-server processes: appends, races between hubs, the indexer."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import nats
import pytest
import pytest_asyncio

from amoskys.client import hub_stub
from amoskys.config import IndexerConfig, NatsConfig, StoreConfig
from amoskys.envelope import ChainState
from amoskys.errors import AmoskysError
from amoskys.eventbus import jetstream
from amoskys.eventbus.indexer import Indexer
from amoskys.eventbus.server import create_server
from amoskys.v1 import bus_pb2, envelope_pb2
from tests.conftest import TestPki
from tests.hubfixture import LiveHub, hub_config, make_events
from tests.natscluster import NatsCluster, nats_cluster

Status = envelope_pb2.PublishAck.Status
Reason = envelope_pb2.PublishAck.Reason


def nats_section(servers: list[str], replicas: int = 1) -> dict[str, object]:
    return {"servers": servers, "tls": False, "replicas": replicas, "request_timeout_s": 2}


class Cluster:
    """Two in-process hubs on one stream, and an indexer writing the index both read."""

    def __init__(self, test_pki: TestPki, tmp_path: Path, nats: NatsCluster) -> None:
        self.pki, self.tmp_path, self.nats = test_pki, tmp_path, nats
        self.index = tmp_path / "index" / "events.db"
        self.hubs: list[LiveHub] = []
        self.indexer: Indexer | None = None
        self._indexer_task: asyncio.Task[int] | None = None

    async def start_hub(self) -> LiveHub:
        store = {"backend": "jetstream", "path": str(self.index), "prune_interval_s": 3600}
        if self.hubs:  # the same config (certificate, trust map, index) for every hub
            config = self.hubs[0].config
        else:
            config = hub_config(self.pki, self.tmp_path, store=store, nats=nats_section(self.nats.servers))
        hub = create_server(config)
        await hub.start()
        live = LiveHub(hub, self.pki, config)
        self.hubs.append(live)
        return live

    def start_indexer(self) -> None:
        config = IndexerConfig(
            nats=NatsConfig(**nats_section(self.nats.servers)),  # type: ignore[arg-type]
            store=StoreConfig(backend="jetstream", path=str(self.index)),
            batch=200,
        )
        self.indexer = Indexer(config)
        self._indexer_task = asyncio.create_task(self.indexer.run())

    async def stop_indexer(self) -> None:
        if self.indexer is not None and self._indexer_task is not None:
            self.indexer.request_stop()
            await asyncio.wait_for(self._indexer_task, 10)
            self.indexer = None

    async def wait_indexed(self, events: int, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        hub = self.hubs[0].hub
        while await asyncio.to_thread(hub.store.count_events) < events:
            assert time.monotonic() < deadline, f"indexed {hub.store.count_events()} of {events}"
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        await self.stop_indexer()
        for live in self.hubs:
            await live.hub.stop()


@pytest_asyncio.fixture
async def cluster(test_pki: TestPki, tmp_path: Path) -> AsyncIterator[Cluster]:
    with nats_cluster(tmp_path / "nats", size=1) as nats:
        running = Cluster(test_pki, tmp_path, nats)
        try:
            yield running
        finally:
            await running.stop()


async def test_appends_are_indexed_and_served(cluster: Cluster) -> None:
    live = await cluster.start_hub()
    cluster.start_indexer()
    agent = live.agent("web1-proc")
    acks = [await live.publish(agent, agent.seal(make_events(3, start=3 * i))) for i in range(4)]
    assert [(a.status, a.acked_seq) for a in acks] == [(Status.OK, i) for i in range(1, 5)]
    await cluster.wait_indexed(12)
    stored = await live.query(bus_pb2.EventFilter(agent_ids=["web1-proc"]))
    assert sorted(s.event.event_id for s in stored) == sorted(f"web1-proc-{i}" for i in range(12))
    async with live.channel(live.consumer_tls()) as channel:
        (info,) = (await hub_stub(channel).ListAgents(bus_pb2.ListAgentsRequest())).agents
    assert (info.agent_id, info.host, info.kind, info.events_total, info.last_seq) == (
        "web1-proc",
        "web1",
        "proc",
        12,
        4,
    )
    assert info.cert_not_after_ns > 0


async def test_subscribe_streams_what_the_indexer_commits(cluster: Cluster) -> None:
    live = await cluster.start_hub()
    cluster.start_indexer()
    agent = live.agent("web1-proc")
    async with live.channel(live.consumer_tls()) as channel:
        stream = hub_stub(channel).Subscribe(bus_pb2.SubscribeRequest(filter=bus_pb2.EventFilter(hosts=["web1"])))
        await asyncio.sleep(0.3)  # the subscription is registered before the events arrive
        assert (await live.publish(agent, agent.seal(make_events(4)))).status == Status.OK
        received = [await asyncio.wait_for(stream.read(), 10) for _ in range(4)]
        stream.cancel()
    assert [r.event.event_id for r in received] == [f"web1-proc-{i}" for i in range(4)]


async def test_two_hubs_decide_one_chain(cluster: Cluster) -> None:
    """An agent alternating between two hubs: each hub's cached head goes stale and is re-read, never forked."""
    a, b = await cluster.start_hub(), await cluster.start_hub()
    agent = a.agent("web1-proc")
    b.hub.trust.reload()
    envelopes = [agent.seal(make_events(1, start=i)) for i in range(6)]
    for i, envelope in enumerate(envelopes):
        ack = await (a if i % 2 == 0 else b).publish(agent, envelope)
        assert (ack.status, ack.acked_seq, ack.reason) == (Status.OK, i + 1, ""), ack
    resent = await a.publish(agent, envelopes[5])  # what b appended: a resend of the head
    assert (resent.status, resent.reason) == (Status.OK, "duplicate")
    old = await b.publish(agent, envelopes[2])
    assert old.status == Status.OK
    gap = agent.seal(make_events(1, start=99))
    agent.chain = dataclasses.replace(agent.chain, last_seq=agent.chain.last_seq + 1)  # skip one: seq 8, head 6
    gap_ack = await a.publish(agent, agent.seal(make_events(1, start=100)))
    assert gap_ack.status == Status.RETRY and gap_ack.reason.startswith("out_of_order"), gap_ack
    assert (await b.publish(agent, gap)).status == Status.OK  # seq 7 through the other hub
    cluster.start_indexer()
    await cluster.wait_indexed(7)
    stored = await a.query(bus_pb2.EventFilter(agent_ids=["web1-proc"]))
    assert sorted(s.event.event_id for s in stored) == sorted([f"web1-proc-{i}" for i in range(6)] + ["web1-proc-99"])
    assert cluster.indexer is not None
    assert cluster.indexer.metrics.registry.get_sample_value("amoskys_indexer_chain_gaps_total") == 0
    agent.chain = dataclasses.replace(agent.chain, last_seq=2, last_hash=b"\x01" * 32)
    forged = await b.publish(agent, agent.seal(make_events(1, start=200)))  # seq 3, indexed with other content
    assert forged.status == Status.INVALID and forged.reason.startswith("fork"), forged


async def test_fork_across_hubs_is_refused(cluster: Cluster) -> None:
    a, b = await cluster.start_hub(), await cluster.start_hub()
    agent = a.agent("web1-proc")
    b.hub.trust.reload()
    assert (await a.publish(agent, agent.seal(make_events(1)))).status == Status.OK
    saved = agent.chain
    first = agent.seal(make_events(1, start=1))
    agent.chain = saved
    other = agent.seal(make_events(1, start=2))  # the same seq 2, other content
    assert (await a.publish(agent, first)).status == Status.OK
    forked = await b.publish(agent, other)
    assert forked.status == Status.INVALID and forked.reason.startswith("fork"), forked
    cluster.start_indexer()  # the hub's alert goes through the stream into the index
    await cluster.wait_indexed(3)
    (alert,) = await a.query(bus_pb2.EventFilter(agent_ids=["eventbus"]))
    assert alert.event.alert.rule == "bus.fork"


async def test_indexer_restart_stores_nothing_twice(cluster: Cluster) -> None:
    live = await cluster.start_hub()
    agent = live.agent("web1-proc")
    cluster.start_indexer()
    for i in range(5):
        assert (await live.publish(agent, agent.seal(make_events(2, start=2 * i)))).status == Status.OK
    await cluster.wait_indexed(10)
    await cluster.stop_indexer()
    for i in range(5, 8):
        assert (await live.publish(agent, agent.seal(make_events(2, start=2 * i)))).status == Status.OK
    cluster.start_indexer()
    await cluster.wait_indexed(16)
    await asyncio.sleep(0.5)
    stored = await live.query(bus_pb2.EventFilter(agent_ids=["web1-proc"]))
    assert sorted(s.event.event_id for s in stored) == sorted(f"web1-proc-{i}" for i in range(16))


async def test_nats_unreachable_answers_retry(cluster: Cluster) -> None:
    live = await cluster.start_hub()
    agent = live.agent("web1-proc")
    assert (await live.publish(agent, agent.seal(make_events(1)))).status == Status.OK
    cluster.nats.nodes[0].kill()
    ack = await live.publish(agent, agent.seal(make_events(1, start=1)))
    assert ack.status == Status.RETRY and ack.reason_code == Reason.REASON_STORE_UNAVAILABLE, ack
    other = live.agent("web2-proc")  # meanwhile, others are answered at admission, not after a timeout each
    ack = await live.publish(other, other.seal(make_events(1, host="web2")))
    assert ack.status == Status.RETRY and ack.reason.startswith("overloaded"), ack


async def test_hub_speaks_mtls_to_nats(test_pki: TestPki, tmp_path: Path) -> None:
    """nats.tls: the server is checked against the fleet CA and the hub presents its certificate."""
    server_key, server_cert = test_pki.issue("nats1", "server", ["localhost", "127.0.0.1"])
    with nats_cluster(tmp_path / "nats", size=1, tls=(test_pki.ca_cert, server_cert, server_key)) as nats:
        store = {"backend": "jetstream", "path": str(tmp_path / "index.db"), "prune_interval_s": 3600}
        config = hub_config(test_pki, tmp_path, store=store, nats=nats_section(nats.servers))
        no_tls = create_server(config)
        with pytest.raises(TimeoutError):  # the server refuses a client without a certificate: never connected
            await no_tls.start()
        await no_tls.stop()
        key, cert = test_pki.issue("hub-nats", "client")  # NATS checks a client certificate (clientAuth)
        tls = NatsConfig(servers=nats.servers, tls=True, ca=config.tls.ca, cert=str(cert), key=str(key), replicas=1)
        hub = create_server(msgspec.structs.replace(config, nats=tls))
        await hub.start()
        try:
            live = LiveHub(hub, test_pki, hub.config)
            agent = live.agent("web1-proc")
            assert (await live.publish(agent, agent.seal(make_events(2)))).status == Status.OK
        finally:
            await hub.stop()


async def test_indexer_skips_what_it_cannot_read_and_goes_on(cluster: Cluster) -> None:
    """Junk on the stream's subjects (not from a hub) is counted and skipped; the next envelope is indexed."""
    live = await cluster.start_hub()
    agent = live.agent("web1-proc")
    assert (await live.publish(agent, agent.seal(make_events(1)))).status == Status.OK
    nc = await nats.connect(servers=cluster.nats.servers)
    try:
        js = nc.jetstream()
        await js.publish("amoskys.env.other-proc", b"\xff not an envelope")
        await js.publish("amoskys.alert.somewhere", b"\xff not an event")
    finally:
        await nc.close()
    assert (await live.publish(agent, agent.seal(make_events(1, start=1)))).status == Status.OK
    cluster.start_indexer()
    await cluster.wait_indexed(2)
    assert cluster.indexer is not None
    registry = cluster.indexer.metrics.registry
    assert registry.get_sample_value("amoskys_indexer_skipped_total", {"reason": "malformed"}) == 2
    stored = await live.query(bus_pb2.EventFilter(agent_ids=["web1-proc"]))
    assert sorted(s.event.event_id for s in stored) == ["web1-proc-0", "web1-proc-1"]


async def test_two_hubs_racing_for_one_agent_store_each_envelope_once(cluster: Cluster) -> None:
    """The same envelopes sent to both hubs at once (an agent that failed over with envelopes in flight):
    every one acked by both, appended once, no fork and no chain break."""
    a, b = await cluster.start_hub(), await cluster.start_hub()
    agent = a.agent("web1-proc")
    b.hub.trust.reload()
    envelopes = [agent.seal(make_events(1, start=i)) for i in range(40)]
    async with a.channel(agent.tls) as to_a, b.channel(agent.tls) as to_b:
        calls = [hub_stub(to_a).PublishStream(iter(envelopes)), hub_stub(to_b).PublishStream(iter(envelopes))]
        acks_a, acks_b = await asyncio.gather(*(_all(call) for call in calls))
    assert [ack.acked_seq for ack in acks_a] == [ack.acked_seq for ack in acks_b] == list(range(1, 41))
    for ack_a, ack_b in zip(acks_a, acks_b, strict=True):
        assert (ack_a.status, ack_b.status) == (Status.OK, Status.OK), (ack_a, ack_b)
        assert sorted([ack_a.reason, ack_b.reason])[0] == "", (ack_a, ack_b)  # one of the two appended it
    cluster.start_indexer()
    await cluster.wait_indexed(40)
    await asyncio.sleep(0.3)
    stored = await a.query(bus_pb2.EventFilter(agent_ids=["web1-proc"]))
    assert sorted(s.event.event_id for s in stored) == sorted(f"web1-proc-{i}" for i in range(40))
    for live in (a, b):
        breaks = live.hub.metrics.registry.get_sample_value("amoskys_bus_chain_breaks_total", {"kind": "fork"})
        assert not breaks


async def test_a_stale_head_is_caught_by_the_expected_last_sequence(cluster: Cluster) -> None:
    """Hub b still holds seq 1 of chain X as the head when seq 2 of X reaches it, but the agent's chain was
    restarted through a meanwhile: JetStream refuses b's append (wrong last sequence), b re-reads the head
    (chain Y) and decides again: X is not the agent's chain any more."""
    a, b = await cluster.start_hub(), await cluster.start_hub()
    agent = a.agent("web1-proc")
    b.hub.trust.reload()
    assert (await b.publish(agent, agent.seal(make_events(1)))).status == Status.OK
    old_chain = agent.chain
    agent.chain = ChainState.fresh()  # the agent lost its state: chain Y, through the other hub
    assert (await a.publish(agent, agent.seal(make_events(1, start=1)))).status == Status.OK
    agent.chain = old_chain
    ack = await b.publish(agent, agent.seal(make_events(1, start=2)))
    assert ack.status == Status.RETRY and ack.reason.startswith("chain_unknown"), ack
    assert b.hub.metrics.registry.get_sample_value("amoskys_bus_retries_total", {"reason": "append_race"}) == 1
    cluster.start_indexer()
    await cluster.wait_indexed(3)  # 2 events and a's chain_reset notice
    (info,) = await asyncio.to_thread(a.hub.store.list_agents)
    assert (info.agent_id, info.last_seq, info.envelopes_total) == ("web1-proc", 1, 2)


async def _all(call: AsyncIterator[envelope_pb2.PublishAck]) -> list[envelope_pb2.PublishAck]:
    return [ack async for ack in call]


async def test_a_stream_the_nodes_cannot_hold_is_refused_with_the_reason(tmp_path: Path) -> None:
    with nats_cluster(tmp_path / "nats", size=1) as nats:
        fits = msgspec.convert({**nats_section(nats.servers), "stream": "FITS"}, NatsConfig)
        too_big = msgspec.convert({**nats_section(nats.servers), "stream": "HUGE", "max_bytes": 1 << 60}, NatsConfig)
        client = await jetstream.connect(fits, "test")
        try:
            js = client.jetstream()
            await jetstream.ensure_stream(js, fits)
            await jetstream.ensure_stream(js, fits)  # already there (another hub made it): nothing to do
            with pytest.raises(AmoskysError, match=r"refused to create stream 'HUGE'.*error \d+"):
                await jetstream.ensure_stream(js, too_big)
        finally:
            await client.close()
