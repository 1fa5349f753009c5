"""Contract: the agents' own publisher against the real hub, for every kind of answer.

Each case hands the publisher one envelope the hub answers a known way, and checks the answer's
status and reason code (the enum, not the text) and what the publisher did with it: ack the
outbox, count a retry by its reason, start a new chain, dead-letter, or count a refusal.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from amoskys import keys
from amoskys.agents.runtime.metrics import AgentMetrics
from amoskys.agents.runtime.outbox import SealedEnvelope
from amoskys.agents.runtime.publisher import Publisher
from amoskys.config import AgentConfig
from amoskys.envelope import ChainState, seal
from amoskys.v1 import envelope_pb2, events_pb2
from tests.agents.conftest import agent_config
from tests.hubfixture import AgentIdentity, LiveHub, make_events

Status = envelope_pb2.PublishAck.Status
Reason = envelope_pb2.PublishAck.Reason


class ScriptedOutbox:
    """The outbox side of the publisher, holding the given envelopes; records what the publisher does."""

    def __init__(self, chain: ChainState, envelopes: list[SealedEnvelope]) -> None:
        self.chain = chain
        self.held = envelopes
        self.acked: list[int] = []
        self.dead: list[tuple[int, str]] = []
        self.restarts = 0

    def unacked(self, after_seq: int = 0, limit: int = 64) -> list[SealedEnvelope]:
        return [e for e in self.held if e.seq > after_seq][:limit]

    def ack(self, seq: int, chain_id: bytes) -> int:
        done = [e for e in self.held if e.seq <= seq and e.chain_id == chain_id]
        self.held = [e for e in self.held if e not in done]
        self.acked += [e.seq for e in done]
        return sum(e.events for e in done)

    def restart_chain(self) -> None:
        self.restarts += 1
        self.held = []

    def dead_letter(self, seq: int, reason: str) -> None:
        self.dead.append((seq, reason))
        self.held = [e for e in self.held if e.seq != seq]


class RecordingPublisher(Publisher):
    """The agents' publisher, keeping each answer it applied."""

    answers: list[envelope_pb2.PublishAck]

    def _on_ack(self, sent: SealedEnvelope, ack: envelope_pb2.PublishAck, latency: float) -> float | None:
        self.answers.append(ack)
        return super()._on_ack(sent, ack, latency)


@dataclasses.dataclass
class Bed:
    hub: LiveHub
    config: AgentConfig
    signing: Ed25519PrivateKey
    chain: ChainState = dataclasses.field(default_factory=ChainState.fresh)

    def sealed(self, count: int = 1, host: str = "testhost", agent_id: str = "") -> SealedEnvelope:
        """The chain's next envelope (the chain moves on)."""
        batch = events_pb2.EventBatch(events=make_events(count, host=host, agent="proc"))
        envelope, self.chain = seal(agent_id or self.config.agent_id, batch, self.chain, self.signing)
        return SealedEnvelope(self.chain.last_seq, self.chain.chain_id, envelope.SerializeToString(), count)

    async def stored_by_hub(self, sealed: SealedEnvelope) -> None:
        """Publish with the agent's identity, outside the publisher (as if it had sent it before)."""
        identity = AgentIdentity(self.config.agent_id, self.config.tls, self.signing)
        ack = await self.hub.publish_raw(identity, sealed.raw)
        assert ack.status == Status.OK, ack


@pytest.fixture
def bed(live_hub: LiveHub, tmp_path: Path) -> Bed:
    config = agent_config(live_hub, tmp_path, "proc")
    return Bed(live_hub, config, keys.load_signing_key(Path(config.signing_key)))


async def answered(bed: Bed, outbox: ScriptedOutbox, until: Callable[[RecordingPublisher], bool]) -> RecordingPublisher:
    """Run the agents' publisher against the hub until `until` holds (10 s at most)."""
    publisher = RecordingPublisher(outbox, bed.config, AgentMetrics("proc"), asyncio.Event())
    publisher.answers = []
    task = asyncio.create_task(publisher.run())
    try:
        for _ in range(200):
            if until(publisher):
                return publisher
            await asyncio.sleep(0.05)
        raise AssertionError(f"no such answer: {publisher.answers}")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def _retries(publisher: Publisher, reason: str) -> float:
    value = publisher.metrics.registry.get_sample_value("amoskys_agent_retries_total", {"reason": reason})
    return value or 0.0


async def stored(bed: Bed) -> tuple[ScriptedOutbox, Callable[[RecordingPublisher], bool]]:
    outbox = ScriptedOutbox(bed.chain, [bed.sealed()])
    return outbox, lambda p: outbox.acked == [1]


async def duplicate(bed: Bed) -> tuple[ScriptedOutbox, Callable[[RecordingPublisher], bool]]:
    first = bed.sealed()
    await bed.stored_by_hub(first)
    outbox = ScriptedOutbox(bed.chain, [first])
    return outbox, lambda p: outbox.acked == [1]


async def out_of_order(bed: Bed) -> tuple[ScriptedOutbox, Callable[[RecordingPublisher], bool]]:
    await bed.stored_by_hub(bed.sealed())
    bed.sealed()  # seq 2 never sent
    outbox = ScriptedOutbox(bed.chain, [bed.sealed()])
    return outbox, lambda p: _retries(p, "out_of_order") >= 1 and not outbox.acked


async def chain_unknown(bed: Bed) -> tuple[ScriptedOutbox, Callable[[RecordingPublisher], bool]]:
    bed.sealed()  # seq 1 of a chain the hub never saw
    outbox = ScriptedOutbox(bed.chain, [bed.sealed()])
    return outbox, lambda p: outbox.restarts == 1 and _retries(p, "chain_unknown") == 1


async def draining(bed: Bed) -> tuple[ScriptedOutbox, Callable[[RecordingPublisher], bool]]:
    bed.hub.hub.admission.draining = True
    outbox = ScriptedOutbox(bed.chain, [bed.sealed()])
    return outbox, lambda p: _retries(p, "draining") >= 1 and not outbox.acked


async def invalid(bed: Bed) -> tuple[ScriptedOutbox, Callable[[RecordingPublisher], bool]]:
    outbox = ScriptedOutbox(bed.chain, [bed.sealed(host="elsewhere")])
    return outbox, lambda p: [seq for seq, _ in outbox.dead] == [1]


async def unauthorized(bed: Bed) -> tuple[ScriptedOutbox, Callable[[RecordingPublisher], bool]]:
    outbox = ScriptedOutbox(bed.chain, [bed.sealed(agent_id="someone-else")])
    errors = "amoskys_agent_publish_errors_total"
    return outbox, lambda p: bool(p.metrics.registry.get_sample_value(errors, {"code": "UNAUTHORIZED"}))


Case = Callable[[Bed], Awaitable[tuple[ScriptedOutbox, Callable[[RecordingPublisher], bool]]]]
CASES: list[tuple[Case, int, int]] = [
    (stored, Status.OK, Reason.REASON_UNSPECIFIED),
    (duplicate, Status.OK, Reason.REASON_DUPLICATE),
    (out_of_order, Status.RETRY, Reason.REASON_OUT_OF_ORDER),
    (chain_unknown, Status.RETRY, Reason.REASON_CHAIN_UNKNOWN),
    (draining, Status.RETRY, Reason.REASON_DRAINING),
    (invalid, Status.INVALID, Reason.REASON_HOST_MISMATCH),
    (unauthorized, Status.UNAUTHORIZED, Reason.REASON_CN_MISMATCH),
]


@pytest.mark.parametrize(("case", "status", "reason"), CASES, ids=[c[0].__name__ for c in CASES])
async def test_publisher_applies_each_answer(bed: Bed, case: Case, status: int, reason: int) -> None:
    outbox, until = await case(bed)
    try:
        publisher = await answered(bed, outbox, until)
    finally:
        bed.hub.hub.admission.draining = False
    first = publisher.answers[0]
    assert (Status.Name(first.status), Reason.Name(first.reason_code)) == (Status.Name(status), Reason.Name(reason))  # type: ignore[arg-type]
    assert first.reason.startswith(Reason.Name(reason).removeprefix("REASON_").lower() if reason else "")  # type: ignore[arg-type]
