"""TCP_USER_TIMEOUT reaches the publisher's connection to the hub as it connects, and no other socket."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from amoskys.agents.runtime.publisher import limit_unacked_time


async def user_timeout_ms(port: int) -> int:
    """Open a connection to 127.0.0.1:port the way grpclib does (asyncio) and read its TCP_USER_TIMEOUT."""
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        sock = writer.get_extra_info("socket")
        return int(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT))
    finally:
        writer.close()
        await writer.wait_closed()


async def test_only_connections_to_the_hub_get_the_limit(tmp_path: Path) -> None:
    async def hang_up(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    hub = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    other = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    journal = await asyncio.start_unix_server(hang_up, str(tmp_path / "journal.sock"))
    try:
        hub_port, other_port = hub.sockets[0].getsockname()[1], other.sockets[0].getsockname()[1]
        limit_unacked_time(f"127.0.0.1:{hub_port}", 7)
        assert await user_timeout_ms(hub_port) == 7000
        assert await user_timeout_ms(other_port) == 0  # the kernel's default: not touched
        _, writer = await asyncio.open_unix_connection(str(tmp_path / "journal.sock"))  # the hook lets it be
        writer.close()
        await writer.wait_closed()
    finally:
        for server in (hub, other, journal):
            server.close()
            await server.wait_closed()
