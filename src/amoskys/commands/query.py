"""`amoskys query`: search the hub's store (time range, host, agent, kind, severity, text)."""

from __future__ import annotations

import argparse
import json
import re
import time
from typing import TYPE_CHECKING

from google.protobuf.json_format import MessageToDict

from amoskys.commands import Subparsers
from amoskys.commands.hubclient import add_hub_arguments, call_hub
from amoskys.errors import AmoskysError
from amoskys.ui.model import summary
from amoskys.v1 import bus_pb2, events_pb2

if TYPE_CHECKING:
    from amoskys.v1 import bus_pb2_grpc

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def register(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser("query", help="search stored events on the hub")
    add_hub_arguments(parser)
    parser.add_argument("--since", default="1h", help="how far back: 30s, 15m, 2h, 7d (default 1h)")
    parser.add_argument("--host", action="append", default=[], help="repeatable")
    parser.add_argument("--agent-id", action="append", default=[], help="repeatable")
    parser.add_argument("--agent", action="append", default=[], help="agent kind (proc, auth, ...); repeatable")
    parser.add_argument("--kind", action="append", default=[], help="event kind (process, auth, alert...)")
    names = [n.removeprefix("SEVERITY_").lower() for n in events_pb2.Severity.keys()]  # noqa: SIM118 - enum wrapper
    parser.add_argument("--severity", choices=names[1:], help="minimum severity")
    parser.add_argument("--text", default="", help="case-insensitive substring")
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--json", action="store_true", help="one JSON object per line (default: a table)")
    parser.set_defaults(func=run)


def parse_since(text: str) -> int:
    match = re.fullmatch(r"(\d+)([smhd])", text)
    if not match:
        raise AmoskysError(f"--since: expected a number and a unit (s, m, h, d), got {text!r}")
    return time.time_ns() - int(match.group(1)) * UNITS[match.group(2)] * 1_000_000_000


def run(args: argparse.Namespace) -> int:
    severity = events_pb2.Severity.Value(f"SEVERITY_{args.severity.upper()}") if args.severity else 0
    flt = bus_pb2.EventFilter(
        since_ns=parse_since(args.since),
        hosts=args.host,
        agent_ids=args.agent_id,
        agents=args.agent,
        kinds=args.kind,
        min_severity=severity,  # type: ignore[arg-type]
        text=args.text,
    )

    async def fetch(stub: bus_pb2_grpc.EventBusAsyncStub) -> bus_pb2.QueryResponse:
        return await stub.Query(bus_pb2.QueryRequest(filter=flt, page_size=args.limit))

    for stored in call_hub(args, fetch).events:
        print(json.dumps(MessageToDict(stored, preserving_proto_field_name=True)) if args.json else table_row(stored))
    return 0


def table_row(stored: bus_pb2.StoredEvent) -> str:
    """Time, host, agent id, kind, severity, cursor, then what happened (the UI's summary)."""
    event = stored.event
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event.ts_ns / 1e9))
    body = event.WhichOneof("body") or "-"
    severity = events_pb2.Severity.Name(event.severity).removeprefix("SEVERITY_").lower()
    return f"{when} {event.host:<20} {stored.agent_id:<24} {body:<12} {severity:<8} {stored.cursor:<8} {summary(event)}"
