"""The agent kinds: what each is, where its code lives, and which event bodies it may send.

One registry for the runtime (which class runs `amoskys agent KIND`, and through it the kind's
config schema), the hub (what an identity enrolled for KIND may store), the UI and the deployment
(the roles and the Molecule tests read the kinds, their metrics ports and the default set from
`amoskys agent --list --json`). Importing it costs nothing: it names modules, never imports them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["AGENT_KINDS", "COMMON_BODIES", "HUB_AGENT", "AgentKind", "describe", "split_agent_id"]

HUB_AGENT = "eventbus"  # the hub's own events (chain breaks, forks, resets); no agent may claim it
COMMON_BODIES = frozenset({"heartbeat", "alert"})  # every agent sends these (the runtime does)


@dataclass(frozen=True, slots=True)
class AgentKind:
    name: str
    entry: str  # "module:Class" run by `amoskys agent NAME`; the class names its config schema
    metrics_port: int  # where a deployed agent serves /metrics (Prometheus' exporter range, see README)
    default: bool  # deployed on an agent host whose inventory does not choose (amoskys_agents_enabled)
    bodies: tuple[str, ...]  # the Event body fields it reports besides COMMON_BODIES; the first on its own

    def may_send(self, body: str) -> bool:
        return body in self.bodies or body in COMMON_BODIES

    def may_raise(self, rule: str) -> bool:
        """Alert rules are namespaced: `KIND.*` for the agent's own, `agent.*` for the runtime's."""
        return rule.startswith((f"{self.name}.", "agent."))


def _kind(name: str, entry: str, port: int, *bodies: str, default: bool = False) -> tuple[str, AgentKind]:
    return name, AgentKind(name, entry, port, default, bodies)


# An agent is listed here only once it really works. Metrics ports: Prometheus' exporter range is fully
# allocated, so these are ports allocated there to FreeBSD-only exporters (none can be taken on Linux).
AGENT_KINDS: dict[str, AgentKind] = dict(
    [
        _kind("auth", "amoskys.agents.auth.agent:AuthAgent", 9572, "auth", default=True),
        _kind("flow", "amoskys.agents.flow.agent:FlowAgent", 9767, "flow"),
        _kind("host", "amoskys.agents.host:HostAgent", 9452, "host_metrics", "port", default=True),
        _kind("proc", "amoskys.agents.proc.agent:ProcAgent", 9248, "process", default=True),
        _kind("snmp", "amoskys.agents.snmp.agent:SnmpAgent", 9969, "snmp"),
        _kind("scanner", "amoskys.agents.scanner.agent:ScannerAgent", 9898, "device"),
    ]
)


def describe() -> list[dict[str, Any]]:
    """The kinds as `amoskys agent --list --json` prints them (the roles' and the tests' view), by name."""
    return [
        {
            "name": kind.name,
            "metrics_port": kind.metrics_port,
            "default": kind.default,
            "main_body": kind.bodies[0],
            "bodies": sorted({*kind.bodies, *COMMON_BODIES}),
        }
        for kind in sorted(AGENT_KINDS.values(), key=lambda k: k.name)
    ]


def split_agent_id(agent_id: str) -> tuple[str, str] | None:
    """(host, kind) of the default agent id form `HOST-KIND`, or None when it is not of that form."""
    host, sep, kind = agent_id.rpartition("-")
    return (host, kind) if sep and host and kind in AGENT_KINDS else None
