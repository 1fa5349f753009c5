"""Every bad input: the right status, nothing stored for it, and the hub serves the next good client."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import pytest

from amoskys import keys, pki
from amoskys.client import hub_stub
from amoskys.config import TlsConfig
from amoskys.envelope import ChainState, reason_label, seal
from amoskys.v1 import bus_pb2, envelope_pb2, events_pb2
from tests.hubfixture import AgentIdentity, LiveHub, make_events

Ack = envelope_pb2.PublishAck
Outcome = tuple[int, str] | str  # (status, reason prefix) or "refused" (no TLS session)
Case = Callable[[LiveHub, AgentIdentity], Awaitable[Outcome]]


def _header(agent: AgentIdentity, **fields: object) -> bytes:
    base: dict[str, object] = {
        "version": 1, "agent_id": agent.agent_id, "seq": 1, "prev_hash": bytes(32), "chain_id": b"c" * 16,
        "event_count": 1,
    }  # fmt: skip
    base.update(fields)
    return envelope_pb2.EnvelopeHeader(**base).SerializeToString()  # type: ignore[arg-type]


def _signed(agent: AgentIdentity, header: bytes, payload: bytes, key: object = None) -> envelope_pb2.Envelope:
    from amoskys.envelope import signing_message

    signer = key or agent.signing_key
    return envelope_pb2.Envelope(header=header, payload=payload, sig=signer.sign(signing_message(header, payload)))  # type: ignore[attr-defined]


def _marked(count: int, mark: str) -> list[events_pb2.Event]:
    """Events of the victim's enrolled host, marked so the test can tell which case stored them."""
    events = make_events(count)
    for event in events:
        event.labels["mark"] = mark
    return events


def _payload(count: int = 1) -> bytes:
    return events_pb2.EventBatch(events=_marked(count, "bad")).SerializeToString()


async def _ack(hub: LiveHub, agent: AgentIdentity, envelope: envelope_pb2.Envelope) -> Outcome:
    return _outcome(await hub.publish(agent, envelope))


async def _raw(hub: LiveHub, agent: AgentIdentity, raw: bytes) -> Outcome:
    return _outcome(await hub.publish_raw(agent, raw))


def _outcome(ack: envelope_pb2.PublishAck) -> Outcome:
    """Status and text; the reason code always names what the text starts with."""
    assert ack.reason.split(":")[0] == (reason_label(ack.reason_code) if ack.reason_code else ""), ack
    return ack.status, ack.reason


async def _refused(hub: LiveHub, tls: TlsConfig | None, agent: AgentIdentity) -> Outcome:
    envelope = agent.seal(_marked(1, "bad"))
    try:
        if tls is None:
            async with grpc.aio.insecure_channel(hub.address) as channel:
                await hub_stub(channel).Publish(envelope, timeout=5)
        else:  # raw credentials: our own client refuses such identities before dialling
            credentials = grpc.ssl_channel_credentials(
                Path(tls.ca).read_bytes(), Path(tls.key).read_bytes(), Path(tls.cert).read_bytes()
            )
            options = [("grpc.ssl_target_name_override", "localhost")]
            async with grpc.aio.secure_channel(hub.address, credentials, options) as channel:
                await hub_stub(channel).Publish(envelope, timeout=5)
    except grpc.aio.AioRpcError as exc:
        return "refused" if exc.code() == grpc.StatusCode.UNAVAILABLE else f"failed: {exc.code()}"
    return "accepted"


async def malformed_bytes(hub: LiveHub, a: AgentIdentity) -> Outcome:
    return await _raw(hub, a, b"\xff\x00\x13garbage")


async def empty_envelope(hub: LiveHub, a: AgentIdentity) -> Outcome:
    return await _raw(hub, a, b"")


async def missing_signature(hub: LiveHub, a: AgentIdentity) -> Outcome:
    return await _ack(hub, a, envelope_pb2.Envelope(header=_header(a), payload=_payload()))


async def oversized(hub: LiveHub, a: AgentIdentity) -> Outcome:
    big = events_pb2.EventBatch(events=_marked(1, "x" * (hub.config.limits.max_envelope_bytes + 10)))
    return await _ack(hub, a, _signed(a, _header(a), big.SerializeToString()))


async def too_many_events(hub: LiveHub, a: AgentIdentity) -> Outcome:
    count = hub.config.limits.max_events_per_batch + 1
    return await _ack(hub, a, _signed(a, _header(a, event_count=count), _payload(count)))


async def event_count_mismatch(hub: LiveHub, a: AgentIdentity) -> Outcome:
    return await _ack(hub, a, _signed(a, _header(a, event_count=1), _payload(2)))


async def bad_signature(hub: LiveHub, a: AgentIdentity) -> Outcome:
    envelope = a.seal(_marked(1, "bad"))
    envelope.sig = bytes([envelope.sig[0] ^ 1]) + envelope.sig[1:]
    return await _ack(hub, a, envelope)


async def another_agents_key(hub: LiveHub, a: AgentIdentity) -> Outcome:
    other = hub.agent("other-agent")
    return await _ack(hub, a, _signed(a, _header(a), _payload(), other.signing_key))


async def cn_not_agent_id(hub: LiveHub, a: AgentIdentity) -> Outcome:
    impostor = hub.agent("impostor", cert_cn="someone-else")
    return await _ack(hub, impostor, impostor.seal(_marked(1, "bad")))


async def unknown_agent(hub: LiveHub, a: AgentIdentity) -> Outcome:
    stranger = hub.agent("stranger", trusted=False)
    return await _ack(hub, stranger, stranger.seal(_marked(1, "bad")))


async def revoked_cert(hub: LiveHub, a: AgentIdentity) -> Outcome:
    victim = hub.agent("revoked-agent")
    pki.revoke(hub.pki.ca, Path(hub.config.crl), [pki.load_certificate(Path(victim.tls.cert)).serial_number])
    hub.hub.trust.reload()
    return await _ack(hub, victim, victim.seal(_marked(1, "bad")))


async def expired_cert(hub: LiveHub, a: AgentIdentity) -> Outcome:
    key, cert = pki.issue(hub.pki.ca, hub.pki.root / "expired", a.agent_id, "client", [], days=0)
    return await _refused(hub, TlsConfig(ca=str(hub.pki.ca_cert), cert=str(cert), key=str(key)), a)


async def cert_from_another_ca(hub: LiveHub, a: AgentIdentity) -> Outcome:
    other_ca = pki.init_ca(hub.pki.root / "rogue-ca")
    key, cert = pki.issue(other_ca, hub.pki.root / "rogue", a.agent_id, "client", [])
    return await _refused(hub, TlsConfig(ca=str(hub.pki.ca_cert), cert=str(cert), key=str(key)), a)


async def plaintext_client(hub: LiveHub, a: AgentIdentity) -> Outcome:
    return await _refused(hub, None, a)


async def replayed_envelope(hub: LiveHub, a: AgentIdentity) -> Outcome:
    envelope = a.seal(_marked(2, "replay"))
    first = await _ack(hub, a, envelope)
    assert first == (Ack.OK, "")
    return await _ack(hub, a, envelope)


async def forked_seq(hub: LiveHub, a: AgentIdentity) -> Outcome:
    assert await _ack(hub, a, a.seal(_marked(1, "good"))) == (Ack.OK, "")
    fork = ChainState(a.chain.chain_id)  # same chain, seq 1 again, different bytes
    envelope, _ = seal(a.agent_id, events_pb2.EventBatch(events=_marked(1, "bad")), fork, a.signing_key)
    return await _ack(hub, a, envelope)


async def chain_break(hub: LiveHub, a: AgentIdentity) -> Outcome:
    assert await _ack(hub, a, a.seal(_marked(1, "good"))) == (Ack.OK, "")
    a.chain = dataclasses.replace(a.chain, last_hash=b"\x01" * 32)
    return await _ack(hub, a, a.seal(_marked(1, "bad")))


async def seq_gap(hub: LiveHub, a: AgentIdentity) -> Outcome:
    assert await _ack(hub, a, a.seal(_marked(1, "good"))) == (Ack.OK, "")
    a.chain = dataclasses.replace(a.chain, last_seq=a.chain.last_seq + 1)
    return await _ack(hub, a, a.seal(_marked(1, "bad")))


async def unsupported_version(hub: LiveHub, a: AgentIdentity) -> Outcome:
    return await _ack(hub, a, _signed(a, _header(a, version=2), _payload()))


async def malformed_header(hub: LiveHub, a: AgentIdentity) -> Outcome:
    return await _ack(hub, a, _signed(a, b"\xff\xff\xff\xff", _payload()))


async def malformed_payload(hub: LiveHub, a: AgentIdentity) -> Outcome:
    return await _ack(hub, a, _signed(a, _header(a), b"\xff\xff\xff\xff"))


async def event_too_large(hub: LiveHub, a: AgentIdentity) -> Outcome:
    events = _marked(1, "bad")
    events[0].labels["blob"] = "x" * (hub.config.limits.max_event_bytes + 1)
    return await _ack(hub, a, _signed(a, _header(a), events_pb2.EventBatch(events=events).SerializeToString()))


async def bad_genesis(hub: LiveHub, a: AgentIdentity) -> Outcome:
    return await _ack(hub, a, _signed(a, _header(a, prev_hash=b"\x07" * 32), _payload()))


async def unknown_chain_midway(hub: LiveHub, a: AgentIdentity) -> Outcome:
    return await _ack(hub, a, _signed(a, _header(a, seq=5, prev_hash=b"\x07" * 32), _payload()))


async def server_usage_cert_as_agent(hub: LiveHub, a: AgentIdentity) -> Outcome:
    key, cert = pki.issue(hub.pki.ca, hub.pki.root / "srv", a.agent_id, "server", [])
    return await _refused(hub, TlsConfig(ca=str(hub.pki.ca_cert), cert=str(cert), key=str(key)), a)


def _with(mutate: Callable[[events_pb2.Event], object]) -> list[events_pb2.Event]:
    events = _marked(1, "bad")
    mutate(events[0])
    return events


async def _signed_events(hub: LiveHub, a: AgentIdentity, events: list[events_pb2.Event]) -> Outcome:
    return await _ack(hub, a, a.seal(events))


async def other_host(hub: LiveHub, a: AgentIdentity) -> Outcome:
    return await _signed_events(hub, a, _with(lambda e: setattr(e, "host", "db1")))


async def other_agent_kind(hub: LiveHub, a: AgentIdentity) -> Outcome:
    return await _signed_events(hub, a, _with(lambda e: setattr(e, "agent", "auth")))


async def posing_as_hub(hub: LiveHub, a: AgentIdentity) -> Outcome:
    return await _signed_events(hub, a, _with(lambda e: setattr(e, "agent", "eventbus")))


async def body_of_another_kind(hub: LiveHub, a: AgentIdentity) -> Outcome:
    return await _signed_events(hub, a, _with(lambda e: e.auth.CopyFrom(events_pb2.AuthEvent(raw="Accepted"))))


async def hub_alert_rule(hub: LiveHub, a: AgentIdentity) -> Outcome:
    return await _signed_events(hub, a, _with(lambda e: e.alert.CopyFrom(events_pb2.Alert(rule="bus.chain_break"))))


async def no_body(hub: LiveHub, a: AgentIdentity) -> Outcome:
    return await _signed_events(hub, a, _with(lambda e: e.ClearField("process")))


async def seq_past_int64(hub: LiveHub, a: AgentIdentity) -> Outcome:
    return await _ack(hub, a, _signed(a, _header(a, seq=2**63, prev_hash=b"\x07" * 32), _payload()))


async def seq_zero(hub: LiveHub, a: AgentIdentity) -> Outcome:
    return await _ack(hub, a, _signed(a, _header(a, seq=0), _payload()))


async def short_chain_id(hub: LiveHub, a: AgentIdentity) -> Outcome:
    return await _ack(hub, a, _signed(a, _header(a, chain_id=b""), _payload()))


async def oversized_header(hub: LiveHub, a: AgentIdentity) -> Outcome:
    return await _ack(hub, a, _signed(a, _header(a, chain_id=b"c" * 4096), _payload()))


async def negative_timestamp(hub: LiveHub, a: AgentIdentity) -> Outcome:
    return await _signed_events(hub, a, _with(lambda e: setattr(e, "ts_ns", -5)))


async def unknown_severity(hub: LiveHub, a: AgentIdentity) -> Outcome:
    return await _signed_events(hub, a, _with(lambda e: setattr(e, "severity", 99)))


async def heartbeat_interval_zero(hub: LiveHub, a: AgentIdentity) -> Outcome:
    return await _signed_events(hub, a, _with(lambda e: e.heartbeat.CopyFrom(events_pb2.Heartbeat(interval_s=0))))


async def nan_in_metrics(hub: LiveHub, a: AgentIdentity) -> Outcome:
    host = hub.agent("web1-host")
    events = make_events(1, agent="host")
    events[0].host_metrics.CopyFrom(events_pb2.HostMetrics(cpu_percent=float("nan")))
    events[0].labels["mark"] = "bad"
    return await _signed_events(hub, host, events)


async def port_past_65535(hub: LiveHub, a: AgentIdentity) -> Outcome:
    auth = hub.agent("web1-auth")
    events = make_events(1, agent="auth")
    events[0].auth.CopyFrom(events_pb2.AuthEvent(src_port=70000))
    events[0].labels["mark"] = "bad"
    return await _signed_events(hub, auth, events)


CASES: list[tuple[Case, Outcome, int]] = [
    # (case, expected outcome, events the case itself legitimately stores for this agent)
    (malformed_bytes, (Ack.INVALID, "malformed"), 0),
    (empty_envelope, (Ack.INVALID, "empty"), 0),
    (missing_signature, (Ack.INVALID, "incomplete"), 0),
    (oversized, (Ack.INVALID, "too_large"), 0),
    (too_many_events, (Ack.INVALID, "too_many_events"), 0),
    (event_count_mismatch, (Ack.INVALID, "event_count_mismatch"), 0),
    (bad_signature, (Ack.INVALID, "bad_signature"), 0),
    (another_agents_key, (Ack.INVALID, "bad_signature"), 0),
    (cn_not_agent_id, (Ack.UNAUTHORIZED, "cn_mismatch"), 0),
    (unknown_agent, (Ack.UNAUTHORIZED, "unknown_agent"), 0),
    (revoked_cert, (Ack.UNAUTHORIZED, "peer: certificate revoked"), 0),
    (expired_cert, "refused", 0),
    (cert_from_another_ca, "refused", 0),
    (plaintext_client, "refused", 0),
    (replayed_envelope, (Ack.OK, "duplicate"), 2),
    (forked_seq, (Ack.INVALID, "fork"), 1),
    (chain_break, (Ack.INVALID, "chain_break"), 1),
    (seq_gap, (Ack.RETRY, "out_of_order"), 1),
    (unsupported_version, (Ack.INVALID, "unsupported_version"), 0),
    (malformed_header, (Ack.INVALID, "malformed"), 0),
    (malformed_payload, (Ack.INVALID, "malformed_payload"), 0),
    (event_too_large, (Ack.INVALID, "event_too_large"), 0),
    (bad_genesis, (Ack.INVALID, "chain_start"), 0),
    (unknown_chain_midway, (Ack.RETRY, "chain_unknown"), 0),
    (server_usage_cert_as_agent, "refused", 0),
    (other_host, (Ack.INVALID, "host_mismatch"), 0),
    (other_agent_kind, (Ack.INVALID, "agent_mismatch"), 0),
    (posing_as_hub, (Ack.INVALID, "agent_mismatch"), 0),
    (body_of_another_kind, (Ack.INVALID, "body_not_allowed"), 0),
    (hub_alert_rule, (Ack.INVALID, "rule_not_allowed"), 0),
    (no_body, (Ack.INVALID, "body_not_allowed"), 0),
    (seq_past_int64, (Ack.INVALID, "bad_seq"), 0),
    (seq_zero, (Ack.INVALID, "bad_seq"), 0),
    (short_chain_id, (Ack.INVALID, "bad_chain_id"), 0),
    (oversized_header, (Ack.INVALID, "header_too_large"), 0),
    (negative_timestamp, (Ack.INVALID, "bad_ts"), 0),
    (unknown_severity, (Ack.INVALID, "bad_severity"), 0),
    (heartbeat_interval_zero, (Ack.INVALID, "bad_interval"), 0),
    (nan_in_metrics, (Ack.INVALID, "bad_number"), 0),
    (port_past_65535, (Ack.INVALID, "bad_port"), 0),
]


@pytest.mark.parametrize(("case", "expected", "stored"), CASES, ids=[c[0].__name__ for c in CASES])
async def test_bad_input(live_hub: LiveHub, case: Case, expected: Outcome, stored: int) -> None:
    agent = live_hub.agent("victim")
    outcome = await case(live_hub, agent)
    if isinstance(expected, tuple):
        assert isinstance(outcome, tuple), outcome
        assert outcome[0] == expected[0], outcome
        assert outcome[1].startswith(expected[1]), outcome
    else:
        assert outcome == expected
    everything = await live_hub.query()
    assert not [s for s in everything if s.event.labels.get("mark") == "bad"], "a rejected event was stored"
    assert len([s for s in everything if s.agent_id != "eventbus"]) == stored
    good = live_hub.agent("good-agent")
    ack = await live_hub.publish(good, good.seal(make_events(1)))
    assert ack.status == Ack.OK


@pytest.mark.parametrize("case", [forked_seq, chain_break], ids=["fork", "chain_break"])
async def test_forks_and_breaks_raise_alert_events(live_hub: LiveHub, case: Case) -> None:
    await case(live_hub, live_hub.agent("victim"))
    alerts = await live_hub.query(bus_pb2.EventFilter(kinds=["alert"]))
    assert len(alerts) == 1
    assert alerts[0].agent_id == "eventbus"
    assert alerts[0].event.alert.rule in ("bus.fork", "bus.chain_break")
    assert alerts[0].event.alert.details["agent_id"] == "victim"
    status = live_hub.hub.service.status()
    assert status.chain_breaks == 1
    assert dict(status.rejected) == {alerts[0].event.alert.rule.removeprefix("bus."): 1}  # counted once, by reason


async def test_signing_key_file_stays_private(tmp_path: Path) -> None:
    path = tmp_path / "k"
    keys.write_private_key(path, keys.generate_signing_key())
    assert oct(path.stat().st_mode & 0o777) == "0o600"
