"""The agent shape: a name, a config section, and a collect loop that yields events.

The runtime (identity, outbox, batching, publishing, heartbeat, metrics, signals) owns everything
else; an agent only observes. Adding an agent means adding one module, its config section in
`amoskys.config.AgentConfig`, an entry in `amoskys.agents.AGENTS`, and its tests.
"""

from __future__ import annotations

import os
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar

from amoskys.config import AgentConfig
from amoskys.v1 import events_pb2

__all__ = ["Agent", "new_event_id"]


def new_event_id() -> str:
    """128 random bits, hex: unique without coordination."""
    return os.urandom(16).hex()


class Agent(ABC):
    """Subclasses set `kind` and implement `collect`."""

    kind: ClassVar[str]

    def __init__(self, config: AgentConfig, state_dir: Path) -> None:
        self.config = config
        self.state_dir = state_dir
        self.host = config.resolved_host()

    def event(self, severity: int = events_pb2.SEVERITY_INFO, **body: Any) -> events_pb2.Event:
        """A new event of this agent, stamped now; `body` is one oneof field, e.g. process=..."""
        return events_pb2.Event(
            event_id=new_event_id(),
            ts_ns=time.time_ns(),
            host=self.host,
            agent=self.kind,
            severity=severity,  # type: ignore[arg-type]
            **body,
        )

    def alert(
        self, rule: str, summary: str, severity: int = events_pb2.SEVERITY_WARNING, **details: str
    ) -> events_pb2.Event:
        return self.event(severity, alert=events_pb2.Alert(rule=rule, summary=summary, details=details))

    @abstractmethod
    def collect(self) -> AsyncIterator[events_pb2.Event]:
        """Yield events forever (until cancelled). Blocking work belongs in a thread."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (sockets, files); called once on shutdown."""
