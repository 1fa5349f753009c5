"""mTLS gRPC channels to the hub, shared by agents, the UI, `amoskys status` and the load generator."""

from __future__ import annotations

from pathlib import Path

import grpc

from amoskys import pki
from amoskys.config import TlsConfig
from amoskys.v1 import bus_pb2_grpc

__all__ = ["CHANNEL_OPTIONS", "channel_credentials", "hub_channel", "hub_stub"]

CHANNEL_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
]


def channel_credentials(tls: TlsConfig) -> tuple[grpc.ChannelCredentials, pki.TlsIdentity]:
    """Client credentials from a checked identity (refuses unsafe, mismatched or expired material)."""
    identity = pki.load_tls_identity(Path(tls.cert), Path(tls.key), Path(tls.ca))
    credentials = grpc.ssl_channel_credentials(
        root_certificates=identity.ca_pem, private_key=identity.key_pem, certificate_chain=identity.cert_pem
    )
    return credentials, identity


def hub_channel(address: str, tls: TlsConfig, server_name: str = "") -> grpc.aio.Channel:
    """An asyncio channel to the hub; `server_name` overrides the name checked against the hub cert."""
    credentials, _ = channel_credentials(tls)
    options = list(CHANNEL_OPTIONS)
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.aio.secure_channel(address, credentials, options=options)


def hub_stub(channel: grpc.aio.Channel) -> bus_pb2_grpc.EventBusAsyncStub:
    """The asyncio stub (EventBusAsyncStub exists for type checking only)."""
    return bus_pb2_grpc.EventBusStub(channel)
