"""Load generator and synthetic telemetry: N simulated agents publishing signed batches to a hub.

Each simulated agent has its own client certificate, Ed25519 key and hash chain, exactly like a
real agent, and honours RETRY the way the agent runtime does (wait backoff_ms, resend from the
first unacknowledged envelope). The summary is one JSON object.
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

import grpc

from amoskys import keys, pki
from amoskys.client import hub_channel, hub_stub
from amoskys.config import TlsConfig
from amoskys.envelope import ChainState, seal
from amoskys.v1 import envelope_pb2, events_pb2

__all__ = ["LoadOptions", "ensure_identities", "run_load"]

Status = envelope_pb2.PublishAck.Status
HOSTS = ("web", "db", "cache", "edge", "build")
COMMANDS = ("/usr/bin/bash", "/usr/sbin/sshd", "/usr/bin/python3", "/usr/bin/curl", "/usr/lib/systemd/systemd")


@dataclass(frozen=True)
class LoadOptions:
    hub: str
    server_name: str
    ca: Path
    identities: Path
    agents: int = 8
    rate: float = 0.0  # total events/s; 0 = as fast as acks allow
    batch: int = 500
    duration: float = 10.0
    mode: str = "stream"
    inflight: int = 8
    ack_log: Path | None = None
    drain_s: float = 30.0  # after the duration, how long to wait for outstanding acks
    processes: int = 1  # worker processes sharing the agents (one Python process tops out near one core)


@dataclass
class Stats:
    sent_envelopes: int = 0
    sent_events: int = 0
    acked_events: int = 0
    acked_envelopes: int = 0
    retried: int = 0
    rejected: collections.Counter[str] = field(default_factory=collections.Counter)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    latencies: list[float] = field(default_factory=list)

    def merge(self, other: Stats) -> None:
        self.sent_envelopes += other.sent_envelopes
        self.sent_events += other.sent_events
        self.acked_events += other.acked_events
        self.acked_envelopes += other.acked_envelopes
        self.retried += other.retried
        self.rejected.update(other.rejected)
        self.errors.update(other.errors)
        self.latencies += other.latencies


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


class SimulatedAgent:
    def __init__(self, index: int, options: LoadOptions, stats: Stats, ack_log: TextIO | None) -> None:
        self.agent_id = agent_name(index)
        self.host = simulated_host(index)
        self.options = options
        self.stats = stats
        self.ack_log = ack_log
        directory = options.identities
        self.tls = TlsConfig(
            ca=str(options.ca),
            cert=str(directory / f"{self.agent_id}.crt"),
            key=str(directory / f"{self.agent_id}.key"),
        )
        self.signing_key = keys.load_signing_key(directory / f"{self.agent_id}.sign")
        self.chain = ChainState.fresh()
        self.produced = 0
        self.unacked: collections.deque[tuple[int, envelope_pb2.Envelope, int]] = collections.deque()
        self.event_prefix = f"{self.agent_id}:{self.chain.chain_id.hex()[:12]}"  # unique per run
        self.template = synthetic_events(self.event_prefix, self.host, 0, options.batch)

    def next_envelope(self) -> tuple[int, envelope_pb2.Envelope, int]:
        count = self.options.batch
        batch = restamp(self.template, self.event_prefix, self.produced)
        first = self.produced
        self.produced += count
        envelope = seal(self.agent_id, batch, self.chain, self.signing_key, count)
        item = (self.chain.last_seq, envelope, first)
        self.unacked.append(item)
        return item

    def on_ok(self, seq: int) -> None:
        while self.unacked and self.unacked[0][0] <= seq:
            done_seq, _, first = self.unacked.popleft()
            self.stats.acked_events += self.options.batch
            self.stats.acked_envelopes += 1
            if self.ack_log is not None:
                self.ack_log.write(f"{self.event_prefix} {done_seq} {first} {self.options.batch}\n")

    async def run(self, deadline: float) -> None:
        interval = self.options.batch * self.options.agents / self.options.rate if self.options.rate else 0.0
        await asyncio.sleep(random.random() * interval)  # noqa: S311 - spread the agents' phases
        try:
            async with hub_channel(self.options.hub, self.tls, self.options.server_name) as channel:
                stub = hub_stub(channel)
                if self.options.mode == "unary":
                    await self._unary(stub, deadline, interval)
                else:
                    await self._stream(stub, deadline, interval)
        except grpc.aio.AioRpcError as exc:
            self.stats.errors[f"{exc.code().name}: {exc.details()}"[:120]] += 1

    async def _unary(self, stub: Any, deadline: float, interval: float) -> None:
        next_at = time.monotonic()
        while time.monotonic() < deadline:
            seq, envelope, _ = self.unacked[0] if self.unacked else self.next_envelope()
            sent = time.perf_counter()
            self.stats.sent_envelopes += 1
            self.stats.sent_events += self.options.batch
            ack = await stub.Publish(envelope, timeout=30)
            if not await self._handle(ack, seq, sent):
                continue
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def _handle(self, ack: envelope_pb2.PublishAck, seq: int, sent: float) -> bool:
        """True when the envelope is done with (acked or rejected for good)."""
        if ack.status == Status.OK:
            self.stats.latencies.append(time.perf_counter() - sent)
            self.on_ok(seq)
            return True
        if ack.status == Status.RETRY:
            self.stats.retried += 1
            await asyncio.sleep(ack.backoff_ms / 1000 * (0.5 + random.random()))  # noqa: S311 - jitter
            return False
        self.stats.rejected[envelope_pb2.PublishAck.Status.Name(ack.status)] += 1
        self.unacked.popleft()
        return True

    async def _stream(self, stub: Any, deadline: float, interval: float) -> None:
        await _StreamSession(self, self.options.inflight).run(stub, deadline, interval)


class _StreamSession:
    """One PublishStream: a window of envelopes in flight, acks in order, rewind on RETRY."""

    def __init__(self, agent: SimulatedAgent, inflight: int) -> None:
        self.agent = agent
        self.outbox: asyncio.Queue[envelope_pb2.Envelope | None] = asyncio.Queue()
        self.window = asyncio.Semaphore(inflight)
        self.sent: collections.deque[tuple[int, float, int]] = collections.deque()  # seq, time, epoch
        self.epoch = 0
        self.resend = asyncio.Event()

    async def _requests(self) -> Any:
        while (envelope := await self.outbox.get()) is not None:
            yield envelope

    async def _send(self, seq: int, envelope: envelope_pb2.Envelope) -> None:
        self.sent.append((seq, time.perf_counter(), self.epoch))
        self.agent.stats.sent_envelopes += 1
        await self.outbox.put(envelope)

    async def _produce(self, deadline: float, interval: float) -> None:
        """New envelopes until the deadline, then only resends until all are acked (or drain_s passes)."""
        next_at = time.monotonic()
        give_up = deadline + self.agent.options.drain_s
        while time.monotonic() < give_up and (time.monotonic() < deadline or self.agent.unacked):
            await self.window.acquire()
            if self.resend.is_set():
                await self._resend_unacked()
            elif time.monotonic() < deadline:
                seq, envelope, _ = self.agent.next_envelope()
                self.agent.stats.sent_events += self.agent.options.batch
                await self._send(seq, envelope)
                if interval:
                    next_at += interval
                    await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            else:
                self.window.release()
                await asyncio.sleep(0.01)
        await self.outbox.put(None)

    async def _resend_unacked(self) -> None:
        """Resend every unacked envelope in order; the caller holds one window slot."""
        self.resend.clear()
        pending = list(self.agent.unacked)
        for index, (seq, envelope, _) in enumerate(pending):
            if index:
                await self.window.acquire()
            await self._send(seq, envelope)
        if not pending:
            self.window.release()

    async def _on_ack(self, ack: envelope_pb2.PublishAck) -> None:
        stats = self.agent.stats
        seq, started, sent_epoch = self.sent.popleft()
        self.window.release()
        if ack.status == Status.OK:
            stats.latencies.append(time.perf_counter() - started)
            self.agent.on_ok(seq)
        elif ack.status == Status.RETRY:
            stats.retried += 1
            if sent_epoch == self.epoch:  # the first RETRY of this wave rewinds; the rest follow it
                self.epoch += 1
                delay = ack.backoff_ms / 1000 * (0.5 + random.random())  # noqa: S311 - jitter
                asyncio.get_running_loop().call_later(delay, self.resend.set)
        else:
            stats.rejected[Status.Name(ack.status)] += 1
            if self.agent.unacked and self.agent.unacked[0][0] == seq:
                self.agent.unacked.popleft()

    async def run(self, stub: Any, deadline: float, interval: float) -> None:
        call = stub.PublishStream(self._requests())
        producer = asyncio.create_task(self._produce(deadline, interval))
        try:
            async for ack in call:
                await self._on_ack(ack)
        finally:
            producer.cancel()
            self.outbox.put_nowait(None)  # let gRPC's request consumer finish instead of being destroyed


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run_agents(options: LoadOptions, indices: range) -> tuple[Stats, float]:
    """Run the simulated agents `indices` until the duration (plus drain) is over."""
    stats = Stats()
    ack_log = options.ack_log.open("a", buffering=1) if options.ack_log else None
    try:
        agents = [SimulatedAgent(i, options, stats, ack_log) for i in indices]
        started = time.monotonic()
        await asyncio.gather(*(agent.run(started + options.duration) for agent in agents))
        return stats, time.monotonic() - started
    finally:
        if ack_log:
            ack_log.close()


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
        "mode": options.mode,
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
