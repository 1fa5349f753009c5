"""The `amoskys` command: one entry point, one subcommand module per component."""

from __future__ import annotations

import argparse
import faulthandler
import importlib
import sys
from collections.abc import Sequence

from amoskys import __version__
from amoskys.errors import AmoskysError

__all__ = ["main"]

# Each module has register(subparsers); a subcommand is listed only once it really works.
# (module nats_exporter: command nats-exporter)
COMMAND_MODULES = (
    "pki", "config", "eventbus", "indexer", "nats_exporter", "status", "query", "loadgen", "agent", "ui",
)  # fmt: skip


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser, or with `only` one command's: a process loads just the command it runs."""
    parser = argparse.ArgumentParser(
        prog="amoskys", description="AMOSKYS security telemetry: hub, agents, PKI and tools."
    )
    parser.add_argument("--version", action="version", version=f"amoskys {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        if only in (None, name):
            importlib.import_module(f"amoskys.commands.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    if sys.__stderr__ is not None:  # the process's own stderr (the journal), whatever sys.stderr is replaced by
        faulthandler.enable(sys.__stderr__)  # a crash in a C extension (gRPC, SQLite) logs every thread's stack
    argv = list(sys.argv[1:] if argv is None else argv)
    module = argv[0].replace("-", "_") if argv else ""
    command = module if module in COMMAND_MODULES else None
    args = build_parser(command).parse_args(argv)
    try:
        result: int = args.func(args)
    except AmoskysError as exc:
        print(f"amoskys {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return result
