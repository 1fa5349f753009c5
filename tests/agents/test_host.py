"""host: a real listening socket appears and disappears; metrics are sane."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import msgspec
import pytest

from amoskys.agents.host import HostAgent, HostAgentConfig, host_metrics, listening_sockets
from amoskys.v1 import events_pb2
from tests.agents.conftest import section_error

Action = events_pb2.PortChange.Action


def test_listening_socket_opened_then_closed(tmp_path: Path) -> None:
    agent = HostAgent(msgspec.convert({"host": "testhost"}, HostAgentConfig), tmp_path)
    assert agent.port_changes(listening_sockets()) == []  # the first scan is the baseline
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    try:
        opened = [e.port for e in agent.port_changes(listening_sockets()) if e.port.socket.port == port]
        assert [(c.action, c.socket.protocol, c.socket.address, c.socket.pid) for c in opened] == [
            (Action.OPENED, "tcp", "127.0.0.1", os.getpid())
        ]
        assert opened[0].socket.process
    finally:
        server.close()
    closed = [e.port for e in agent.port_changes(listening_sockets()) if e.port.socket.port == port]
    assert [c.action for c in closed] == [Action.CLOSED]


def test_host_metrics_are_read_from_the_machine() -> None:
    metrics = host_metrics(listening_sockets())
    assert metrics.mem_total_bytes > metrics.mem_available_bytes > 0
    assert metrics.uptime_s > 0
    assert any(d.mount == "/" for d in metrics.disks) or metrics.disks == []
    assert 0.0 <= metrics.cpu_percent <= 100.0 * os.cpu_count()  # type: ignore[operator]


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ("{interval_s: 0}", "key 'host_metrics.interval_s': expected float > 0.0"),
        ("{ports_interval_s: .inf}", "key 'host_metrics.ports_interval_s': expected float <= 31622400"),
        ("{interval: 5}", "key 'host_metrics.interval': unknown key; did you mean 'interval_s'?"),
    ],
)
def test_bad_host_section_is_explained_at_load(tmp_path: Path, section: str, expected: str) -> None:
    assert section_error(tmp_path, "host", f"host_metrics: {section}\n").startswith(expected)
