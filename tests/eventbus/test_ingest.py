"""The hub over real mTLS: happy path, consumers, health, metrics."""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from amoskys.client import hub_stub
from amoskys.v1 import bus_pb2, envelope_pb2
from tests.hubfixture import LiveHub, make_events

OK = envelope_pb2.PublishAck.OK


async def test_publish_query_and_registry(live_hub: LiveHub) -> None:
    agent = live_hub.agent("web1-proc")
    ack = await live_hub.publish(agent, agent.seal(make_events(3)))
    assert (ack.status, ack.acked_seq) == (OK, 1)
    stored = await live_hub.query(bus_pb2.EventFilter(agent_ids=["web1-proc"]))
    assert sorted(s.event.event_id for s in stored) == ["web1-proc-0", "web1-proc-1", "web1-proc-2"]
    assert all(s.agent_id == "web1-proc" and s.cursor > 0 for s in stored)
    async with live_hub.channel(live_hub.consumer_tls()) as channel:
        agents = await hub_stub(channel).ListAgents(bus_pb2.ListAgentsRequest())
        status = await hub_stub(channel).GetStatus(bus_pb2.StatusRequest())
    (info,) = agents.agents
    assert (info.agent_id, info.host, info.kind) == ("web1-proc", "web1", "proc")
    assert (info.events_total, info.last_seq) == (3, 1)
    assert info.cert_not_after_ns > 0
    assert status.events_stored == 3
    assert status.agents == 1


async def test_stream_pipelines_acks_in_order(live_hub: LiveHub) -> None:
    agent = live_hub.agent("db1-host")
    envelopes = [agent.seal(make_events(50, host="db1", agent="host", start=i * 50)) for i in range(20)]
    async with live_hub.channel(agent.tls) as channel:
        call = hub_stub(channel).PublishStream(iter(envelopes))
        acks = [ack async for ack in call]
    assert [a.status for a in acks] == [OK] * 20
    assert [a.acked_seq for a in acks] == list(range(1, 21))
    assert len(await live_hub.query(bus_pb2.EventFilter(hosts=["db1"]))) == 1000


async def test_query_filters_and_pages(live_hub: LiveHub) -> None:
    agent = live_hub.agent("web1-auth")
    events = make_events(30, agent="auth")
    events[7].auth.user = "Planted-Needle"
    events[8].severity = 5
    await live_hub.publish(agent, agent.seal(events))
    assert [s.event.event_id for s in await live_hub.query(bus_pb2.EventFilter(text="planted-needle"))] == [
        "web1-auth-7"
    ]
    assert [s.event.event_id for s in await live_hub.query(bus_pb2.EventFilter(min_severity=5))] == ["web1-auth-8"]
    paged = await live_hub.query(bus_pb2.EventFilter(kinds=["auth"]), page_size=7)
    assert len(paged) == 30
    assert len({s.cursor for s in paged}) == 30
    assert [s.event.ts_ns for s in paged] == sorted((s.event.ts_ns for s in paged), reverse=True)
    assert await live_hub.query(bus_pb2.EventFilter(hosts=["nowhere"])) == []


async def test_subscribe_replays_then_streams_live(live_hub: LiveHub) -> None:
    agent = live_hub.agent("web1-proc")
    await live_hub.publish(agent, agent.seal(make_events(5)))
    async with live_hub.channel(live_hub.consumer_tls()) as channel:
        request = bus_pb2.SubscribeRequest(filter=bus_pb2.EventFilter(hosts=["web1"]), replay=True)
        stream = hub_stub(channel).Subscribe(request)
        received = [await stream.read() for _ in range(5)]
        await live_hub.publish(agent, agent.seal(make_events(3, start=5)))
        other = live_hub.agent("other-proc")
        await live_hub.publish(other, other.seal(make_events(2, host="other", start=8)))
        received += [await asyncio.wait_for(stream.read(), 5) for _ in range(3)]
        stream.cancel()
    ids = [r.event.event_id for r in received]
    assert ids == [f"web1-proc-{i}" for i in range(8)]
    cursors = [r.cursor for r in received]
    assert cursors == sorted(cursors)


async def test_consumer_calls_need_a_consumer_certificate(live_hub: LiveHub) -> None:
    agent = live_hub.agent("web1-proc")
    async with live_hub.channel(agent.tls) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await hub_stub(channel).Query(bus_pb2.QueryRequest())
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_health_and_metrics(live_hub: LiveHub) -> None:
    agent = live_hub.agent("web1-proc")
    await live_hub.publish(agent, agent.seal(make_events(4)))
    async with live_hub.channel(agent.tls) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service="amoskys.v1.EventBus"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    url = f"http://127.0.0.1:{live_hub.hub.metrics_port}/metrics"
    body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    assert "amoskys_bus_events_stored_total 4.0" in body
    for name in ("amoskys_bus_ack_latency_seconds_bucket", "amoskys_bus_inflight_events", "amoskys_bus_store_bytes"):
        assert name in body
    hub_expiry = re.search(r"^amoskys_bus_cert_expiry_timestamp_seconds (\S+)$", body, re.M)
    hub_cert = live_hub.hub.trust.identity.cert  # type: ignore[union-attr]
    assert hub_expiry and float(hub_expiry.group(1)) == hub_cert.not_valid_after_utc.timestamp()
    agent_expiry = re.search(
        r'^amoskys_bus_agent_cert_expiry_timestamp_seconds\{agent_id="web1-proc",host="([^"]*)"\} (\S+)$', body, re.M
    )
    assert agent_expiry, body
    assert time.time() < float(agent_expiry.group(2)) < time.time() + 400 * 86400
    readers = len(live_hub.hub.store._all_readers)
    for _ in range(20):  # each scrape is served on a new thread
        await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read())
    assert len(live_hub.hub.store._all_readers) <= readers + 1, "a reader connection per scrape"
