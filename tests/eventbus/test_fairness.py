"""One identity (or a few) cannot starve the others: admission, stream caps, idle streams, slow
consumers, revocation of open streams."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from amoskys import pki
from amoskys.client import hub_stub
from amoskys.eventbus.server import create_server
from amoskys.v1 import bus_pb2, envelope_pb2
from tests.conftest import TestPki
from tests.hubfixture import AgentIdentity, LiveHub, hub_config, make_events

Ack = envelope_pb2.PublishAck


@contextlib.asynccontextmanager
async def _hub(test_pki: TestPki, tmp_path: Path, **overrides: object) -> AsyncIterator[LiveHub]:
    config = hub_config(test_pki, tmp_path, **overrides)
    hub = create_server(config)
    await hub.start()
    try:
        yield LiveHub(hub, test_pki, config)
    finally:
        await hub.stop()


@pytest_asyncio.fixture
async def tight_hub(test_pki: TestPki, tmp_path: Path) -> AsyncIterator[LiveHub]:
    limits = {"max_streams_per_identity": 3, "stream_idle_s": 1.0, "write_timeout_s": 1.0}
    backpressure = {"high_water_events": 2000, "max_pending_per_agent": 1000}
    async with _hub(test_pki, tmp_path, limits=limits, backpressure=backpressure) as live:
        yield live


def _sample(live: LiveHub, name: str, **labels: str) -> float:
    return live.hub.metrics.registry.get_sample_value(name, labels or None) or 0.0


async def _flood(live: LiveHub, agent: AgentIdentity, stop: asyncio.Event) -> int:
    """Send 1000-event envelopes from 6 tasks at once, over and over, ignoring RETRY; return answers."""
    host = agent.agent_id.rsplit("-", 1)[0]
    envelopes = [agent.seal(make_events(1000, host=host, start=n * 1000)).SerializeToString() for n in range(20)]
    answered = 0
    async with live.channel(agent.tls) as channel:
        publish = channel.unary_unary("/amoskys.v1.EventBus/Publish")

        async def one_sender(offset: int) -> None:
            nonlocal answered
            n = offset
            while not stop.is_set():
                await publish(envelopes[n % len(envelopes)], timeout=30)
                answered += 1
                n += 1

        await asyncio.gather(*(one_sender(k) for k in range(6)))
    return answered


async def test_flooding_identities_do_not_starve_a_well_behaved_agent(tight_hub: LiveHub) -> None:
    flooders = [tight_hub.agent(f"flood{n}-proc") for n in range(2)]
    good = tight_hub.agent("good-proc")
    stop = asyncio.Event()
    floods = [asyncio.create_task(_flood(tight_hub, f, stop)) for f in flooders]
    statuses = []
    try:
        for _ in range(300):  # until the floods are being held back
            if _sample(tight_hub, "amoskys_bus_retries_total", reason="overloaded"):
                break
            await asyncio.sleep(0.1)
        async with tight_hub.channel(good.tls) as channel:
            stub = hub_stub(channel)
            for n in range(30):
                ack = await stub.Publish(good.seal(make_events(10, host="good", start=n * 10)), timeout=30)
                statuses.append(ack.status)
    finally:
        stop.set()
        answered = await asyncio.gather(*floods)
    assert statuses == [Ack.OK] * 30
    assert min(answered) > 0
    assert _sample(tight_hub, "amoskys_bus_retries_total", reason="overloaded") > 0, "the floods were never held back"
    assert len(await tight_hub.query(bus_pb2.EventFilter(hosts=["good"]))) == 300


async def test_an_identity_ignoring_retry_is_answered_unread(tight_hub: LiveHub) -> None:
    flooder = tight_hub.agent("flood-proc")
    stop = asyncio.Event()
    flood = asyncio.create_task(_flood(tight_hub, flooder, stop))
    while not _sample(tight_hub, "amoskys_bus_retries_total", reason="backing_off"):
        await asyncio.sleep(0.05)
    stop.set()
    await flood


async def test_streams_per_identity_are_capped(tight_hub: LiveHub) -> None:
    agent = tight_hub.agent("web1-proc")
    async with tight_hub.channel(agent.tls) as channel:
        stub = hub_stub(channel)
        open_calls = [stub.PublishStream() for _ in range(3)]
        for call in open_calls:
            await call.write(agent.seal(make_events(1)))
            assert (await call.read()).status == Ack.OK
        extra = stub.PublishStream()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await extra.read()
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        for call in open_calls:
            call.cancel()
    other = tight_hub.agent("db1-proc")  # another identity is not affected
    async with tight_hub.channel(other.tls) as channel:
        call = hub_stub(channel).PublishStream()
        await call.write(other.seal(make_events(1, host="db1")))
        assert (await call.read()).status == Ack.OK
        call.cancel()


async def test_an_idle_publish_stream_is_ended(tight_hub: LiveHub) -> None:
    agent = tight_hub.agent("web1-proc")
    async with tight_hub.channel(agent.tls) as channel:
        call = hub_stub(channel).PublishStream()
        await call.write(agent.seal(make_events(1)))
        assert (await call.read()).status == Ack.OK
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.wait_for(call.read(), 10)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "idle" in (caught.value.details() or "")


async def test_a_publish_stream_that_keeps_sending_outlives_the_idle_limit(tight_hub: LiveHub) -> None:
    """The idle limit counts from the last envelope: one every 0.4 s keeps a stream up for 2.5 idle limits."""
    agent = tight_hub.agent("web1-proc")
    async with tight_hub.channel(agent.tls) as channel:
        call = hub_stub(channel).PublishStream()
        for _ in range(7):
            await call.write(agent.seal(make_events(1)))
            assert (await call.read()).status == Ack.OK
            await asyncio.sleep(0.4)
        await call.write(agent.seal(make_events(1)))
        assert (await call.read()).status == Ack.OK
        call.cancel()


async def test_revocation_ends_open_streams_on_reload(tight_hub: LiveHub) -> None:
    agent = tight_hub.agent("web1-proc")
    async with tight_hub.channel(agent.tls) as channel, tight_hub.channel(tight_hub.consumer_tls()) as consumer:
        publish = hub_stub(channel).PublishStream()
        await publish.write(agent.seal(make_events(1)))
        assert (await publish.read()).status == Ack.OK
        subscription = hub_stub(consumer).Subscribe(bus_pb2.SubscribeRequest(replay=True))
        assert (await subscription.read()).event.event_id == "web1-proc-0"
        serials = [pki.load_certificate(Path(tls.cert)).serial_number for tls in (agent.tls, tight_hub.consumer_tls())]
        pki.revoke(tight_hub.pki.ca, Path(tight_hub.config.crl), serials)
        tight_hub.hub.reload()
        for call in (publish, subscription):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await asyncio.wait_for(call.read(), 10)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "revoked" in (caught.value.details() or "")


async def test_a_consumer_that_stops_reading_is_cut(tight_hub: LiveHub) -> None:
    agent = tight_hub.agent("web1-proc")
    async with tight_hub.channel(tight_hub.consumer_tls()) as consumer:
        stalled = hub_stub(consumer).Subscribe(bus_pb2.SubscribeRequest())
        await asyncio.sleep(0.2)  # subscribed; never reads from here on
        for n in range(40):  # ~ 6 MB of events: more than the transport buffers
            big = make_events(1000, start=n * 1000)
            for event in big:
                event.labels["pad"] = "x" * 100
            envelope = agent.seal(big)
            while (await tight_hub.publish(agent, envelope)).status != Ack.OK:
                await asyncio.sleep(0.2)  # RETRY: the same envelope again, once the hub caught up
            if _sample(tight_hub, "amoskys_bus_subscribers_cut_total"):
                break
        for _ in range(100):  # the cut is counted, then the stream ends
            if _sample(tight_hub, "amoskys_bus_subscribers_cut_total") and not _sample(
                tight_hub, "amoskys_bus_subscribers"
            ):
                break
            await asyncio.sleep(0.1)
        assert _sample(tight_hub, "amoskys_bus_subscribers_cut_total") == 1
        assert _sample(tight_hub, "amoskys_bus_subscribers") == 0
        stalled.cancel()


async def test_a_consumer_whose_writes_wait_is_cut_with_a_cursor_it_resumes_from(tight_hub: LiveHub) -> None:
    """Large events, far fewer than the subscriber's queue holds: the write deadline, not the queue, cuts."""
    agent = tight_hub.agent("web1-proc")
    async with tight_hub.channel(tight_hub.consumer_tls()) as consumer:
        stalled = hub_stub(consumer).Subscribe(bus_pb2.SubscribeRequest())
        await asyncio.sleep(0.2)  # subscribed; never reads from here on
        published = 0
        while not _sample(tight_hub, "amoskys_bus_subscribers_cut_total") and published < 2000:
            events = make_events(10, start=published)
            for event in events:
                event.labels["pad"] = "x" * 40_000  # ~ 400 KB an envelope: transport buffers fill in a few
            assert (await tight_hub.publish(agent, agent.seal(events))).status == Ack.OK
            published += len(events)
            await asyncio.sleep(0.05)
        assert _sample(tight_hub, "amoskys_bus_subscribers_cut_total") == 1
        assert published < 10_000  # the queue never overflowed
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in stalled:
                pass
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        cursor = int((caught.value.details() or "").rpartition("after_cursor=")[2])
        resumed = hub_stub(consumer).Subscribe(bus_pb2.SubscribeRequest(after_cursor=cursor))
        ids = [(await resumed.read()).event.event_id for _ in range(published - cursor)]
        resumed.cancel()
    assert ids == [f"web1-proc-{n}" for n in range(cursor, published)]
