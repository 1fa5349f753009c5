"""`amoskys agent NAME --config FILE`: run one agent on the shared runtime."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from amoskys.agents import AGENTS, agent_config_type
from amoskys.agents.runtime.realtime import keep_for_helpers
from amoskys.catalog import describe
from amoskys.commands import Subparsers
from amoskys.config import AgentConfig, load_config
from amoskys.errors import ConfigError
from amoskys.logs import setup_logging

if TYPE_CHECKING:
    from amoskys.agents.runtime.runner import AgentRuntime

DELIVERY_POLL_S = 0.2


def register(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser("agent", help="run an agent: " + ", ".join(sorted(AGENTS)))
    parser.add_argument("name", nargs="?", choices=sorted(AGENTS), help="which agent")
    parser.add_argument("--list", action="store_true", help="list the agent kinds (and the events each reports)")
    parser.add_argument("--json", action="store_true", help="with --list: as JSON")
    parser.add_argument("--config", type=Path, help="YAML config (default /etc/amoskys/agent-NAME.yml)")
    parser.add_argument(
        "--pcap", type=Path, help="flow only: replay this pcap/pcapng file instead of capturing, deliver, exit"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.list:
        return _list(as_json=args.json)
    if args.name is None:
        raise ConfigError(f"name an agent ({', '.join(sorted(AGENTS))}) or use --list")
    if args.pcap is not None and args.name != "flow":
        raise ConfigError(f"--pcap is an option of the flow agent, not of {args.name}")
    keep_for_helpers()  # before any thread is made: only the agent's helpers keep a real-time priority
    path = args.config or Path(f"/etc/amoskys/agent-{args.name}.yml")
    config = load_config(path, agent_config_type(args.name))
    if args.pcap is not None:
        config = _with_pcap(config, args.pcap)
    setup_logging(config.logging)
    return asyncio.run(_main(args.name, path, config))


def _list(*, as_json: bool) -> int:
    """The agent kinds from the one registry (amoskys.catalog), for people and for the roles."""
    kinds = describe()
    if as_json:
        print(json.dumps(kinds))
    else:
        for kind in kinds:
            default = " (default)" if kind["default"] else ""
            print(f"{kind['name']:<8} metrics :{kind['metrics_port']}  {', '.join(kind['bodies'])}{default}")
    return 0


def _with_pcap(config: AgentConfig, pcap: Path) -> AgentConfig:
    from amoskys.agents.flow.config import FlowAgentConfig

    assert isinstance(config, FlowAgentConfig)  # --pcap is refused for any other kind
    return msgspec.structs.replace(config, flow=msgspec.structs.replace(config.flow, pcap=str(pcap)))


def _replays(config: AgentConfig) -> bool:
    """A flow agent told to replay a file (by --pcap or its config) rather than capture."""
    from amoskys.agents.flow.config import FlowAgentConfig

    return isinstance(config, FlowAgentConfig) and bool(config.flow.pcap)


async def _main(name: str, path: Path, config: AgentConfig) -> int:
    """Run the agent; exit status 1 when a runtime task died (systemd restarts the agent)."""
    from amoskys.agents.runtime.runner import AgentRuntime

    runtime = AgentRuntime(name, path, config)
    if not _replays(config):
        await runtime.run()
    else:
        running = asyncio.create_task(runtime.run())
        await _stop_once_delivered(runtime, running)
        await running
    return 1 if runtime.failure is not None else 0


async def _stop_once_delivered(runtime: AgentRuntime, running: asyncio.Task[None]) -> None:
    """A replay: once the file is read and the hub has acknowledged every flow, stop as on SIGTERM."""
    from amoskys.agents.flow.agent import FlowAgent

    assert isinstance(runtime.agent, FlowAgent)
    replayed = asyncio.create_task(runtime.agent.replayed.wait())
    await asyncio.wait([replayed, running], return_when=asyncio.FIRST_COMPLETED)
    while not running.done() and (runtime.buffer or runtime.outbox.sizes()[0]):
        await asyncio.sleep(DELIVERY_POLL_S)
    replayed.cancel()
    if not running.done():
        signal.raise_signal(signal.SIGTERM)
