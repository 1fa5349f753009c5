"""Group commit with chain checks: one writer thread decides and commits envelopes in batches.

Handlers verify what needs no state (size, version, identity, signature, payload) and submit;
the writer takes everything queued, checks each envelope against its agent's chain, commits all
accepted envelopes at once, and only then resolves their acks. A commit of more than
`commit_part_events` events is written in parts (`SqliteStore.commit_parts`), and what light agents
sent meanwhile is committed between the parts, so an ordinary envelope never waits behind more
than one part. Admission is bounded:
above the high-water mark a submission is answered RETRY with a backoff that grows with the
backlog, so memory stays bounded whatever the clients do.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from amoskys.catalog import HUB_AGENT
from amoskys.config import BackpressureConfig
from amoskys.envelope import GENESIS_HASH
from amoskys.eventbus.acks import NO_REASON, Ack, Reason, invalid, ok, retry
from amoskys.eventbus.metrics import BusMetrics
from amoskys.eventbus.rows import EventRow, to_row
from amoskys.eventbus.store import (
    AcceptedEnvelope,
    AgentUpdate,
    ChainRecord,
    Store,
    StoreFullError,
    StoreUnavailableError,
)
from amoskys.v1 import envelope_pb2, events_pb2

__all__ = ["Ack", "Committed", "Ingest", "Overload", "Submission"]

log = logging.getLogger(__name__)
LIGHT_EVENTS = 100  # an agent with at most this many events in a commit group is committed first
ALERT_INTERVAL_S = 60.0  # at most one alert per agent and rule in this time; the rest are counted into the next


@dataclass(slots=True)
class Submission:
    header: envelope_pb2.EnvelopeHeader
    digest: bytes
    rows: Sequence[EventRow]
    agent: AgentUpdate
    future: asyncio.Future[Ack] = field(repr=False)
    raw: bytes = field(default=b"", repr=False)  # the envelope as received (the jetstream backend appends it)


@dataclass(frozen=True, slots=True)
class Overload:
    """Why an agent's events are not admitted now, and the backoff (ms) to advise."""

    backoff_ms: int
    why: str


@dataclass(frozen=True, slots=True)
class Committed:
    """What subscribers receive: stored rows with their cursors."""

    agent_id: str
    first_cursor: int
    received_ns: int
    rows: Sequence[EventRow]


@dataclass(slots=True)
class _WriterTask:
    """Work that must run on the writer thread (it owns the write connection), e.g. retention."""

    fn: Callable[[], Any]
    future: asyncio.Future[Any] = field(repr=False)


class _Decision:
    """Outcome of a chain check within one commit group."""

    __slots__ = ("ack", "alert", "chain")

    def __init__(self, ack: Ack | None, chain: ChainRecord | None = None, alert: events_pb2.Event | None = None):
        self.ack, self.chain, self.alert = ack, chain, alert


class Ingest:
    def __init__(
        self,
        store: Store,
        config: BackpressureConfig,
        metrics: BusMetrics,
        on_committed: Callable[[list[Committed]], None] | None = None,
        on_fatal: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.store = store
        self.config = config
        self.metrics = metrics
        self.on_committed = on_committed
        self.on_fatal = on_fatal
        self.failure: BaseException | None = None
        self._alerted: dict[tuple[str, str], tuple[float, int]] = {}  # (agent, rule) -> (last alert, suppressed)
        self.chains: dict[str, ChainRecord] = store.load_chains()
        self.hostname = socket.gethostname()
        self._queue: queue.SimpleQueue[Submission | _WriterTask | None] = queue.SimpleQueue()
        self._pending_events = 0
        self._pending_by_agent: dict[str, int] = {}
        self._backlog: dict[str, collections.deque[Submission]] = {}  # writer thread only
        self._deferred: list[_WriterTask] = []  # writer tasks that arrived between parts of a commit
        self._parting = False  # a commit in parts is under way (writer thread)
        self._held: list[Committed] = []  # committed between its parts: fanned out after it, in cursor order
        self._stopping = False
        self._pending_lock = threading.Lock()
        self._drain_rate = 50_000.0  # events/s, EWMA of observed commits
        self._store_down_until = 0.0
        self._thread = threading.Thread(target=self._run, name="amoskys-ingest", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread.start()

    @property
    def pending_events(self) -> int:
        return self._pending_events

    def overload(self, agent_id: str, events: int, busy: bool = False) -> Overload | None:
        """None when `agent_id` may add `events` now, else why not and the backoff to advise.

        Fair admission: no agent holds more than `max_pending_per_agent` events in the queue (while the
        hub is `busy`, `busy_pending_per_agent`; an agent with none waiting may always add one envelope),
        and above the high-water mark only agents below their fair share of it are admitted (up to twice
        the mark), so identities that flood cannot starve the others.
        """
        if self.failure is not None or time.monotonic() < self._store_down_until:
            return Overload(self.config.max_backoff_ms, "the store is failing")
        with self._pending_lock:
            total, mine, active = (
                self._pending_events,
                self._pending_by_agent.get(agent_id, 0),
                len(self._pending_by_agent),
            )
        high_water = self.config.high_water_events
        cap = self.config.max_pending_per_agent
        if busy:
            cap = min(cap, self.config.busy_pending_per_agent)
        if mine and mine + events > cap:
            why = f"{mine} events of this agent already wait for commit (at most {cap}{' while busy' if busy else ''})"
        elif total + events <= high_water:
            return None
        elif mine + events <= high_water / max(active, 1) and total + events <= 2 * high_water:
            return None  # below its fair share of the high-water mark
        else:
            why = f"backlog above high-water mark ({total} events wait; this agent holds {mine})"
        drain_ms = int(1000 * (total + mine) / max(self._drain_rate, 1.0))
        return Overload(max(self.config.base_backoff_ms, min(self.config.max_backoff_ms, drain_ms)), why)

    def reserve(self, agent_id: str, events: int) -> None:
        """Count `events` of `agent_id` as waiting for commit once `overload` let them in (their
        checks may still be under way); then `submit` them, or `release` them if refused after all."""
        self._adjust_pending({agent_id: events})

    def release(self, agent_id: str, events: int) -> None:
        self._adjust_pending({agent_id: -events})

    def submit(
        self,
        header: envelope_pb2.EnvelopeHeader,
        digest: bytes,
        rows: Sequence[EventRow],
        agent: AgentUpdate,
        raw: bytes = b"",
    ) -> asyncio.Future[Ack]:
        """Queue reserved, checked events for the writer; the future gets the envelope's ack after the commit."""
        assert self._loop is not None, "Ingest.start() not called"
        future: asyncio.Future[Ack] = self._loop.create_future()
        if self.failure is not None:  # the writer is gone: nothing would ever answer
            self.release(header.agent_id, len(rows))
            future.set_result(self._unavailable())
            return future
        self._queue.put(Submission(header, digest, rows, agent, future, raw))
        return future

    async def in_writer(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the writer thread between commits; return its result."""
        assert self._loop is not None, "Ingest.start() not called"
        future: asyncio.Future[Any] = self._loop.create_future()
        self._queue.put(_WriterTask(fn, future))
        return await future

    def _adjust_pending(self, deltas: dict[str, int]) -> None:
        """Add to the events each agent has waiting for commit (one lock for a whole commit group)."""
        with self._pending_lock:
            for agent_id, delta in deltas.items():
                self._pending_events += delta
                mine = self._pending_by_agent.get(agent_id, 0) + delta
                if mine > 0:
                    self._pending_by_agent[agent_id] = mine
                else:
                    self._pending_by_agent.pop(agent_id, None)
            self.metrics.inflight_events.set(self._pending_events)

    def stop(self, timeout: float = 30.0) -> None:
        """Commit what is queued, then end the writer thread."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout)

    def _take_group(self) -> tuple[list[Submission], list[_WriterTask], bool]:
        """The next commit group, writer tasks apart, and True once told to stop with nothing left."""
        tasks, self._deferred = self._deferred, []
        self._fill(tasks)
        return self._group(self._group_budget()), tasks, self._stopping and not self._backlog

    def _group(self, budget: int) -> list[Submission]:
        """Envelopes for one commit: one from each agent in turn (an agent's stay in order) up to `budget`
        events. A large envelope that would take the group past the budget waits, first in line for the
        next group (which takes it whatever its size); a small one (LIGHT_EVENTS at most) always joins,
        as it is committed first (`_light_first`). Agents served go to the back of the line. One agent's
        backlog never sits in front of another's envelope, and no commit is much larger than the budget.
        """
        group: list[Submission] = []
        events = 0
        while self._backlog and events < budget:
            taken = 0
            for agent_id in list(self._backlog):
                size = len(self._backlog[agent_id][0].rows)
                if group and events + size > budget and size > LIGHT_EVENTS:
                    continue  # keeps its place at the front
                waiting = self._backlog.pop(agent_id)
                group.append(waiting.popleft())
                events, taken = events + size, taken + 1
                if waiting:
                    self._backlog[agent_id] = waiting  # to the back of the line
            if not taken:
                break
        return group

    def _fill(self, tasks: list[_WriterTask]) -> None:
        """Move what is queued into the per-agent backlog (waiting for work when there is none)."""
        deadline = None
        if not self._backlog and not self._stopping and not tasks:
            self._stash(self._queue.get(), tasks)
            deadline = time.monotonic() + self.config.commit_max_delay_ms / 1000
        while True:
            try:
                timeout = deadline - time.monotonic() if deadline is not None else 0
                item = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
            except queue.Empty:
                return
            self._stash(item, tasks)

    def _stash(self, item: Submission | _WriterTask | None, tasks: list[_WriterTask]) -> None:
        if item is None:
            self._stopping = True
        elif isinstance(item, _WriterTask):
            tasks.append(item)
        else:
            self._backlog.setdefault(item.header.agent_id, collections.deque()).append(item)

    def _group_budget(self) -> int:
        """Events per group: what the writer commits in about `commit_target_ms`, within [min, max]."""
        config = self.config
        budget = int(self._drain_rate * config.commit_target_ms / 1000)
        return max(config.commit_min_events, min(config.commit_max_events, budget))

    def _run(self) -> None:
        """The writer loop. Should it ever fail, everything waiting is answered RETRY and the hub is told
        (it stops serving and exits non-zero, so systemd restarts it): never a live process that acks nothing."""
        try:
            self._serve()
        except BaseException as exc:
            self.failure = exc
            log.critical("ingest writer failed; the hub stops", exc_info=exc)
            self._answer_queued(self._unavailable())
            if self._loop is not None and self.on_fatal is not None:
                self._loop.call_soon_threadsafe(self.on_fatal, exc)

    def _serve(self) -> None:
        stopping = False
        while not stopping:
            group, tasks, stopping = self._take_group()
            for part in _light_first(group):
                try:
                    self._process(part)
                except BaseException:
                    self._resolve([(sub, self._unavailable()) for sub in group])
                    raise
            for task in tasks:
                self._run_task(task)

    def _answer_queued(self, ack: Ack) -> None:
        """Answer (or fail) everything still queued; used once the writer cannot go on."""
        answered = [(sub, ack) for waiting in self._backlog.values() for sub in waiting]
        self._backlog.clear()
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, Submission):
                answered.append((item, ack))
            elif isinstance(item, _WriterTask) and self._loop is not None:
                error = RuntimeError("ingest writer failed")
                self._loop.call_soon_threadsafe(_settle, item.future, None, error)
        self._resolve(answered)
        with self._pending_lock:
            self._pending_events = 0
            self._pending_by_agent.clear()

    def _unavailable(self) -> Ack:
        return retry(Reason.REASON_UNAVAILABLE, "hub is restarting", self.config.max_backoff_ms)

    def _run_task(self, task: _WriterTask) -> None:
        try:
            result, error = task.fn(), None
        except Exception as exc:  # handed to the awaiting coroutine
            result, error = None, exc
        if self._loop is not None:
            self._loop.call_soon_threadsafe(_settle, task.future, result, error)

    def _process(self, group: list[Submission]) -> None:
        started = time.monotonic()
        tentative: dict[str, ChainRecord] = {}
        seen: dict[tuple[str, bytes, int], bytes] = {}
        accepted: list[tuple[Submission, AcceptedEnvelope]] = []
        acks: list[tuple[Submission, Ack]] = []
        alerts: list[events_pb2.Event] = []
        for sub in group:
            decision = self._decide(sub, tentative, seen)
            if decision.alert is not None:
                alerts.append(decision.alert)
            if decision.ack is not None:
                acks.append((sub, decision.ack))
                continue
            h = sub.header
            tentative[h.agent_id] = decision.chain  # type: ignore[assignment]
            seen[(h.agent_id, h.chain_id, h.seq)] = sub.digest
            accepted.append((sub, AcceptedEnvelope(h.agent_id, h.chain_id, h.seq, sub.digest, sub.rows, sub.agent)))
        acks += self._commit(accepted, tentative, alerts)
        self._finish_group(group, started, acks, sum(len(sub.rows) for sub, _ in accepted))

    def _finish_group(
        self, group: list[Submission], started: float, acks: list[tuple[Submission, Ack]], stored: int
    ) -> None:
        """Release the group's admission budget, learn the drain rate (of `stored` events: duplicates cost next
        to nothing, they are no rate), answer the agents."""
        released: collections.Counter[str] = collections.Counter()
        for sub in group:
            released[sub.header.agent_id] -= len(sub.rows)
        self._adjust_pending(released)
        if stored:
            elapsed = max(time.monotonic() - started, 1e-4)
            self._drain_rate = 0.8 * self._drain_rate + 0.2 * (stored / elapsed)
        self._resolve(acks)

    def _commit(
        self,
        accepted: list[tuple[Submission, AcceptedEnvelope]],
        tentative: dict[str, ChainRecord],
        alerts: list[events_pb2.Event],
    ) -> list[tuple[Submission, Ack]]:
        items = [item for _, item in accepted]
        if alerts:
            items.append(AcceptedEnvelope(HUB_AGENT, b"", 0, b"", [to_row(a) for a in alerts]))
        if not items:
            return []
        now_ns = time.time_ns()
        try:
            self._store(items, tentative, now_ns, {sub.header.agent_id for sub, _ in accepted})
        except StoreUnavailableError as exc:
            self._fan_out([])
            kind = "full" if isinstance(exc, StoreFullError) else "error"
            self.metrics.store_errors.labels(kind).inc()
            log.error("store commit failed; answering RETRY", extra={"error": str(exc), "envelopes": len(items)})
            self._store_down_until = time.monotonic() + self.config.max_backoff_ms / 1000 / 4
            details = "disk full" if kind == "full" else "I/O error"
            ack = retry(Reason.REASON_STORE_UNAVAILABLE, details, self.config.max_backoff_ms)
            return [(sub, ack) for sub, _ in accepted]
        self._store_down_until = 0.0
        self.chains.update(tentative)
        stored = sum(len(i.rows) for i in items)
        self.metrics.count_stored(stored)
        self.metrics.commit_batch.observe(stored)
        self._fan_out([Committed(i.agent_id, i.first_cursor, now_ns, i.rows) for i in items if i.rows])
        return [(sub, ok(NO_REASON, item.seq, item.chain_id)) for sub, item in accepted]

    def _store(
        self, items: list[AcceptedEnvelope], chains: dict[str, ChainRecord], now_ns: int, agents: set[str]
    ) -> None:
        """Commit `items`; more than `commit_part_events` events in parts, with the envelopes light agents
        sent meanwhile committed between them (`agents`, those of this commit, wait: theirs stay in order)."""
        part_events = self.config.commit_part_events
        if self._parting or sum(len(item.rows) for item in items) <= part_events:
            self.store.commit(items, chains, now_ns)
            return
        self._parting = True
        try:
            for _ in self.store.commit_parts(items, chains, now_ns, part_events):
                self._between_parts(agents)
        finally:
            self._parting = False

    def _between_parts(self, busy: set[str]) -> None:
        """Commit (in one transaction) the next envelope of each agent not in `busy` whose next envelope is
        light (LIGHT_EVENTS at most), up to `commit_part_events` events (at least one envelope)."""
        self._drain_queue()
        light: list[Submission] = []
        events = 0
        for agent_id, waiting in list(self._backlog.items()):
            size = len(waiting[0].rows)
            if agent_id in busy or size > LIGHT_EVENTS or (light and events + size > self.config.commit_part_events):
                continue
            light.append(waiting.popleft())
            events += size
            if not waiting:
                del self._backlog[agent_id]
        if not light:
            return
        try:
            self._process(light)
        except BaseException:
            self._resolve([(sub, self._unavailable()) for sub in light])
            raise

    def _drain_queue(self) -> None:
        """Move what is queued into the backlog without waiting; writer tasks wait for the next group."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            self._stash(item, self._deferred)

    def _fan_out(self, committed: list[Committed]) -> None:
        """Hand committed events to the subscribers in cursor order: what is committed while a commit is in
        parts (whose ids come after that commit's) is held until that commit's last part."""
        if self._parting:
            self._held += committed
            return
        committed, self._held = committed + self._held, []
        if committed and self.on_committed is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self.on_committed, committed)

    def _decide(
        self, sub: Submission, tentative: dict[str, ChainRecord], seen: dict[tuple[str, bytes, int], bytes]
    ) -> _Decision:
        h = sub.header
        state = tentative.get(h.agent_id) or self.chains.get(h.agent_id)
        if state is None or state.chain_id != h.chain_id or h.seq <= state.last_seq:  # else not stored yet
            key = (h.agent_id, h.chain_id, h.seq)
            stored = seen.get(key) or self.store.stored_digest(*key)
            if stored is not None:
                return self._resent(sub, stored)
        if state is None or state.chain_id != h.chain_id:
            return self._new_chain(sub, state)
        if h.seq <= state.last_seq:
            self.metrics.duplicates.inc()
            return _Decision(ok(Reason.REASON_ALREADY_ACKNOWLEDGED, h.seq, h.chain_id))
        if h.seq > state.last_seq + 1:
            details = f"expected seq {state.last_seq + 1}"
            return _Decision(retry(Reason.REASON_OUT_OF_ORDER, details, 0, state.last_seq, state.chain_id))
        if h.prev_hash != state.last_hash:
            self.metrics.count_chain_break("break")
            summary = f"{h.agent_id}: seq {h.seq} does not link to seq {state.last_seq}"
            alert = self._alert("bus.chain_break", summary, h)
            ack = invalid(Reason.REASON_CHAIN_BREAK, "prev_hash does not match", state.last_seq)
            return _Decision(ack, None, alert)
        return _Decision(None, ChainRecord(h.chain_id, h.seq, sub.digest))

    def _resent(self, sub: Submission, stored: bytes) -> _Decision:
        h = sub.header
        if stored == sub.digest:
            self.metrics.duplicates.inc()
            return _Decision(ok(Reason.REASON_DUPLICATE, h.seq, h.chain_id))
        self.metrics.count_chain_break("fork")
        alert = self._alert("bus.fork", f"{h.agent_id}: two different envelopes claim seq {h.seq}", h)
        return _Decision(invalid(Reason.REASON_FORK, f"seq {h.seq} already stored with other content"), None, alert)

    def _new_chain(self, sub: Submission, state: ChainRecord | None) -> _Decision:
        h = sub.header
        if h.seq == 1 and h.prev_hash == GENESIS_HASH:
            alert = None
            if state is not None:
                self.metrics.count_chain_break("reset")
                alert = self._alert(
                    "bus.chain_reset", f"{h.agent_id} started a new chain after seq {state.last_seq}", h,
                    events_pb2.SEVERITY_NOTICE,
                )  # fmt: skip
            return _Decision(None, ChainRecord(h.chain_id, 1, sub.digest), alert)
        if h.seq == 1:
            return _Decision(invalid(Reason.REASON_CHAIN_START, "seq 1 must have a zero prev_hash"))
        last = state.last_seq if state else 0
        chain_id = state.chain_id if state else b""
        return _Decision(retry(Reason.REASON_CHAIN_UNKNOWN, "expected seq 1 of a new chain", 0, last, chain_id))

    def _alert(
        self, rule: str, summary: str, h: envelope_pb2.EnvelopeHeader, severity: int = events_pb2.SEVERITY_ERROR
    ) -> events_pb2.Event | None:
        """A hub alert about an agent's chain; one per agent and rule per ALERT_INTERVAL_S, the rest counted."""
        log.warning(summary, extra={"rule": rule, "agent_id": h.agent_id, "seq": h.seq})
        now = time.monotonic()
        last, suppressed = self._alerted.get((h.agent_id, rule), (-ALERT_INTERVAL_S, 0))
        if now - last < ALERT_INTERVAL_S:
            self._alerted[(h.agent_id, rule)] = (last, suppressed + 1)
            self.metrics.alerts_suppressed.labels(rule).inc()
            return None
        self._alerted[(h.agent_id, rule)] = (now, 0)
        details = {"agent_id": h.agent_id, "seq": str(h.seq)}
        if suppressed:
            details["suppressed_since_last"] = str(suppressed)
        return events_pb2.Event(
            event_id=f"{rule}:{h.agent_id}:{h.chain_id.hex()}:{h.seq}:{time.time_ns()}",
            ts_ns=time.time_ns(),
            host=self.hostname,
            agent=HUB_AGENT,
            severity=severity,  # type: ignore[arg-type]
            alert=events_pb2.Alert(rule=rule, summary=summary, details=details),
        )

    def _resolve(self, acks: list[tuple[Submission, Ack]]) -> None:
        if not acks or self._loop is None:
            return

        def resolve() -> None:
            for sub, ack in acks:
                if not sub.future.done():
                    sub.future.set_result(ack)

        self._loop.call_soon_threadsafe(resolve)


def _light_first(group: list[Submission]) -> list[list[Submission]]:
    """The group as two commits: first the agents with at most LIGHT_EVENTS events in it, then the rest.

    A light agent's envelope (an agent's ordinary batch) is acked after a commit of its size, not after
    the commit of another agent's backlog; each agent's envelopes stay in one commit, in order.
    """
    events: collections.Counter[str] = collections.Counter()
    for sub in group:
        events[sub.header.agent_id] += len(sub.rows)
    light = [sub for sub in group if events[sub.header.agent_id] <= LIGHT_EVENTS]
    heavy = [sub for sub in group if events[sub.header.agent_id] > LIGHT_EVENTS]
    return [part for part in (light, heavy) if part]


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
