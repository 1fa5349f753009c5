"""`amoskys query`: search the hub's store (time range, host, agent, kind, severity, text)."""

from __future__ import annotations

import argparse
import json
import time
from typing import TYPE_CHECKING

from google.protobuf.json_format import MessageToDict

from amoskys.commands import Subparsers
from amoskys.commands.hubclient import add_hub_arguments, call_hub
from amoskys.errors import AmoskysError
from amoskys.semantics import SEVERITIES, TIME_FORMS, parse_time, severity_name, severity_value
from amoskys.ui.model import summary
from amoskys.v1 import bus_pb2

if TYPE_CHECKING:
    from amoskys.v1 import bus_pb2_grpc


def register(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser("query", help="search stored events on the hub")
    add_hub_arguments(parser)
    parser.add_argument("--since", default="1h", help=f"from when: {TIME_FORMS} (default 1h)")
    parser.add_argument("--until", default="", help="up to when (exclusive), the same forms (default: now)")
    parser.add_argument("--host", action="append", default=[], help="repeatable")
    parser.add_argument("--agent-id", action="append", default=[], help="repeatable")
    parser.add_argument("--agent", action="append", default=[], help="agent kind (proc, auth, ...); repeatable")
    parser.add_argument("--kind", action="append", default=[], help="event kind (process, auth, alert...)")
    parser.add_argument("--severity", type=str.lower, choices=SEVERITIES, help="minimum severity")
    parser.add_argument("--text", default="", help="case-insensitive substring")
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--json", action="store_true", help="one JSON object per line (default: a table)")
    parser.set_defaults(func=run)


def event_filter(args: argparse.Namespace, now_ns: int) -> bus_pb2.EventFilter:
    """The filter the options describe; AmoskysError for a time or severity that means nothing."""
    try:
        since_ns, until_ns = parse_time(args.since, now_ns, "--since"), parse_time(args.until, now_ns, "--until")
        severity = severity_value(args.severity, "--severity") if args.severity else 0
    except ValueError as exc:
        raise AmoskysError(str(exc)) from None
    return bus_pb2.EventFilter(
        since_ns=since_ns,
        until_ns=until_ns,
        hosts=args.host,
        agent_ids=args.agent_id,
        agents=args.agent,
        kinds=args.kind,
        min_severity=severity,  # type: ignore[arg-type]
        text=args.text,
    )


def run(args: argparse.Namespace) -> int:
    flt = event_filter(args, time.time_ns())

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
    severity = severity_name(event.severity)
    return f"{when} {event.host:<20} {stored.agent_id:<24} {body:<12} {severity:<8} {stored.cursor:<8} {summary(event)}"
