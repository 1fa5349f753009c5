"""The one agent runtime: identity, outbox, batching, publishing, heartbeat, metrics, signals.

`amoskys agent NAME --config FILE` builds an `AgentRuntime` around the agent class registered
for NAME. The agent only yields events; everything else happens here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from pathlib import Path
from typing import Any

from prometheus_client import start_http_server

from amoskys import __version__, systemd
from amoskys.agents import load_agent_class
from amoskys.agents.runtime.base import Agent
from amoskys.agents.runtime.identity import check_tls_identity, load_signer
from amoskys.agents.runtime.metrics import AgentMetrics
from amoskys.agents.runtime.outbox import Outbox, OutboxError
from amoskys.agents.runtime.publisher import Publisher, wait_event
from amoskys.config import AgentConfig, load_config, parse_address
from amoskys.errors import ConfigError
from amoskys.logs import setup_logging
from amoskys.v1 import events_pb2

__all__ = ["AgentRuntime"]

log = logging.getLogger(__name__)
FLUSH_INTERVAL_S = 0.1
FLUSH_EVENTS = 500
DROP_REPORT_INTERVAL_S = 60.0
STOP_FLUSH_S = 5.0
MAX_MEMORY_EVENTS = 100_000  # held while the outbox cannot be written; beyond that the oldest are dropped
SEAL_AHEAD_WINDOWS = 2  # sealed, unacked envelopes kept ready: this many publisher windows (batch.max_inflight)


class AgentRuntime:
    def __init__(self, kind: str, config_path: Path | None, config: AgentConfig | None = None) -> None:
        self.kind = kind
        self.config_path = config_path
        agent_class = load_agent_class(kind)
        if config is not None and not isinstance(config, agent_class.config_type):
            raise TypeError(f"the {kind} agent runs on {agent_class.config_type.__name__}, not {type(config).__name__}")
        self.config = config or load_config(config_path, agent_class.config_type)
        self.agent_id = self.config.resolved_agent_id(kind)
        self._check_identity()
        state_dir = self.config.resolved_state_dir(kind)
        signing_key = load_signer(Path(self.config.signing_key))
        self.outbox = Outbox(state_dir / "outbox.db", self.config.outbox, self.agent_id, signing_key)
        self.metrics = AgentMetrics(kind)
        self.agent: Agent[Any] = agent_class(self.config, state_dir)
        self.agent.register_metrics(self.metrics.registry)
        self.agent.restore(self.outbox.state())
        self.started_ns = time.time_ns()
        self.buffer: list[bytes] = []
        self.flushed = asyncio.Event()
        self.sealed = asyncio.Event()
        self.publisher = Publisher(
            self.outbox, self.config, self.metrics, self.sealed, self._on_acked, self.flushed.set
        )  # an idle publisher wakes the batcher: what waits in the outbox can go now
        self.metrics_port = 0
        self._drops_due = True
        self._memory_drops = 0
        self._stopping = asyncio.Event()
        self.failure: BaseException | None = None  # why a runtime task died, if one did

    def _check_identity(self) -> None:
        """Refuse to start on missing, unreadable, unsafe, mismatched or expired identity files."""
        check_tls_identity(self.config.tls, self.agent_id)

    # ---- the pipeline: collect -> buffer -> outbox -> seal -> publish ----------------------------

    async def _collect(self) -> None:
        """Run the agent's collect loop; a crash is logged, counted, and the loop restarted."""
        while True:
            try:
                async for event in self.agent.collect():
                    self.buffer.append(event.SerializeToString())
                    if len(self.buffer) >= FLUSH_EVENTS:
                        self.flush()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                self.metrics.collect_errors.inc()
                log.exception("collector failed; restarting it in 5 s", extra={"kind": self.kind})
                await asyncio.sleep(5)

    def flush(self) -> None:
        """Move buffered events and the agent's position into the outbox in one transaction."""
        bodies, self.buffer = self.buffer, []
        try:
            stored, dropped = self.outbox.add(bodies, self.agent.checkpoint())
        except OutboxError as exc:
            self._keep_in_memory(bodies, str(exc))
            return
        if self._memory_drops:
            with contextlib.suppress(OutboxError):
                self.outbox.bump("dropped", self._memory_drops)
                self._memory_drops = 0
        self.metrics.events_collected.inc(stored)
        if dropped:
            self._count_drops(dropped)
        self.flushed.set()

    def _keep_in_memory(self, bodies: list[bytes], error: str) -> None:
        """The outbox cannot be written (e.g. disk full): hold events, bounded, drops counted."""
        self.buffer = bodies + self.buffer
        excess = len(self.buffer) - MAX_MEMORY_EVENTS
        if excess > 0:
            del self.buffer[:excess]
            self._memory_drops += excess
            self.metrics.events_dropped.labels("outbox_unwritable").inc(excess)
        log.error("outbox write failed; holding events in memory", extra={"error": error, "held": len(self.buffer)})

    async def _flusher(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            if self.buffer:
                self.flush()

    async def _batcher(self) -> None:
        """Seal when a batch is full, its oldest event has lingered long enough, or the publisher is idle.

        Like Nagle's algorithm: with nothing in flight an envelope goes out at once (low latency at
        low rates); while envelopes are in flight, events gather into fuller batches. Only while a
        stream is open and at most SEAL_AHEAD_WINDOWS windows ahead of the acks: during an outage
        events wait unsealed, so the bounds drop them (oldest first) without re-sealing the chain.
        """
        batch = self.config.batch
        while True:
            count, oldest_ns = self.outbox.pending_events(batch.max_events)
            waited_ms = (time.time_ns() - oldest_ns) / 1e6 if count else 0
            due = count >= batch.max_events or waited_ms >= batch.max_linger_ms or self.publisher.idle
            if count and due and self._may_seal():
                self._seal(batch.max_events)
                await asyncio.sleep(0)  # a backlog is sealed envelope by envelope, not in one long step
                continue
            self.flushed.clear()
            timeout = max(batch.max_linger_ms - waited_ms, 1) / 1000 if count and not due else 1.0
            await wait_event(self.flushed, timeout)

    def _may_seal(self) -> bool:
        ahead = SEAL_AHEAD_WINDOWS * self.config.batch.max_inflight
        return self.publisher.streaming and self.outbox.sealed_count() < ahead

    def _seal(self, max_events: int) -> None:
        try:
            envelope, dropped = self.outbox.seal(max_events)
        except OutboxError as exc:
            log.error("cannot seal an envelope", extra={"error": str(exc)})
            return
        if dropped:
            self._count_drops(dropped)
        if envelope is not None:
            self.sealed.set()

    def _count_drops(self, dropped: int) -> None:
        self.metrics.events_dropped.labels("outbox_full").inc(dropped)
        log.warning("outbox full: events dropped", extra={"dropped": dropped, "policy": self.config.outbox.when_full})

    # ---- heartbeat, drops, gauges ------------------------------------------------------------------

    def heartbeat(self) -> events_pb2.Event:
        waiting, used = self.outbox.sizes()
        counters = {
            "collected": int(self.metrics.registry.get_sample_value("amoskys_agent_events_collected_total") or 0),
            "acked": int(self.metrics.registry.get_sample_value("amoskys_agent_events_acked_total") or 0),
            "dead_letters": self.outbox.dead_letter_count(),
            "outbox_events": waiting,
            "outbox_bytes": used,
        }
        body = events_pb2.Heartbeat(
            version=__version__, started_ns=self.started_ns, uptime_s=(time.time_ns() - self.started_ns) // 10**9,
            counters=counters, interval_s=max(1, round(self.config.heartbeat_s)),
        )  # fmt: skip
        return self.agent.event(heartbeat=body)

    async def _heartbeats(self) -> None:
        while True:
            self.buffer.append(self.heartbeat().SerializeToString())
            self.flush()
            waiting, used = self.outbox.sizes()
            self.metrics.outbox_events.set(waiting)
            self.metrics.outbox_bytes.set(used)
            await asyncio.sleep(self.config.heartbeat_s)

    def _on_acked(self) -> None:
        """The hub took an envelope: drops can be reported, and the batcher may seal ahead again."""
        self._drops_due = True
        self.flushed.set()

    async def _drop_reports(self) -> None:
        """Once the hub is reachable, report drops since the last report as an alert event."""
        while True:
            await asyncio.sleep(DROP_REPORT_INTERVAL_S if not self._drops_due else 1.0)
            if not (self._drops_due and self.publisher.connected):
                continue
            try:
                dropped = self.outbox.take_counter("dropped")
            except OutboxError as exc:
                log.error("cannot read the drop count; retrying", extra={"error": str(exc)})
                continue
            self._drops_due = False
            if dropped:
                policy = self.config.outbox.when_full
                summary = f"{dropped} events dropped by the outbox ({policy})"
                details = {"dropped": str(dropped), "policy": policy}
                alert = self.agent.alert("agent.dropped", summary, details, events_pb2.SEVERITY_ERROR)
                self.buffer.append(alert.SerializeToString())
                self.flush()

    # ---- lifecycle ----------------------------------------------------------------------------------

    def _start_metrics(self) -> None:
        if self.config.metrics.listen:
            host, port = parse_address(self.config.metrics.listen)
            server, _ = start_http_server(port, addr=host, registry=self.metrics.registry)
            self.metrics_port = server.server_port

    def reload(self) -> None:
        """SIGHUP: logging level and the agent's own settings; identity and outbox need a restart."""
        systemd.reloading()
        try:
            config = load_config(self.config_path, self.agent.config_type)
        except ConfigError as exc:
            log.error("reload failed; keeping the running config", extra={"error": str(exc)})
        else:
            setup_logging(config.logging)
            self.agent.reload(config)
            log.info("config reloaded")
        systemd.notify("READY=1")

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stopping.set)
        loop.add_signal_handler(signal.SIGINT, self._stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        self._start_metrics()
        tasks = [
            asyncio.create_task(coro)
            for coro in (
                self._collect(), self._flusher(), self._batcher(), self.publisher.run(), self._heartbeats(),
                self._drop_reports(), systemd.watchdog_loop(),
            )
        ]  # fmt: skip
        for task in tasks[1:-1]:  # the collector may finish (a replay); the watchdog returns when not watched
            task.add_done_callback(self._on_task_done)
        systemd.notify("READY=1", f"STATUS=agent {self.agent_id} collecting")
        log.info(
            "agent running",
            extra={
                "kind": self.kind,
                "agent_id": self.agent_id,
                "hub": self.config.hub,
                "metrics_port": self.metrics_port,
            },
        )
        await self._stopping.wait()
        await self.stop(tasks)

    def _on_task_done(self, task: asyncio.Task[None]) -> None:
        """A runtime task that ends by itself is a bug: stop the agent so that it exits non-zero and systemd
        restarts it, instead of collecting forever with nothing sent (or nothing sealed)."""
        if task.cancelled() or self._stopping.is_set():
            return
        self.failure = task.exception() or RuntimeError(f"runtime task {task.get_coro()!r} ended")
        log.critical("agent runtime task died; stopping", exc_info=self.failure)
        self._stopping.set()

    async def stop(self, tasks: list[asyncio.Task[None]]) -> None:
        """Flush collected events into the outbox, give the batcher and publisher a moment, exit."""
        systemd.notify("STOPPING=1")
        tasks[0].cancel()  # the collector: nothing new from here on
        await asyncio.gather(tasks[0], return_exceptions=True)
        self.buffer += [event.SerializeToString() for event in self.agent.shutdown_events()]
        self.flush()
        deadline = time.monotonic() + STOP_FLUSH_S
        while self._waiting() and self.publisher.connected and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.publisher.stop()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.agent.close()
        self.outbox.close()
        log.info("agent stopped", extra={"agent_id": self.agent_id})

    def _waiting(self) -> bool:
        """Events in the outbox not yet acked (sealed or not)."""
        return bool(self.outbox.sealed_count() or self.outbox.pending_events(1)[0])
