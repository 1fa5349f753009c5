"""Agents: one module each, all on one runtime. `AGENTS` maps a kind to its class (imported lazily)."""

from __future__ import annotations

import importlib

from amoskys.agents.base import Agent

__all__ = ["AGENTS", "Agent", "load_agent_class"]

# kind -> "module:Class"; an agent is listed here only once it really works.
AGENTS: dict[str, str] = {
    "auth": "amoskys.agents.auth:AuthAgent",
    "flow": "amoskys.agents.flow:FlowAgent",
    "host": "amoskys.agents.host:HostAgent",
    "proc": "amoskys.agents.proc:ProcAgent",
    "snmp": "amoskys.agents.snmp:SnmpAgent",
    "scanner": "amoskys.agents.scanner:ScannerAgent",
}


def load_agent_class(kind: str) -> type[Agent]:
    module_name, _, class_name = AGENTS[kind].partition(":")
    cls: type[Agent] = getattr(importlib.import_module(module_name), class_name)
    return cls
