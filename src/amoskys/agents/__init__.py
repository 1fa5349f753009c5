"""Agents: one module each, all on one runtime. `AGENTS` maps a kind to its class (imported lazily)."""

from __future__ import annotations

import importlib

from amoskys.agents.runtime.base import Agent
from amoskys.catalog import AGENT_KINDS

__all__ = ["AGENTS", "Agent", "load_agent_class"]

# kind -> "module:Class", from the one registry of agent kinds (amoskys.catalog).
AGENTS: dict[str, str] = {name: kind.entry for name, kind in AGENT_KINDS.items()}


def load_agent_class(kind: str) -> type[Agent]:
    module_name, _, class_name = AGENTS[kind].partition(":")
    cls: type[Agent] = getattr(importlib.import_module(module_name), class_name)
    return cls
