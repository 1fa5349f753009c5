"""The agent kinds: what each is, where its code lives, and which event bodies it may send.

One registry for the runtime (which class runs `amoskys agent KIND`), the hub (what an identity
enrolled for KIND may store) and the UI. Importing it costs nothing: it names modules, never
imports them.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["AGENT_KINDS", "COMMON_BODIES", "HUB_AGENT", "AgentKind", "split_agent_id"]

HUB_AGENT = "eventbus"  # the hub's own events (chain breaks, forks, resets); no agent may claim it
COMMON_BODIES = frozenset({"heartbeat", "alert"})  # every agent sends these (the runtime does)


@dataclass(frozen=True, slots=True)
class AgentKind:
    name: str
    entry: str  # "module:Class" run by `amoskys agent NAME`
    bodies: frozenset[str]  # the Event body fields it reports, besides COMMON_BODIES

    def may_send(self, body: str) -> bool:
        return body in self.bodies or body in COMMON_BODIES

    def may_raise(self, rule: str) -> bool:
        """Alert rules are namespaced: `KIND.*` for the agent's own, `agent.*` for the runtime's."""
        return rule.startswith((f"{self.name}.", "agent."))


def _kind(name: str, entry: str, *bodies: str) -> tuple[str, AgentKind]:
    return name, AgentKind(name, entry, frozenset(bodies))


# An agent is listed here only once it really works.
AGENT_KINDS: dict[str, AgentKind] = dict(
    [
        _kind("auth", "amoskys.agents.auth.agent:AuthAgent", "auth"),
        _kind("flow", "amoskys.agents.flow.agent:FlowAgent", "flow"),
        _kind("host", "amoskys.agents.host:HostAgent", "host_metrics", "port"),
        _kind("proc", "amoskys.agents.proc.agent:ProcAgent", "process"),
        _kind("snmp", "amoskys.agents.snmp.agent:SnmpAgent", "snmp"),
        _kind("scanner", "amoskys.agents.scanner.agent:ScannerAgent", "device"),
    ]
)


def split_agent_id(agent_id: str) -> tuple[str, str] | None:
    """(host, kind) of the default agent id form `HOST-KIND`, or None when it is not of that form."""
    host, sep, kind = agent_id.rpartition("-")
    return (host, kind) if sep and host and kind in AGENT_KINDS else None
