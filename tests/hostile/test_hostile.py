"""Issue 11 as an attacker holding one enrolled host's certificate and signing key would try it.

The hub runs as a real process (`amoskys eventbus`); the client is tests/hostile/client.py, written
from the proto only. Every case asserts the documented answer (status and reason prefix), that
nothing of it was stored (queried as a consumer), and that a legitimate agent is served right after,
within 1 s.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from amoskys.v1 import bus_pb2, envelope_pb2, events_pb2
from tests.hostile.client import (
    GENESIS,
    Chain,
    Consumer,
    Credentials,
    HostileAgent,
    digest,
    event,
    header_bytes,
    next_ack,
    next_event,
    publish_on,
    publish_stream,
    sign,
    subscribe,
)
from tests.hostile.hub import HubProcess, new_pki
from tests.test_envelope import GOLDEN_DIGEST, GOLDEN_HEADER, GOLDEN_KEY_SEED, GOLDEN_PAYLOAD, GOLDEN_SIG

Ack = envelope_pb2.PublishAck
INT64_MAX = 2**63 - 1
MAX_ENVELOPE_BYTES = 4 * 1024 * 1024  # the hub's default limits (config.LimitsConfig)
MAX_EVENTS = 5000
MAX_EVENT_BYTES = 64 * 1024
SKEW_NS = 300 * 10**9  # default max_clock_skew_s
Outcome = tuple[int, str] | str  # (status, reason prefix), or "refused" (no TLS session)


@dataclass
class Bed:
    """The running hub and the identities the cases use."""

    hub: HubProcess
    agents: dict[str, HostileAgent]
    consumer: Consumer

    @property
    def victim(self) -> HostileAgent:
        return self.agents["web1-proc"]

    @property
    def address(self) -> str:
        return self.hub.address


ENROLLED = [  # (agent id, host, kind)
    ("web1-proc", "web1", "proc"),
    ("good1-proc", "good1", "proc"),
    ("other1-proc", "other1", "proc"),
    ("web1-auth", "web1", "auth"),
    ("web1-host", "web1", "host"),
    ("revoked1-proc", "revoked1", "proc"),
    ("doomed1-proc", "doomed1", "proc"),
    ("reset1-proc", "reset1", "proc"),
    ("many1-proc", "many1", "proc"),
    ("hb1-proc", "hb1", "proc"),
]


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    root = tmp_path_factory.mktemp("hostile")
    hub = HubProcess(root, new_pki(root / "pki"))
    agents = {agent_id: hub.enrol(agent_id, host, kind) for agent_id, host, kind in ENROLLED}
    far = hub.far_future_credentials("far1-proc", dt.datetime(2300, 1, 1, tzinfo=dt.UTC))
    agents["far1-proc"] = hub.enrol("far1-proc", "far1", "proc", far)
    hub.start()
    try:
        yield Bed(hub, agents, hub.consumer())
    finally:
        hub.stop()


def test_the_client_reads_the_wire_protocol_as_the_golden_vector_pins_it() -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    envelope = sign(Ed25519PrivateKey.from_private_bytes(GOLDEN_KEY_SEED), GOLDEN_HEADER, GOLDEN_PAYLOAD)
    assert envelope.sig == GOLDEN_SIG
    assert digest(GOLDEN_HEADER, GOLDEN_PAYLOAD) == GOLDEN_DIGEST


@contextlib.asynccontextmanager
async def served_after(bed: Bed) -> AsyncIterator[None]:
    """Around a case: a legitimate agent's channel is ready before, and its publish is acked OK within 1 s after."""
    good = bed.agents["good1-proc"]
    async with good.tls.channel(bed.address) as channel:
        await asyncio.wait_for(channel.channel_ready(), 10)
        yield
        ack = await publish_on(channel, good.seal(good.events(1, "good")).SerializeToString(), timeout=1.0)
    assert ack.status == Ack.OK, ack


def _expect(outcome: Outcome, expected: Outcome) -> None:
    if isinstance(expected, str):
        assert outcome == expected
        return
    assert isinstance(outcome, tuple), outcome
    assert (outcome[0], outcome[1][: len(expected[1])]) == expected, outcome


# ---- the cases: each returns what the hub answered ----------------------------------------------

Case = Callable[[Bed, str], Awaitable[Outcome]]


async def _send(bed: Bed, agent: HostileAgent, envelope: envelope_pb2.Envelope | bytes) -> Outcome:
    ack = await agent.publish(bed.address, envelope)
    code = envelope_pb2.PublishAck.Reason.Name(ack.reason_code).removeprefix("REASON_").lower()
    assert ack.reason.split(":")[0] == (code if ack.reason_code else ""), ack  # the enum names what the text says
    return ack.status, ack.reason


def _fresh(agent: HostileAgent) -> HostileAgent:
    agent.chain = Chain()
    return agent


def _payload(agent: HostileAgent, mark: str, count: int = 1) -> bytes:
    return events_pb2.EventBatch(events=agent.events(count, mark)).SerializeToString()


async def _events(bed: Bed, mark: str, mutate: Callable[[events_pb2.Event], object]) -> Outcome:
    """The victim signs (validly) one event it altered."""
    victim = _fresh(bed.victim)
    events = victim.events(1, mark)
    mutate(events[0])
    return await _send(bed, victim, victim.seal(events))


async def _header(bed: Bed, mark: str, **fields: object) -> Outcome:
    """The victim signs (validly) one event under a header with these fields."""
    victim = bed.victim
    head: dict[str, object] = {"seq": 1, "prev_hash": GENESIS, "chain_id": Chain().chain_id, "event_count": 1}
    head.update(fields)
    raw = header_bytes(victim.agent_id, **head)  # type: ignore[arg-type]
    return await _send(bed, victim, victim.signed(raw, _payload(victim, mark)))


async def _refused(bed: Bed, tls: Credentials | None, mark: str) -> Outcome:
    victim = _fresh(bed.victim)
    raw = victim.seal(victim.events(1, mark)).SerializeToString()
    try:
        if tls is None:
            async with grpc.aio.insecure_channel(bed.address) as channel:
                await publish_on(channel, raw, timeout=5)
        else:
            async with tls.channel(bed.address) as channel:
                await publish_on(channel, raw, timeout=5)
    except grpc.aio.AioRpcError as exc:
        return "refused" if exc.code() == grpc.StatusCode.UNAVAILABLE else f"failed: {exc.code()}"
    return "accepted"


async def malformed_bytes(bed: Bed, mark: str) -> Outcome:
    return await _send(bed, bed.victim, b"\xff\x00\x13garbage")


async def empty_envelope(bed: Bed, mark: str) -> Outcome:
    return await _send(bed, bed.victim, b"")


async def missing_signature(bed: Bed, mark: str) -> Outcome:
    envelope = _fresh(bed.victim).seal(bed.victim.events(1, mark))
    envelope.ClearField("sig")
    return await _send(bed, bed.victim, envelope)


async def oversized(bed: Bed, mark: str) -> Outcome:
    events = bed.victim.events(1, mark)
    events[0].labels["pad"] = "x" * (MAX_ENVELOPE_BYTES + 10)
    return await _send(bed, bed.victim, _fresh(bed.victim).seal(events))


async def too_many_events(bed: Bed, mark: str) -> Outcome:
    return await _send(bed, bed.victim, _fresh(bed.victim).seal(bed.victim.events(MAX_EVENTS + 1, mark)))


async def event_count_mismatch(bed: Bed, mark: str) -> Outcome:
    victim = _fresh(bed.victim)
    return await _send(bed, victim, victim.seal_bytes(_payload(victim, mark, 2), 1))


async def bad_signature(bed: Bed, mark: str) -> Outcome:
    envelope = _fresh(bed.victim).seal(bed.victim.events(1, mark))
    envelope.sig = bytes([envelope.sig[0] ^ 1]) + envelope.sig[1:]
    return await _send(bed, bed.victim, envelope)


async def another_agents_key(bed: Bed, mark: str) -> Outcome:
    victim, other = bed.victim, bed.agents["other1-proc"]
    raw = header_bytes(victim.agent_id, 1, GENESIS, Chain().chain_id, 1)
    return await _send(bed, victim, other.signed(raw, _payload(victim, mark)))


async def cn_not_agent_id(bed: Bed, mark: str) -> Outcome:
    """Someone else's certificate, claiming the victim's agent id (and holding its key)."""
    impostor = HostileAgent("web1-proc", "web1", "proc", bed.hub.credentials("someone-else"), bed.victim.key)
    return await _send(bed, impostor, impostor.seal(impostor.events(1, mark)))


async def unknown_agent(bed: Bed, mark: str) -> Outcome:
    stranger = HostileAgent("stranger1-proc", "stranger1", "proc", bed.hub.credentials("stranger1-proc"))
    return await _send(bed, stranger, stranger.seal(stranger.events(1, mark)))


async def revoked_cert(bed: Bed, mark: str) -> Outcome:
    agent = bed.agents["revoked1-proc"]
    bed.hub.revoke(agent.tls)
    assert bed.hub.reload()["revoked"] >= 1
    return await _send(bed, agent, agent.seal(agent.events(1, mark)))


async def expired_cert(bed: Bed, mark: str) -> Outcome:
    key, cert = bed.hub.pki.issue("expired1-proc", "client", days=0)
    return await _refused(bed, Credentials(bed.hub.pki.ca_cert, cert, key), mark)


async def cert_from_another_ca(bed: Bed, mark: str) -> Outcome:
    rogue = new_pki(bed.hub.root / "rogue")
    key, cert = rogue.issue("web1-proc", "client")
    return await _refused(bed, Credentials(bed.hub.pki.ca_cert, cert, key), mark)


async def server_usage_cert_as_agent(bed: Bed, mark: str) -> Outcome:
    key, cert = bed.hub.pki.issue("srv1-proc", "server")
    return await _refused(bed, Credentials(bed.hub.pki.ca_cert, cert, key), mark)


async def plaintext_client(bed: Bed, mark: str) -> Outcome:
    return await _refused(bed, None, mark)


async def replayed_envelope(bed: Bed, mark: str) -> Outcome:
    envelope = _fresh(bed.victim).seal(bed.victim.events(1, mark + "-stored"))
    assert await _send(bed, bed.victim, envelope) == (Ack.OK, "")
    return await _send(bed, bed.victim, envelope)


async def forked_seq(bed: Bed, mark: str) -> Outcome:
    victim = _fresh(bed.victim)
    assert await _send(bed, victim, victim.seal(victim.events(1, mark + "-stored"))) == (Ack.OK, "")
    victim.chain.last_seq, victim.chain.last_hash = 0, GENESIS  # seq 1 again, other bytes
    return await _send(bed, victim, victim.seal(victim.events(1, mark)))


async def chain_break(bed: Bed, mark: str) -> Outcome:
    victim = _fresh(bed.victim)
    assert await _send(bed, victim, victim.seal(victim.events(1, mark + "-stored"))) == (Ack.OK, "")
    victim.chain.last_hash = b"\x01" * 32
    return await _send(bed, victim, victim.seal(victim.events(1, mark)))


async def seq_gap(bed: Bed, mark: str) -> Outcome:
    victim = _fresh(bed.victim)
    assert await _send(bed, victim, victim.seal(victim.events(1, mark + "-stored"))) == (Ack.OK, "")
    victim.chain.last_seq += 1
    return await _send(bed, victim, victim.seal(victim.events(1, mark)))


async def unsupported_version(bed: Bed, mark: str) -> Outcome:
    return await _header(bed, mark, version=2)


async def malformed_header(bed: Bed, mark: str) -> Outcome:
    return await _send(bed, bed.victim, bed.victim.signed(b"\xff\xff\xff\xff", _payload(bed.victim, mark)))


async def malformed_payload(bed: Bed, mark: str) -> Outcome:
    return await _send(bed, bed.victim, _fresh(bed.victim).seal_bytes(b"\xff\xff\xff\xff", 1))


async def event_too_large(bed: Bed, mark: str) -> Outcome:
    return await _events(bed, mark, lambda e: e.labels.__setitem__("blob", "x" * (MAX_EVENT_BYTES + 1)))


async def bad_genesis(bed: Bed, mark: str) -> Outcome:
    return await _header(bed, mark, prev_hash=b"\x07" * 32)


async def unknown_chain_midway(bed: Bed, mark: str) -> Outcome:
    return await _header(bed, mark, seq=5, prev_hash=b"\x07" * 32)


async def seq_2_63(bed: Bed, mark: str) -> Outcome:
    return await _header(bed, mark, seq=2**63, prev_hash=b"\x07" * 32)


async def seq_2_64_minus_1(bed: Bed, mark: str) -> Outcome:
    return await _header(bed, mark, seq=2**64 - 1, prev_hash=b"\x07" * 32)


async def seq_zero(bed: Bed, mark: str) -> Outcome:
    return await _header(bed, mark, seq=0)


async def empty_chain_id(bed: Bed, mark: str) -> Outcome:
    return await _header(bed, mark, chain_id=b"")


async def long_chain_id(bed: Bed, mark: str) -> Outcome:
    return await _header(bed, mark, chain_id=b"c" * 17)


async def short_prev_hash(bed: Bed, mark: str) -> Outcome:
    return await _header(bed, mark, prev_hash=b"\x00" * 31)


async def huge_header(bed: Bed, mark: str) -> Outcome:
    return await _header(bed, mark, chain_id=b"c" * 100_000)


async def forged_host(bed: Bed, mark: str) -> Outcome:
    return await _events(bed, mark, lambda e: setattr(e, "host", "db1"))


async def forged_agent_kind(bed: Bed, mark: str) -> Outcome:
    return await _events(bed, mark, lambda e: setattr(e, "agent", "auth"))


async def posing_as_hub(bed: Bed, mark: str) -> Outcome:
    return await _events(bed, mark, lambda e: setattr(e, "agent", "eventbus"))


async def hub_alert_rule(bed: Bed, mark: str) -> Outcome:
    return await _events(bed, mark, lambda e: e.alert.CopyFrom(events_pb2.Alert(rule="bus.chain_break")))


async def body_of_another_kind(bed: Bed, mark: str) -> Outcome:
    return await _events(bed, mark, lambda e: e.auth.CopyFrom(events_pb2.AuthEvent(raw="Accepted password for root")))


async def no_body(bed: Bed, mark: str) -> Outcome:
    return await _events(bed, mark, lambda e: e.ClearField("process"))


async def negative_timestamp(bed: Bed, mark: str) -> Outcome:
    return await _events(bed, mark, lambda e: setattr(e, "ts_ns", -5))


async def unknown_severity(bed: Bed, mark: str) -> Outcome:
    return await _events(bed, mark, lambda e: setattr(e, "severity", 99))


async def empty_event_id(bed: Bed, mark: str) -> Outcome:
    return await _events(bed, mark, lambda e: setattr(e, "event_id", ""))


async def heartbeat_interval_zero(bed: Bed, mark: str) -> Outcome:
    return await _events(bed, mark, lambda e: e.heartbeat.CopyFrom(events_pb2.Heartbeat(interval_s=0)))


async def nan_in_metrics(bed: Bed, mark: str) -> Outcome:
    agent = _fresh(bed.agents["web1-host"])
    bad = event("web1", "host", mark, host_metrics=events_pb2.HostMetrics(cpu_percent=float("nan")))
    return await _send(bed, agent, agent.seal([bad]))


async def port_past_65535(bed: Bed, mark: str) -> Outcome:
    agent = _fresh(bed.agents["web1-auth"])
    bad = event("web1", "auth", mark, auth=events_pb2.AuthEvent(src_port=70000))
    return await _send(bed, agent, agent.seal([bad]))


CASES: list[tuple[Case, Outcome]] = [
    (malformed_bytes, (Ack.INVALID, "malformed")),
    (empty_envelope, (Ack.INVALID, "empty")),
    (missing_signature, (Ack.INVALID, "incomplete")),
    (oversized, (Ack.INVALID, "too_large")),
    (too_many_events, (Ack.INVALID, "too_many_events")),
    (event_count_mismatch, (Ack.INVALID, "event_count_mismatch")),
    (bad_signature, (Ack.INVALID, "bad_signature")),
    (another_agents_key, (Ack.INVALID, "bad_signature")),
    (cn_not_agent_id, (Ack.UNAUTHORIZED, "cn_mismatch")),
    (unknown_agent, (Ack.UNAUTHORIZED, "unknown_agent")),
    (revoked_cert, (Ack.UNAUTHORIZED, "peer: certificate revoked")),
    (expired_cert, "refused"),
    (cert_from_another_ca, "refused"),
    (server_usage_cert_as_agent, "refused"),
    (plaintext_client, "refused"),
    (replayed_envelope, (Ack.OK, "duplicate")),
    (forked_seq, (Ack.INVALID, "fork")),
    (chain_break, (Ack.INVALID, "chain_break")),
    (seq_gap, (Ack.RETRY, "out_of_order")),
    (unsupported_version, (Ack.INVALID, "unsupported_version")),
    (malformed_header, (Ack.INVALID, "malformed")),
    (malformed_payload, (Ack.INVALID, "malformed_payload")),
    (event_too_large, (Ack.INVALID, "event_too_large")),
    (bad_genesis, (Ack.INVALID, "chain_start")),
    (unknown_chain_midway, (Ack.RETRY, "chain_unknown")),
    (seq_2_63, (Ack.INVALID, "bad_seq")),
    (seq_2_64_minus_1, (Ack.INVALID, "bad_seq")),
    (seq_zero, (Ack.INVALID, "bad_seq")),
    (empty_chain_id, (Ack.INVALID, "bad_chain_id")),
    (long_chain_id, (Ack.INVALID, "bad_chain_id")),
    (short_prev_hash, (Ack.INVALID, "bad_prev_hash")),
    (huge_header, (Ack.INVALID, "header_too_large")),
    (forged_host, (Ack.INVALID, "host_mismatch")),
    (forged_agent_kind, (Ack.INVALID, "agent_mismatch")),
    (posing_as_hub, (Ack.INVALID, "agent_mismatch")),
    (hub_alert_rule, (Ack.INVALID, "rule_not_allowed")),
    (body_of_another_kind, (Ack.INVALID, "body_not_allowed")),
    (no_body, (Ack.INVALID, "body_not_allowed")),
    (negative_timestamp, (Ack.INVALID, "bad_ts")),
    (unknown_severity, (Ack.INVALID, "bad_severity")),
    (empty_event_id, (Ack.INVALID, "bad_event_id")),
    (heartbeat_interval_zero, (Ack.INVALID, "bad_interval")),
    (nan_in_metrics, (Ack.INVALID, "bad_number")),
    (port_past_65535, (Ack.INVALID, "bad_port")),
]


@pytest.mark.parametrize(("case", "expected"), CASES, ids=[c[0].__name__ for c in CASES])
async def test_bad_input(bed: Bed, case: Case, expected: Outcome) -> None:
    mark = case.__name__
    async with served_after(bed):
        outcome = await case(bed, mark)
    _expect(outcome, expected)
    assert await bed.consumer.marked(mark) == [], "a refused event was stored"
    forged = await bed.consumer.query(bus_pb2.EventFilter(hosts=["db1"], agents=["eventbus"]))
    assert forged == []


# ---- edges that are accepted, and must not hurt ---------------------------------------------------


async def test_a_certificate_valid_past_2262_is_served_and_clamped(bed: Bed) -> None:
    agent = bed.agents["far1-proc"]
    async with served_after(bed):
        assert await _send(bed, agent, agent.seal(agent.events(1, "far"))) == (Ack.OK, "")
    assert len(await bed.consumer.marked("far")) == 1
    assert (await bed.consumer.agents())["far1-proc"].cert_not_after_ns == INT64_MAX


async def _future_heartbeat(bed: Bed) -> float:
    agent = bed.agents["hb1-proc"]
    heartbeat = event("hb1", "proc", "future", heartbeat=events_pb2.Heartbeat(version="9", interval_s=30))
    heartbeat.ts_ns = INT64_MAX
    before = time.time_ns()
    async with served_after(bed):
        assert await _send(bed, agent, agent.seal([heartbeat])) == (Ack.OK, "")
    return before


async def test_a_heartbeat_at_int64_max_does_not_pin_liveness(bed: Bed) -> None:
    before = await _future_heartbeat(bed)
    info = (await bed.consumer.agents())["hb1-proc"]
    assert before <= info.last_heartbeat_ns <= time.time_ns() + SKEW_NS
    (stored,) = await bed.consumer.marked("future")
    assert stored.event.ts_ns == INT64_MAX, "the agent's claim is kept in the event"
    assert before <= stored.received_ns <= time.time_ns()


async def test_a_heartbeat_at_int64_max_does_not_sort_first(bed: Bed) -> None:
    await _future_heartbeat(bed)
    good = bed.agents["good1-proc"]
    assert await _send(bed, good, good.seal(good.events(1, "later"))) == (Ack.OK, "")
    newest = (await bed.consumer.first_page(1))[0]
    assert newest.event.labels.get("mark") != "future"


@pytest.mark.parametrize(
    ("token", "complaint"),
    [
        ("x" * 100_000, "invalid page token"),
        ("!!!not base64!!!", "invalid page token"),
        (base64.urlsafe_b64encode(b"%d:1" % 2**70).decode(), "invalid page token"),
        (base64.urlsafe_b64encode(b"1:%d" % 2**64).decode(), "invalid page token"),
        (base64.urlsafe_b64encode(b"\xff\xfe").decode(), "invalid page token"),
    ],
)
async def test_page_tokens_huge_or_garbage_are_invalid_arguments(bed: Bed, token: str, complaint: str) -> None:
    async with served_after(bed):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await bed.consumer.query(page_token=token)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert complaint in (caught.value.details() or "")


async def test_300000_host_filters_are_an_invalid_argument(bed: Bed) -> None:
    async with served_after(bed):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await bed.consumer.query(bus_pb2.EventFilter(hosts=[f"h{i}" for i in range(300_000)]))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (caught.value.details() or "").startswith("filter.hosts")


async def test_200_chain_resets_store_a_handful_of_alerts(bed: Bed) -> None:
    agent = bed.agents["reset1-proc"]
    async with served_after(bed), agent.tls.channel(bed.address) as channel:
        for _ in range(200):
            agent.chain = Chain()
            ack = await publish_on(channel, agent.seal(agent.events(1, "reset")).SerializeToString())
            assert ack.status == Ack.OK, ack
    alerts = await bed.consumer.query(bus_pb2.EventFilter(kinds=["alert"], agents=["eventbus"]))
    mine = [a for a in alerts if a.event.alert.details.get("agent_id") == "reset1-proc"]
    assert 1 <= len(mine) <= 3, [a.event.alert.rule for a in mine]
    assert len(await bed.consumer.marked("reset")) == 200


# ---- streams and connections --------------------------------------------------------------------


async def test_500_streams_from_one_certificate_are_capped(bed: Bed) -> None:
    agent = bed.agents["many1-proc"]
    channels = [agent.tls.channel(bed.address) for _ in range(5)]
    calls = [publish_stream(channels[n % 5]) for n in range(500)]
    reads = [asyncio.ensure_future(next_ack(call)) for call in calls]
    try:
        async with served_after(bed):
            done, pending = await asyncio.wait(reads, timeout=30)
            deadline = time.monotonic() + 30
            while len(pending) > 8 and time.monotonic() < deadline:
                more, pending = await asyncio.wait(pending, timeout=1)
                done |= more
        errors = [task.exception() for task in done]
        codes = [error.code() for error in errors if isinstance(error, grpc.aio.AioRpcError)]
        assert (len(codes), len(pending)) == (492, 8)
        assert set(codes) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        still_open = calls[reads.index(next(iter(pending)))]
        await still_open.write(agent.seal(agent.events(1, "streams")).SerializeToString())
        assert (await asyncio.wait_for(next(iter(pending)), 10)).status == Ack.OK
    finally:
        for call in calls:
            call.cancel()
        for channel in channels:
            await channel.close()


async def test_1100_connections_that_never_start_tls(bed: Bed) -> None:
    baseline = bed.hub.fds()
    sockets: list[socket.socket] = []
    try:
        for _ in range(1100):
            sockets.append(socket.create_connection(("127.0.0.1", bed.hub.port), timeout=5))
        await asyncio.sleep(0.5)
        assert bed.hub.fds() >= baseline + 1000, "the hub did not accept them all"
        good = bed.agents["good1-proc"]
        assert (await good.publish(bed.address, good.seal(good.events(1, "good")), timeout=5)).status == Ack.OK
        await asyncio.sleep(2.0 + 3.0)  # handshake_timeout_s (2 s in this config), and some room
        closed = sum(1 for s in sockets if _closed_by_peer(s))
        assert closed == 1100
        assert bed.hub.fds() < baseline + 50
    finally:
        for s in sockets:
            s.close()
    async with served_after(bed):
        pass


def _closed_by_peer(sock: socket.socket) -> bool:
    sock.settimeout(0.5)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


async def test_revocation_ends_a_live_subscribe_stream_on_sighup(bed: Bed) -> None:
    doomed = bed.hub.consumer("doomed-ui")
    agent = bed.agents["doomed1-proc"]
    async with doomed.tls.channel(bed.address) as channel, agent.tls.channel(bed.address) as publisher:
        stream = subscribe(channel, bus_pb2.SubscribeRequest(filter=bus_pb2.EventFilter(hosts=["doomed1"])))
        live = publish_stream(publisher)
        await live.write(agent.seal(agent.events(1, "doomed")).SerializeToString())
        assert (await next_ack(live)).status == Ack.OK
        assert (await asyncio.wait_for(next_event(stream), 10)).event.labels["mark"] == "doomed"
        async with served_after(bed):
            bed.hub.revoke(doomed.tls)
            bed.hub.revoke(agent.tls)
            bed.hub.reload()
            for call in (stream, live):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await asyncio.wait_for(call.read(), 10)
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "revoked" in (caught.value.details() or "")


@pytest.fixture
def flood_bed(tmp_path: Path) -> Iterator[Bed]:
    """A hub of its own (the floods fill its store), with 20 stalled consumers configured."""
    hub = HubProcess(
        tmp_path, new_pki(tmp_path / "pki"), consumers=["ui", *STALLED],
        limits={"handshake_timeout_s": 2.0, "write_timeout_s": 2.0},
        backpressure={"high_water_events": 2000, "max_pending_per_agent": 1000},  # as tests/eventbus/test_fairness
    )  # fmt: skip
    agents = {f"flood{n}-proc": hub.enrol(f"flood{n}-proc", f"flood{n}", "proc") for n in (1, 2)}
    agents["good1-proc"] = hub.enrol("good1-proc", "good1", "proc")
    hub.start()
    try:
        yield Bed(hub, agents, hub.consumer())
    finally:
        hub.stop()


STALLED = [f"stall{n}" for n in range(20)]


async def test_two_floods_and_20_stalled_consumers_do_not_starve_a_well_behaved_agent(flood_bed: Bed) -> None:
    from tests.hostile.pressure import Pressure

    async with Pressure(flood_bed.hub, [flood_bed.agents[f"flood{n}-proc"] for n in (1, 2)], STALLED) as pressure:
        await pressure.until_held_back()
        good = flood_bed.agents["good1-proc"]
        async with good.tls.channel(flood_bed.address) as channel:
            statuses = []
            for _ in range(30):
                raw = good.seal(good.events(10, "good")).SerializeToString()
                statuses.append((await publish_on(channel, raw, timeout=5)).status)
                await asyncio.sleep(0.01)
    assert statuses == [Ack.OK] * 30
    assert pressure.answers["RETRY"] > 0, pressure.answers
    assert len(await flood_bed.consumer.marked("good")) == 300
