"""A proc agent collecting for real (kernel events) while a test runs, for the proc test modules."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest

from amoskys.agents.proc.agent import ProcAgent
from amoskys.agents.proc.config import ProcAgentConfig
from amoskys.agents.proc.connector import ConnectorUnavailable, ProcConnector
from amoskys.v1 import events_pb2

__all__ = ["Running", "new_agent", "running_agent"]

Action = events_pb2.ProcessEvent.Action


def new_agent(tmp_path: Path, **proc: object) -> ProcAgent:
    return ProcAgent(msgspec.convert({"host": "testhost", "proc": proc}, ProcAgentConfig), tmp_path)


@dataclass
class Running:
    agent: ProcAgent
    events: list[events_pb2.Event]

    def processes(self, pid: int, action: int | None = None) -> list[events_pb2.ProcessEvent]:
        return [
            e.process for e in self.events
            if e.WhichOneof("body") == "process" and e.process.pid == pid and action in (None, e.process.action)
        ]  # fmt: skip

    def events_processes(self) -> list[events_pb2.ProcessEvent]:
        return [e.process for e in self.events if e.WhichOneof("body") == "process"]

    def processes_named(self, name: str) -> list[events_pb2.ProcessEvent]:
        """Processes called `name` that started while the agent ran."""
        return [p for p in self.events_processes() if p.name == name and p.action == Action.START]

    def alerts(self, pid: int) -> list[events_pb2.Alert]:
        """Alerts about process `pid`."""
        return [
            e.alert for e in self.events if e.WhichOneof("body") == "alert" and e.alert.details.get("pid") == str(pid)
        ]  # fmt: skip

    async def wait_for(self, condition: Callable[[], bool], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, "timed out"
            await asyncio.sleep(0.05)


@asynccontextmanager
async def running_agent(tmp_path: Path, **proc: Any) -> AsyncIterator[Running]:
    """The agent's collect loop as a task, its events gathered, from the end of its snapshot."""
    try:
        ProcConnector().close()
    except ConnectorUnavailable as exc:
        pytest.skip(f"no process connector here: {exc}")
    state = Running(new_agent(tmp_path, **proc), [])

    async def consume() -> None:
        async for event in state.agent.collect():
            state.events.append(event)

    task = asyncio.create_task(consume())
    try:
        await state.wait_for(lambda: any(e.process.action == Action.SNAPSHOT for e in state.events))
        assert state.agent.mode == "connector"
        yield state
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
