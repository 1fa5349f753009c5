"""`amoskys config check FILE`: validate a config file against a component's schema."""

from __future__ import annotations

import argparse
from pathlib import Path

from amoskys.catalog import AGENT_KINDS
from amoskys.commands import Subparsers
from amoskys.config import (
    AgentConfig,
    EventBusConfig,
    IndexerConfig,
    NatsExporterConfig,
    Section,
    UiConfig,
    dump_config,
    load_config,
)

SCHEMAS: dict[str, type[Section]] = {
    "eventbus": EventBusConfig,
    "indexer": IndexerConfig,
    "nats-exporter": NatsExporterConfig,
    "agent": AgentConfig,
    "ui": UiConfig,
}
AGENT_COMPONENTS = [f"agent-{kind}" for kind in sorted(AGENT_KINDS)]  # an agent's file: common part + its section


def register(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser("config", help="check configuration files")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    check = actions.add_parser(
        "check", help="validate a config file (and AMOSKYS_* overrides); print the effective config"
    )
    check.add_argument("file", type=Path)
    check.add_argument(
        "--component",
        choices=[*sorted(SCHEMAS), *AGENT_COMPONENTS],
        default=None,
        help="schema to check against (default: guessed from the file name, e.g. agent-flow.yml); "
        "agent: the common part only, or the kind the file name says",
    )
    check.add_argument("--quiet", "-q", action="store_true", help="print nothing when valid")
    check.set_defaults(func=run_check)


def _agent_component(path: Path) -> str:
    """agent-KIND when the file name starts so (agent-flow.yml), else agent: the common part only."""
    name = path.name.lower()
    return next((component for component in AGENT_COMPONENTS if name.startswith(component)), "agent")


def _guess_component(path: Path) -> str:
    name = path.name.lower()
    for component in ("eventbus", "indexer", "nats-exporter", "ui"):
        if name.startswith(component):
            return component
    return _agent_component(path)


def _schema(component: str) -> type[Section]:
    if component.startswith("agent-"):
        from amoskys.agents import agent_config_type  # imports that one agent only

        return agent_config_type(component.removeprefix("agent-"))
    return SCHEMAS[component]


def run_check(args: argparse.Namespace) -> int:
    component = args.component or _guess_component(args.file)
    if component == "agent":
        component = _agent_component(args.file)
    config = load_config(args.file, _schema(component))
    if not args.quiet:
        print(f"# {args.file}: valid {component} config")
        print(dump_config(config), end="")
    return 0
