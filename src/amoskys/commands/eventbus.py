"""`amoskys eventbus --config FILE`: run the hub until SIGTERM (SIGHUP reloads trust and certs)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from amoskys.commands import Subparsers
from amoskys.config import EventBusConfig, load_config
from amoskys.logs import setup_logging

# gRPC's poller and the store writer are threads: hand the GIL over within 0.5 ms, not the default
# 5 ms, or every ack waits for a switch (measured: p50 ack latency 5.1 ms -> see BENCHMARKS.md).
GIL_SWITCH_INTERVAL_S = 0.0005


def register(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser("eventbus", help="run the EventBus hub (gRPC, mTLS only)")
    parser.add_argument("--config", type=Path, default=Path("/etc/amoskys/eventbus.yml"), help="YAML config file")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from amoskys.eventbus.server import create_server

    config = load_config(args.config, EventBusConfig)
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    setup_logging(config.logging)
    hub = create_server(config)
    return asyncio.run(hub.run())
