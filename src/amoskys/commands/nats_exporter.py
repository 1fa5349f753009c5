"""`amoskys nats-exporter --config FILE`: the local NATS node's monitoring endpoint as Prometheus metrics."""

from __future__ import annotations

import argparse
from pathlib import Path

from amoskys.commands import Subparsers
from amoskys.config import NatsExporterConfig, load_config
from amoskys.logs import setup_logging


def register(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "nats-exporter", help="serve the local NATS node's monitoring endpoint (JSON) as Prometheus metrics"
    )
    parser.add_argument("--config", type=Path, default=Path("/etc/amoskys/nats-exporter.yml"), help="YAML config file")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from amoskys.eventbus.natsmetrics import NatsExporter

    config = load_config(args.config, NatsExporterConfig)
    setup_logging(config.logging)
    return NatsExporter(config).run()
