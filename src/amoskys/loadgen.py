"""Load generator and synthetic telemetry: N simulated agents publishing signed batches to a hub.

Every simulated agent publishes through the agents' own `Publisher` (grpclib, one PublishStream,
the runtime's handling of RETRY, INVALID and broken connections), with its own client
certificate, Ed25519 signer (the agent's loader) and hash chain; many run on one event loop.
What it publishes comes from `MemoryOutbox`, the publishing side of the agent's outbox kept in
memory: sealing through the SQLite outbox (add, seal, ack) costs about eight times the CPU per
envelope, which on a machine shared with the hub would measure the load generator instead of
the hub (see BENCHMARKS.md). Envelopes are sealed as the runtime's batcher seals them: only while
a stream is open and at most SEAL_AHEAD_WINDOWS windows ahead of the acks. The summary is one
JSON object.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import json
import multiprocessing
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from prometheus_client import Histogram
from prometheus_client.metrics import MetricWrapperBase

from amoskys import keys, pki
from amoskys.agents.runtime.identity import Ed25519Signer, load_signer
from amoskys.agents.runtime.metrics import AgentMetrics
from amoskys.agents.runtime.outbox import SealedEnvelope
from amoskys.agents.runtime.publisher import Publisher, wait_event
from amoskys.agents.runtime.runner import SEAL_AHEAD_WINDOWS
from amoskys.config import AgentConfig, BatchConfig, TlsConfig
from amoskys.envelope import ChainState, seal
from amoskys.v1 import envelope_pb2, events_pb2

__all__ = ["LoadOptions", "MemoryOutbox", "ensure_identities", "run_load"]

Status = envelope_pb2.PublishAck.Status
STATUS_NAMES = frozenset(Status.keys())
HOSTS = ("web", "db", "cache", "edge", "build")
# New streams a process starts per second at most: a TLS handshake costs this process a few ms of CPU,
# and handshakes queued longer than the hub's handshake_timeout_s are cut, which made 1,000 agents
# starting within 5 s reconnect in a storm that fed itself (BENCHMARKS.md, connections).
CONNECTS_PER_S = 100
COMMANDS = ("/usr/bin/bash", "/usr/sbin/sshd", "/usr/bin/python3", "/usr/bin/curl", "/usr/lib/systemd/systemd")


@dataclass(frozen=True)
class LoadOptions:
    hub: str | list[str]  # a list: the agents fail over between these hubs
    server_name: str
    ca: Path
    identities: Path
    agents: int = 8
    rate: float = 0.0  # total events/s; 0 = as fast as acks allow
    batch: int = 500
    duration: float = 10.0
    inflight: int = 8  # envelopes in flight per stream (the agent's batch.max_inflight)
    ack_log: Path | None = None
    drain_s: float = 30.0  # after the duration, how long to wait for outstanding acks
    processes: int = 1  # worker processes sharing the agents (one Python process tops out near one core)


@dataclass
class Stats:
    """One process's totals, sent back to the parent (picklable)."""

    sent_envelopes: int = 0  # handed to the stream, resends included
    sent_events: int = 0  # sealed into new envelopes
    acked_events: int = 0
    retried: int = 0
    rejected: collections.Counter[str] = field(default_factory=collections.Counter)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    latencies: list[float] = field(default_factory=list)

    def merge(self, other: Stats) -> None:
        self.sent_envelopes += other.sent_envelopes
        self.sent_events += other.sent_events
        self.acked_events += other.acked_events
        self.retried += other.retried
        self.rejected.update(other.rejected)
        self.errors.update(other.errors)
        self.latencies += other.latencies


class RecordingHistogram(Histogram):
    """The publisher's ack-latency histogram, also keeping every observation (for exact percentiles)."""

    def __init__(self, sink: list[float]) -> None:
        super().__init__("amoskys_loadgen_ack_latency_seconds", "From envelope sent to ack", registry=None)
        self.sink = sink

    def observe(self, amount: float, exemplar: dict[str, str] | None = None) -> None:
        self.sink.append(amount)
        super().observe(amount, exemplar)


class LoadMetrics(AgentMetrics):
    """The agent metrics, one set shared by a process's simulated agents: its counters are the totals."""

    def __init__(self) -> None:
        super().__init__("proc")
        self.latencies: list[float] = []
        self.ack_latency = RecordingHistogram(self.latencies)


def counts(metric: MetricWrapperBase) -> dict[str, int]:
    """A counter's totals by its (single) label value; "" for an unlabelled counter."""
    totals: dict[str, int] = {}
    for family in metric.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                label = next(iter(sample.labels.values()), "")
                totals[label] = totals.get(label, 0) + int(sample.value)
    return totals


def simulated_host(index: int) -> str:
    return f"{HOSTS[index % len(HOSTS)]}{index:05d}"


def agent_name(index: int) -> str:
    """A simulated proc agent's id, in the enrolled form HOST-KIND (the hub binds it to that host)."""
    return f"{simulated_host(index)}-proc"


def ensure_identities(ca_dir: Path, directory: Path, count: int) -> None:
    """Issue missing identities: NAME.key/.crt (TLS), NAME.sign (Ed25519), trust/NAME.pub."""
    ca: pki.CertificateAuthority | None = None
    (directory / "trust").mkdir(parents=True, exist_ok=True)
    for index in range(count):
        name = agent_name(index)
        if (directory / f"{name}.crt").exists():
            continue
        ca = ca or pki.load_ca(ca_dir)
        pki.issue(ca, directory, name, "client", [], days=30)
        signing = keys.generate_signing_key()
        keys.write_private_key(directory / f"{name}.sign", signing)
        pub = keys.public_key_text(signing.public_key()) + "\n"
        keys.write_public_file(directory / "trust" / f"{name}.pub", pub.encode())


def synthetic_events(prefix: str, host: str, start: int, count: int) -> events_pb2.EventBatch:
    """Plausible process telemetry with deterministic ids (`prefix:n`)."""
    batch = events_pb2.EventBatch()
    rng = random.Random(start)  # noqa: S311 - synthetic data, not security
    for n in range(start, start + count):
        exe = COMMANDS[n % len(COMMANDS)]
        event = batch.events.add(host=host, agent="proc", severity=events_pb2.SEVERITY_INFO)
        event.process.action = events_pb2.ProcessEvent.START
        event.process.ppid = 1
        event.process.name = exe.rsplit("/", 1)[-1]
        event.process.exe = exe
        event.process.cmdline.extend([exe, "--synthetic"])
        event.process.user = "root"
        event.process.pid = rng.randint(300, 4_000_000)
    return restamp(batch, prefix, start)


def restamp(batch: events_pb2.EventBatch, prefix: str, start: int) -> events_pb2.EventBatch:
    """Give a batch's events fresh ids (`prefix:n`) and timestamps (cheaper than building new events)."""
    now = time.time_ns()
    for offset, event in enumerate(batch.events):
        event.event_id = f"{prefix}:{start + offset}"
        event.ts_ns = now + offset
    return batch


class MemoryOutbox:
    """The publishing side of the agent's outbox, in memory: sealed envelopes in chain order until acked.

    It offers the publisher what `Outbox` does (`SealedQueue`): the chain, the envelopes after a
    seq, acks, a chain restart (everything held re-sealed as seq 1, 2, ...) and dead letters.
    """

    def __init__(self, agent_id: str, signer: Ed25519Signer, ack_log: TextIO | None) -> None:
        self.agent_id = agent_id
        self.signer = signer
        self.ack_log = ack_log
        self.chain = ChainState.fresh()
        self.event_prefix = f"{agent_id}:{self.chain.chain_id.hex()[:12]}"  # event ids unique per run
        self.held: collections.deque[tuple[SealedEnvelope, int]] = collections.deque()  # with its first event
        self.sent_envelopes = 0
        self.dead_letters = 0

    def seal(self, batch: events_pb2.EventBatch | bytes, count: int, first: int) -> None:
        """Seal the chain's next envelope: `count` events numbered from `first`."""
        envelope, self.chain = seal(self.agent_id, batch, self.chain, self.signer, count)
        raw = envelope.SerializeToString()
        self.held.append((SealedEnvelope(self.chain.last_seq, self.chain.chain_id, raw, count), first))

    def unacked(self, after_seq: int = 0, limit: int = 64) -> list[SealedEnvelope]:
        envelopes = [envelope for envelope, _ in self.held if envelope.seq > after_seq][:limit]
        self.sent_envelopes += len(envelopes)  # the publisher sends what it asks for
        return envelopes

    def ack(self, seq: int, chain_id: bytes) -> int:
        if chain_id != self.chain.chain_id:
            return 0
        events = 0
        while self.held and self.held[0][0].seq <= seq:
            envelope, first = self.held.popleft()
            events += envelope.events
            if self.ack_log is not None:
                self.ack_log.write(f"{self.event_prefix} {envelope.seq} {first} {envelope.events}\n")
        return events

    def restart_chain(self) -> None:
        held, self.held = list(self.held), collections.deque()
        self.chain = ChainState.fresh()
        for envelope, first in held:
            self.seal(envelope_pb2.Envelope.FromString(envelope.raw).payload, envelope.events, first)

    def dead_letter(self, seq: int, reason: str) -> None:
        self.held = collections.deque(item for item in self.held if item[0].seq != seq)
        self.dead_letters += 1
        self.restart_chain()


class SimulatedAgent:
    """One agent: events collected at its share of the rate (or as fast as acks allow), sealed into
    the MemoryOutbox as the runtime's batcher would, published by its own `Publisher`."""

    def __init__(self, index: int, options: LoadOptions, metrics: AgentMetrics, ack_log: TextIO | None) -> None:
        self.options = options
        self.agent_id = agent_name(index)
        directory = options.identities
        tls = TlsConfig(
            ca=str(options.ca), cert=str(directory / f"{self.agent_id}.crt"),
            key=str(directory / f"{self.agent_id}.key"),
        )  # fmt: skip
        config = AgentConfig(
            agent_id=self.agent_id, host=simulated_host(index), hub=options.hub, hub_server_name=options.server_name,
            tls=tls, batch=BatchConfig(max_events=options.batch, max_inflight=options.inflight),
        )  # fmt: skip
        self.outbox = MemoryOutbox(self.agent_id, load_signer(directory / f"{self.agent_id}.sign"), ack_log)
        self.template = synthetic_events(self.outbox.event_prefix, simulated_host(index), 0, options.batch)
        self.ready = asyncio.Event()  # an ack or an idle stream: the batcher may seal again
        self.wake = asyncio.Event()  # set on sealing: the publisher sends at once
        self.publisher = Publisher(self.outbox, config, metrics, self.wake, self.ready.set, self.ready.set)
        self.collected = 0  # events produced (by the rate) so far
        self.sealed_events = 0

    async def run(self, deadline: float, ramp_s: float) -> None:
        """Start within `ramp_s`, publish until the deadline, then until everything sealed is acked or drain_s
        has passed."""
        options = self.options
        interval = options.batch * options.agents / options.rate if options.rate else 0.0
        await asyncio.sleep(random.random() * max(interval, ramp_s))  # noqa: S311 - spread phases and handshakes
        publisher = asyncio.create_task(self.publisher.run())
        try:
            await self._collect(deadline, interval)
            give_up = deadline + options.drain_s
            while (self.collected > self.sealed_events or self.outbox.held) and time.monotonic() < give_up:
                await self._seal_then_wait(min(1.0, give_up - time.monotonic()))
        finally:
            self.publisher.stop()
            publisher.cancel()
            await asyncio.gather(publisher, return_exceptions=True)

    async def _collect(self, deadline: float, interval: float) -> None:
        next_at = time.monotonic()
        while (now := time.monotonic()) < deadline:
            if not interval:  # as fast as acks allow: a full batch is always waiting
                self.collected = self.sealed_events + self.options.batch
            while interval and now >= next_at:
                self.collected += self.options.batch
                next_at += interval
            await self._seal_then_wait(min(next_at, deadline) - now if interval else deadline - now)
        if not interval:
            self.collected = self.sealed_events

    async def _seal_then_wait(self, timeout: float) -> None:
        self.ready.clear()
        self._seal_what_may()
        await wait_event(self.ready, max(0.0, timeout))

    def _seal_what_may(self) -> None:
        """Seal full batches while the runtime's batcher would (see `_may_seal`)."""
        batch = self.options.batch
        while self.collected - self.sealed_events >= batch and self._may_seal():
            events = restamp(self.template, self.outbox.event_prefix, self.sealed_events)
            self.outbox.seal(events, batch, self.sealed_events)
            self.sealed_events += batch
            self.wake.set()

    def _may_seal(self) -> bool:
        """A stream is open and fewer than SEAL_AHEAD_WINDOWS windows of envelopes wait for acks."""
        return self.publisher.streaming and len(self.outbox.held) < SEAL_AHEAD_WINDOWS * self.options.inflight


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run_agents(options: LoadOptions, indices: range) -> tuple[Stats, float]:
    """Run the simulated agents `indices` until the duration (plus drain) is over."""
    metrics = LoadMetrics()
    ack_log = options.ack_log.open("a", buffering=1) if options.ack_log else None
    try:
        agents = [SimulatedAgent(i, options, metrics, ack_log) for i in indices]
        started, ramp_s = time.monotonic(), len(agents) / CONNECTS_PER_S
        await asyncio.gather(*(agent.run(started + options.duration, ramp_s) for agent in agents))
        return _stats(agents, metrics), time.monotonic() - started
    finally:
        if ack_log:
            ack_log.close()


def _stats(agents: list[SimulatedAgent], metrics: LoadMetrics) -> Stats:
    """Totals from the agents' metrics: errors by gRPC code; refusals (INVALID, UNAUTHORIZED) by status."""
    failures = counts(metrics.publish_errors)
    refused = {name: failures.pop(name) for name in list(failures) if name in STATUS_NAMES}
    dead_letters = sum(agent.outbox.dead_letters for agent in agents)
    return Stats(
        sent_envelopes=sum(agent.outbox.sent_envelopes for agent in agents),
        sent_events=sum(agent.sealed_events for agent in agents),
        acked_events=sum(counts(metrics.events_acked).values()),
        retried=sum(counts(metrics.retries).values()),
        rejected=collections.Counter(refused, **({"INVALID": dead_letters} if dead_letters else {})),
        errors=collections.Counter(failures),
        latencies=metrics.latencies,
    )


def _shard(options: LoadOptions, shard: int) -> tuple[Stats, float]:
    """One worker process's share of the agents (every `processes`-th one)."""
    return asyncio.run(run_agents(options, range(shard, options.agents, options.processes)))


async def run_load(options: LoadOptions) -> dict[str, Any]:
    """Run the load (in `options.processes` processes when > 1) and summarize it."""
    if options.processes <= 1:
        stats, elapsed = await run_agents(options, range(options.agents))
    else:
        loop = asyncio.get_running_loop()
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(options.processes, mp_context=context) as pool:
            parts = await asyncio.gather(
                *(loop.run_in_executor(pool, _shard, options, shard) for shard in range(options.processes))
            )
        stats, elapsed = Stats(), max(part[1] for part in parts)
        for part, _ in parts:
            stats.merge(part)
    return _summary(options, stats, elapsed)


def _summary(options: LoadOptions, stats: Stats, elapsed: float) -> dict[str, Any]:
    ms = [x * 1000 for x in stats.latencies]
    return {
        "agents": options.agents,
        "processes": options.processes,
        "batch": options.batch,
        "duration_s": round(elapsed, 2),
        "sent_envelopes": stats.sent_envelopes,
        "sent_events": stats.sent_events,
        "acked_events": stats.acked_events,
        "retried": stats.retried,
        "rejected": dict(stats.rejected),
        "errors": dict(stats.errors),
        "events_per_s": round(stats.acked_events / elapsed, 1),
        "ack_latency_ms": {
            "p50": round(_percentile(ms, 0.50), 3),
            "p95": round(_percentile(ms, 0.95), 3),
            "p99": round(_percentile(ms, 0.99), 3),
            "mean": round(statistics.fmean(ms), 3) if ms else 0.0,
        },
    }


def summary_json(summary: dict[str, Any]) -> str:
    return json.dumps(summary, indent=2, sort_keys=False)
