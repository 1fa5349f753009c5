"""Work on the hub's event loop in steps taken in turn (`Turns`), and light agents committed first."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from amoskys.config import BackpressureConfig
from amoskys.eventbus.ingest import LIGHT_EVENTS, Ingest, Submission, _light_first
from amoskys.eventbus.metrics import BusMetrics
from amoskys.eventbus.store import AgentUpdate, SqliteStore
from amoskys.eventbus.turns import Steps, Turns, run_now
from amoskys.v1 import envelope_pb2


def _job(log: list[str], name: str, steps: int) -> Steps:
    for n in range(steps):
        log.append(f"{name}{n}")
        yield
    return name


async def test_a_small_job_waits_for_one_step_of_each_other_key_not_their_whole_backlog() -> None:
    turns, log = Turns(slice_s=0.0), []  # one step per slice
    big = [turns.add("flood", _job(log, f"f{k}.", 50)) for k in range(3)]
    small = turns.add("good", _job(log, "g", 1))
    assert await small == "g"
    assert log.index("g0") <= 2, log  # behind at most a step of the flood, not its 150
    assert [await job for job in big] == ["f0.", "f1.", "f2."]  # one key's jobs run in order
    assert log.index("f0.49") < log.index("f1.0") < log.index("f2.0")
    await turns.stop()


async def test_a_failing_job_fails_its_future_only() -> None:
    def failing() -> Steps:
        yield
        raise ValueError("broken")

    turns, log = Turns(), []
    bad, good = turns.add("a", failing()), turns.add("a", _job(log, "x", 2))
    with pytest.raises(ValueError, match="broken"):
        await bad
    assert await good == "x"
    await turns.stop()


async def test_stop_cancels_what_is_queued_and_closes_it() -> None:
    closed: list[str] = []

    def endless() -> Steps:
        try:
            while True:
                yield
        finally:
            closed.append("endless")

    turns = Turns()
    job = turns.add("a", endless())
    await asyncio.sleep(0.01)
    await turns.stop()
    assert job.cancelled() and closed == ["endless"]
    assert turns.add("a", endless()).cancelled()  # nothing runs after stop


def _submission(agent_id: str, events: int) -> Submission:
    future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
    header = envelope_pb2.EnvelopeHeader(agent_id=agent_id)
    return Submission(header, b"", [None] * events, AgentUpdate(host="h", kind="proc"), future)  # type: ignore[list-item, arg-type]


async def test_light_agents_are_committed_before_a_backlog_and_each_agent_stays_in_one_commit() -> None:
    flood = [_submission("flood", 1000) for _ in range(2)]
    small = _submission("good", 10)
    split = [_submission("split", LIGHT_EVENTS), _submission("split", 1)]  # light alone, heavy together
    light, heavy = _light_first([flood[0], small, *split, flood[1]])
    assert light == [small]
    assert heavy == [flood[0], *split, flood[1]]
    assert _light_first(flood) == [flood]


async def test_a_commit_group_stays_near_its_budget_and_small_envelopes_always_join(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "events.db")
    ingest = Ingest(store, BackpressureConfig(), BusMetrics())
    try:
        floods = [_submission(agent, 1000) for agent in ("flood1", "flood2") for _ in range(2)]
        good = _submission("good", 10)
        for sub in [*floods, good]:
            ingest._stash(sub, [])
        groups = [ingest._group(budget=1500) for _ in range(4)]
        agents = [[sub.header.agent_id for sub in group] for group in groups]
        assert agents == [["flood1", "good"], ["flood2"], ["flood1"], ["flood2"]]  # floods alternate, one a commit
    finally:
        store.close()


def test_run_now_takes_every_step_at_once() -> None:
    log: list[str] = []
    assert run_now(_job(log, "x", 3)) == "x"
    assert log == ["x0", "x1", "x2"]


def test_while_busy_an_identity_holds_fewer_events_waiting_but_always_one_envelope(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "events.db")
    config = BackpressureConfig(max_pending_per_agent=20_000, busy_pending_per_agent=2_000)
    ingest = Ingest(store, config, BusMetrics())
    try:
        ingest.reserve("flood", 2_000)
        assert ingest.overload("flood", 1_000) is None  # not busy: up to max_pending_per_agent
        refused = ingest.overload("flood", 1_000, busy=True)
        assert refused is not None
        assert refused.why == "2000 events of this agent already wait for commit (at most 2000 while busy)"
        assert ingest.overload("good", 10, busy=True) is None  # another identity is not held back
        assert ingest.overload("big", 5_000, busy=True) is None  # nothing waiting: one envelope, any size
        ingest.reserve("big", 5_000)
        assert ingest.overload("big", 10, busy=True) is not None
        ingest.release("flood", 2_000)
        assert ingest.overload("flood", 1_000, busy=True) is None
    finally:
        store.close()


def test_above_the_high_water_mark_the_retry_says_so(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "events.db")
    ingest = Ingest(store, BackpressureConfig(high_water_events=1_000), BusMetrics())
    try:
        ingest.reserve("flood", 900)
        ingest.reserve("good", 100)
        refused = ingest.overload("flood", 200)
        assert refused is not None
        assert refused.why == "backlog above high-water mark (1000 events wait; this agent holds 900)"
        assert ingest.overload("good", 200) is None  # below its fair share (500), under twice the mark
    finally:
        store.close()
