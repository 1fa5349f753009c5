"""The agent shape: a name, a config schema, and a collect loop that yields events.

The runtime (identity, outbox, batching, publishing, heartbeat, metrics, signals) owns everything
else; an agent only observes. Adding an agent means adding one module or package (the agent class,
its config section in an `AgentConfig` subclass named by `config_type`), an entry in
`amoskys.catalog.AGENT_KINDS`, and its tests.
"""

from __future__ import annotations

import os
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from amoskys.config import AgentConfig
from amoskys.v1 import events_pb2

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

__all__ = ["Agent", "ConfigT", "new_event_id"]

ConfigT = TypeVar("ConfigT", bound=AgentConfig)


def new_event_id() -> str:
    """128 random bits, hex: unique without coordination."""
    return os.urandom(16).hex()


class Agent(ABC, Generic[ConfigT]):
    """Subclasses set `kind`, `config_type` (their `ConfigT`: the common part plus their section) and `collect`."""

    kind: ClassVar[str]
    config_type: ClassVar[type[AgentConfig]] = AgentConfig  # what `amoskys agent KIND` loads and validates

    def __init__(self, config: ConfigT, state_dir: Path) -> None:
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
        self, rule: str, summary: str, details: dict[str, str] | None = None,
        severity: int = events_pb2.SEVERITY_WARNING,
    ) -> events_pb2.Event:  # fmt: skip
        """An alert event: `rule` names what fired (e.g. proc.exe_in_tmp), `details` say where."""
        return self.event(severity, alert=events_pb2.Alert(rule=rule, summary=summary, details=details or {}))

    @abstractmethod
    def collect(self) -> AsyncIterator[events_pb2.Event]:
        """Yield events forever (until cancelled). Blocking work belongs in a thread."""

    def checkpoint(self) -> dict[str, str]:
        """The agent's position (e.g. a log offset) matching every event yielded so far.

        The runtime stores it in the same outbox transaction as those events, so a restart or a
        kill -9 neither loses nor repeats anything. Override when the agent has a position.
        """
        return {}

    def restore(self, state: dict[str, str]) -> None:
        """Take back the position saved by `checkpoint` (called once, before `collect`)."""

    def shutdown_events(self) -> Iterable[events_pb2.Event]:
        """Events that only stopping produces (e.g. flows still open); called once, after `collect` stopped."""
        return ()

    def register_metrics(self, registry: CollectorRegistry) -> None:
        """Declare the agent's own metrics (`amoskys_agent_KIND_*`) in the runtime's registry."""

    def reload(self, config: ConfigT) -> None:
        """SIGHUP: take the settings that can change without a restart (default: the whole config)."""
        self.config = config

    async def close(self) -> None:
        """Release resources (sockets, files); called once on shutdown."""
