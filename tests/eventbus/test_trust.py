"""What one enrolled identity can and cannot do to the hub: bindings, clocks, rate limits, fatal failures."""

from __future__ import annotations

import asyncio
import base64
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from amoskys.client import hub_stub
from amoskys.envelope import ChainState
from amoskys.eventbus.server import Hub, create_server
from amoskys.eventbus.store import AcceptedEnvelope, ChainRecord
from amoskys.v1 import bus_pb2, envelope_pb2, events_pb2
from tests.conftest import TestPki
from tests.hubfixture import LiveHub, hub_config, make_events

Ack = envelope_pb2.PublishAck
HOUR_NS = 3600 * 10**9


def _heartbeat(ts_ns: int, host: str = "web1", agent: str = "proc") -> events_pb2.Event:
    return events_pb2.Event(
        event_id=f"hb-{ts_ns}", ts_ns=ts_ns, host=host, agent=agent,
        heartbeat=events_pb2.Heartbeat(version="9.9", interval_s=30),
    )  # fmt: skip


async def test_registry_shows_the_enrolment_not_what_events_claim(live_hub: LiveHub) -> None:
    agent = live_hub.agent("collector-1", host="db1", kind="snmp")
    events = [_heartbeat(time.time_ns(), host="db1", agent="snmp")]
    assert (await live_hub.publish(agent, agent.seal(events))).status == Ack.OK
    async with live_hub.channel(live_hub.consumer_tls()) as channel:
        (info,) = (await hub_stub(channel).ListAgents(bus_pb2.ListAgentsRequest())).agents
    assert (info.agent_id, info.host, info.kind) == ("collector-1", "db1", "snmp")
    forged = [_heartbeat(time.time_ns(), host="web1", agent="snmp")]
    ack = await live_hub.publish(agent, agent.seal(forged))
    assert (ack.status, ack.reason.split(":")[0]) == (Ack.INVALID, "host_mismatch")
    assert "'web1'" in ack.reason and "'db1'" in ack.reason


async def test_future_timestamps_pin_neither_liveness_nor_order(live_hub: LiveHub) -> None:
    agent = live_hub.agent("web1-proc")
    far_future = 2**63 - 1
    events = [*make_events(2), _heartbeat(far_future)]
    events[0].ts_ns = far_future
    before = time.time_ns()
    assert (await live_hub.publish(agent, agent.seal(events))).status == Ack.OK
    later = live_hub.agent("db1-proc")
    await live_hub.publish(later, later.seal(make_events(1, host="db1")))
    async with live_hub.channel(live_hub.consumer_tls()) as channel:
        agents = {a.agent_id: a for a in (await hub_stub(channel).ListAgents(bus_pb2.ListAgentsRequest())).agents}
    assert before <= agents["web1-proc"].last_heartbeat_ns <= time.time_ns()  # filed when it came
    stored = await live_hub.query()
    future = next(s for s in stored if s.event.event_id == "web1-proc-0")
    assert future.event.ts_ns == far_future, "the agent's own claim is kept in the event"
    assert future.received_ns <= time.time_ns()
    assert live_hub.hub.metrics.registry.get_sample_value("amoskys_bus_future_events_total") == 2


async def test_chain_alerts_are_rate_limited_per_agent(live_hub: LiveHub) -> None:
    agent = live_hub.agent("web1-proc")
    for _ in range(20):  # an agent that resets its chain over and over
        agent.chain = ChainState.fresh()
        assert (await live_hub.publish(agent, agent.seal(make_events(1)))).status == Ack.OK
    alerts = await live_hub.query(bus_pb2.EventFilter(kinds=["alert"]))
    assert [a.event.alert.rule for a in alerts] == ["bus.chain_reset"]
    assert len([s for s in await live_hub.query() if s.agent_id == "web1-proc"]) == 20


@pytest.mark.parametrize(
    ("request_fields", "complaint"),
    [
        ({"page_token": base64.urlsafe_b64encode(b"%d:1" % 2**70).decode()}, "invalid page token"),
        ({"page_token": "x" * 100_000}, "invalid page token"),
        ({"filter": bus_pb2.EventFilter(hosts=[f"h{i}" for i in range(300_000)])}, "filter.hosts"),
        ({"filter": bus_pb2.EventFilter(text="x" * 5000)}, "filter.text"),
    ],
)
async def test_bad_queries_are_invalid_arguments(
    live_hub: LiveHub, request_fields: dict[str, object], complaint: str
) -> None:
    async with live_hub.channel(live_hub.consumer_tls()) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await hub_stub(channel).Query(bus_pb2.QueryRequest(**request_fields), timeout=10)  # type: ignore[arg-type]
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert complaint in (caught.value.details() or "")


class _FailingStore:
    """The real store, except that commits fail the way a bug in the writer would (not a store error)."""

    def __init__(self, hub: Hub) -> None:
        self.real = hub.store

    def commit(self, accepted: list[AcceptedEnvelope], chains: dict[str, ChainRecord], now_ns: int) -> None:
        raise OverflowError("Python int too large to convert to SQLite INTEGER")

    def __getattr__(self, name: str) -> object:
        return getattr(self.real, name)


async def test_a_dead_writer_stops_the_hub_with_a_non_zero_status(test_pki: TestPki, tmp_path: Path) -> None:
    config = hub_config(test_pki, tmp_path)
    hub = create_server(config)
    running = asyncio.create_task(hub.run())
    while not hub.port:
        await asyncio.sleep(0.01)
    live = LiveHub(hub, test_pki, config)
    agent = live.agent("web1-proc")
    async with live.channel(agent.tls) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        hub.ingest.store = _FailingStore(hub)  # type: ignore[assignment]
        ack = await hub_stub(channel).Publish(agent.seal(make_events(1)), timeout=10)
        assert (ack.status, ack.reason.split(":")[0]) == (Ack.RETRY, "unavailable")
        assert (await asyncio.wait_for(watch.read(), 10)).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()
    assert await asyncio.wait_for(running, 30) == 1
    assert hub.ingest.failure is not None
