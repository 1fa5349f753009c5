"""`amoskys status`: the fleet summary from the hub (agents, liveness, counts, hub health)."""

from __future__ import annotations

import argparse
import json
import time
from typing import TYPE_CHECKING

from google.protobuf.json_format import MessageToDict

from amoskys.commands import Subparsers
from amoskys.commands.hubclient import add_hub_arguments, call_hub
from amoskys.semantics import heard_ns, liveness
from amoskys.v1 import bus_pb2

if TYPE_CHECKING:
    from amoskys.v1 import bus_pb2_grpc


def register(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser("status", help="print the fleet summary from the hub")
    add_hub_arguments(parser)
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(func=run)


def agent_document(agent: bus_pb2.AgentInfo, now_ns: int) -> dict[str, object]:
    """An agent as `--json` prints it: the hub's fields and its liveness."""
    return {
        **MessageToDict(agent, preserving_proto_field_name=True),
        "liveness": liveness(agent, now_ns),
        "heard_ns": str(heard_ns(agent)),  # as MessageToDict writes 64-bit integers
    }


def table_row(agent: bus_pb2.AgentInfo, now_ns: int) -> str:
    """An agent as the table prints it; HEARD is the age liveness judges (see `heard_ns`)."""
    heard_ago_s = (now_ns - heard_ns(agent)) / 1e9
    return (
        f"{agent.host:<24} {agent.agent_id:<28} {agent.kind:<8} {liveness(agent, now_ns):<5} {heard_ago_s:>9.0f}s "
        f"{agent.events_total:>10} {agent.alerts_total:>7}"
    )


def run(args: argparse.Namespace) -> int:
    async def fetch(stub: bus_pb2_grpc.EventBusAsyncStub) -> tuple[bus_pb2.HubStatus, bus_pb2.ListAgentsResponse]:
        return await stub.GetStatus(bus_pb2.StatusRequest()), await stub.ListAgents(bus_pb2.ListAgentsRequest())

    status, agents = call_hub(args, fetch)
    now = time.time_ns()
    if args.json:
        document = {
            "hub": MessageToDict(status, preserving_proto_field_name=True),
            "agents": [agent_document(a, now) for a in agents.agents],
        }
        print(json.dumps(document, indent=2))
        return 0
    print(
        f"hub {args.hub}: version {status.version}, {status.events_stored} events, "
        f"{status.store_bytes / 1e6:.1f} MB, {status.ingest_eps:.0f} events/s, {status.streams} streams"
    )
    print(f"{'HOST':<24} {'AGENT':<28} {'KIND':<8} {'STATE':<5} {'HEARD':>10} {'EVENTS':>10} {'ALERTS':>7}")
    for a in agents.agents:
        print(table_row(a, now))
    return 0
