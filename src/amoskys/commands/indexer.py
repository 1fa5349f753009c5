"""`amoskys indexer --config FILE`: index the JetStream stream into the query store until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from amoskys.commands import Subparsers
from amoskys.config import IndexerConfig, load_config
from amoskys.logs import setup_logging


def register(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "indexer", help="index the hub cluster's JetStream stream (store.backend: jetstream)"
    )
    parser.add_argument("--config", type=Path, default=Path("/etc/amoskys/indexer.yml"), help="YAML config file")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from amoskys.eventbus.indexer import Indexer

    config = load_config(args.config, IndexerConfig)
    setup_logging(config.logging)

    async def main() -> int:
        return await Indexer(config).run()

    return asyncio.run(main())
