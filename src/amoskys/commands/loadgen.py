"""`amoskys loadgen`: simulated agents against a hub; prints a JSON summary."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from amoskys.commands import Subparsers
from amoskys.commands.eventbus import GIL_SWITCH_INTERVAL_S
from amoskys.errors import ConfigError


def register(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser("loadgen", help="simulate N signed agents publishing to a hub")
    parser.add_argument("--hub", default="localhost:50051", help="HOST:PORT, or several comma-separated (a cluster)")
    parser.add_argument("--server-name", default="", help="name to expect in the hub certificate")
    parser.add_argument("--ca", type=Path, required=True, help="CA certificate")
    parser.add_argument("--identities", type=Path, required=True, help="directory of agent identities")
    parser.add_argument("--ca-dir", type=Path, help="issue missing identities with this CA (writes trust/*.pub)")
    parser.add_argument("--prepare-only", action="store_true", help="issue identities and exit")
    parser.add_argument("--agents", type=int, default=8)
    parser.add_argument("--rate", type=float, default=0.0, help="total events/s (0: as fast as acks allow)")
    parser.add_argument("--batch", type=int, default=500, help="events per envelope")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds")
    parser.add_argument("--inflight", type=int, default=8, help="envelopes in flight per stream (batch.max_inflight)")
    parser.add_argument("--processes", type=int, default=1, help="worker processes sharing the agents")
    parser.add_argument("--ack-log", type=Path, help="append 'agent:chain seq first count' per acked envelope")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from amoskys.loadgen import LoadOptions, ensure_identities, run_load, summary_json

    if min(args.agents, args.batch, args.inflight, args.processes) < 1 or args.duration <= 0:
        raise ConfigError("--agents, --batch, --inflight and --processes must be >= 1, --duration > 0")
    if args.ca_dir:
        ensure_identities(args.ca_dir, args.identities, args.agents)
    if args.prepare_only:
        return 0
    hub = args.hub.split(",") if "," in args.hub else args.hub
    options = LoadOptions(
        hub=hub, server_name=args.server_name, ca=args.ca, identities=args.identities, agents=args.agents,
        rate=args.rate, batch=args.batch, duration=args.duration, inflight=args.inflight,
        ack_log=args.ack_log, processes=args.processes,
    )  # fmt: skip
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    print(summary_json(asyncio.run(run_load(options))))
    return 0
