"""Agents: one module or package each, all on one runtime.

`AGENTS` maps a kind to its class (imported lazily); the class names its config schema, so a kind's
settings are found through the registry without importing any other agent.
"""

from __future__ import annotations

import importlib
from typing import Any

from amoskys.agents.runtime.base import Agent
from amoskys.catalog import AGENT_KINDS
from amoskys.config import AgentConfig

__all__ = ["AGENTS", "Agent", "agent_config_type", "load_agent_class"]

# kind -> "module:Class", from the one registry of agent kinds (amoskys.catalog).
AGENTS: dict[str, str] = {name: kind.entry for name, kind in AGENT_KINDS.items()}


def load_agent_class(kind: str) -> type[Agent[Any]]:
    module_name, _, class_name = AGENTS[kind].partition(":")
    cls: type[Agent[Any]] = getattr(importlib.import_module(module_name), class_name)
    return cls


def agent_config_type(kind: str) -> type[AgentConfig]:
    """The schema of `/etc/amoskys/agent-KIND.yml`: the common part plus the agent's own section."""
    return load_agent_class(kind).config_type
