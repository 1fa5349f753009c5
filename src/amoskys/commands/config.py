"""`amoskys config check FILE`: validate a config file against a component's schema."""

from __future__ import annotations

import argparse
from pathlib import Path

from amoskys.commands import Subparsers
from amoskys.config import AgentConfig, EventBusConfig, IndexerConfig, Section, UiConfig, dump_config, load_config

SCHEMAS: dict[str, type[Section]] = {
    "eventbus": EventBusConfig,
    "indexer": IndexerConfig,
    "agent": AgentConfig,
    "ui": UiConfig,
}


def register(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser("config", help="check configuration files")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    check = actions.add_parser(
        "check", help="validate a config file (and AMOSKYS_* overrides); print the effective config"
    )
    check.add_argument("file", type=Path)
    check.add_argument(
        "--component",
        choices=sorted(SCHEMAS),
        default=None,
        help="schema to check against (default: guessed from the file name)",
    )
    check.add_argument("--quiet", "-q", action="store_true", help="print nothing when valid")
    check.set_defaults(func=run_check)


def _guess_component(path: Path) -> str:
    name = path.name.lower()
    for component in ("eventbus", "indexer", "ui"):
        if name.startswith(component):
            return component
    return "agent"


def run_check(args: argparse.Namespace) -> int:
    component = args.component or _guess_component(args.file)
    config = load_config(args.file, SCHEMAS[component])
    if not args.quiet:
        print(f"# {args.file}: valid {component} config")
        print(dump_config(config), end="")
    return 0
