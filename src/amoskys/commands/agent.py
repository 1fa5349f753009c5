"""`amoskys agent NAME --config FILE`: run one agent on the shared runtime."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from amoskys.agents import AGENTS
from amoskys.commands import Subparsers
from amoskys.config import AgentConfig, load_config
from amoskys.logs import setup_logging


def register(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser("agent", help="run an agent: " + ", ".join(sorted(AGENTS)))
    parser.add_argument("name", choices=sorted(AGENTS), help="which agent")
    parser.add_argument("--config", type=Path, help="YAML config (default /etc/amoskys/agent-NAME.yml)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    path = args.config or Path(f"/etc/amoskys/agent-{args.name}.yml")
    config = load_config(path, AgentConfig)
    setup_logging(config.logging)
    asyncio.run(_main(args.name, path, config))
    return 0


async def _main(name: str, path: Path, config: AgentConfig) -> None:
    from amoskys.agents.runtime import AgentRuntime

    await AgentRuntime(name, path, config).run()
