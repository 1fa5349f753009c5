"""The publisher's connection handling: TCP_USER_TIMEOUT on the hub connection only; `stop` ends `run`."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from amoskys import keys
from amoskys.agents.runtime.identity import load_signer
from amoskys.agents.runtime.metrics import AgentMetrics
from amoskys.agents.runtime.publisher import Publisher, limit_unacked_time
from amoskys.config import AgentConfig, TlsConfig
from amoskys.loadgen import MemoryOutbox, counts


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


async def test_a_stopped_publisher_ends_even_when_its_cancel_is_lost(tmp_path: Path) -> None:
    """grpclib can turn a cancel into a stream error (a lost connection at that moment): `stop` still ends
    `run`. Here the hub is unreachable and the cancel never comes: `run` must end at its next failure."""
    keys.write_private_key(tmp_path / "a.sign", keys.generate_signing_key())
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        hub = f"127.0.0.1:{closed.getsockname()[1]}"  # bound, not listening: connections are refused
        config = AgentConfig(agent_id="web1-proc", hub=hub, tls=TlsConfig(ca="/nonexistent", cert="/x", key="/y"))
        metrics = AgentMetrics("proc")
        outbox = MemoryOutbox("web1-proc", load_signer(tmp_path / "a.sign"), None)
        publisher = Publisher(outbox, config, metrics, asyncio.Event())
        running = asyncio.create_task(publisher.run())
        while not counts(metrics.publish_errors):
            await asyncio.sleep(0.01)
        publisher.stop()  # and no cancel
        await asyncio.wait_for(running, timeout=10)  # before: retried for ever
