"""Command-line options shared by commands that talk to the hub as a consumer.

gRPC is imported when a call is made, not when the CLI is built: `amoskys agent` shares the
parser and must not carry grpcio's memory.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

from amoskys.config import TlsConfig
from amoskys.errors import AmoskysError

if TYPE_CHECKING:
    from amoskys.v1 import bus_pb2_grpc

__all__ = ["add_hub_arguments", "call_hub"]

T = TypeVar("T")


def add_hub_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("hub connection (mTLS with a consumer certificate)")
    group.add_argument("--hub", default="localhost:50051", help="hub address host:port")
    group.add_argument("--server-name", default="", help="name to expect in the hub certificate")
    group.add_argument("--ca", default="/etc/amoskys/tls/ca.crt")
    group.add_argument("--cert", default="/etc/amoskys/tls/operator.crt")
    group.add_argument("--key", default="/etc/amoskys/tls/operator.key")
    group.add_argument("--timeout", type=float, default=10.0, help="seconds")


def call_hub(args: argparse.Namespace, call: Callable[[bus_pb2_grpc.EventBusAsyncStub], Awaitable[T]]) -> T:
    """Run one consumer call against the hub; gRPC failures become AmoskysError."""
    import grpc

    from amoskys.client import hub_channel, hub_stub

    async def main() -> T:
        tls = TlsConfig(ca=args.ca, cert=args.cert, key=args.key)
        async with hub_channel(args.hub, tls, args.server_name) as channel:
            try:
                return await asyncio.wait_for(call(hub_stub(channel)), args.timeout)
            except grpc.aio.AioRpcError as exc:
                raise AmoskysError(f"hub {args.hub}: {exc.code().name}: {exc.details()}") from exc
            except TimeoutError as exc:
                raise AmoskysError(f"hub {args.hub}: no answer within {args.timeout} s") from exc

    return asyncio.run(main())
