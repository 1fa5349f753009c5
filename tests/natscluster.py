"""Real `nats-server` processes with JetStream on loopback: one node or a cluster of three."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.processes import stop_process

__all__ = ["NatsCluster", "nats_cluster"]

NATS_SERVER = shutil.which("nats-server")
START_TIMEOUT_S = 20.0


def _free_port() -> int:
    """A port the kernel just handed out (nats-server needs its routes' ports before any node starts)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class NatsNode:
    name: str
    root: Path
    client_port: int = field(default_factory=_free_port)
    route_port: int = field(default_factory=_free_port)
    monitor_port: int = field(default_factory=_free_port)  # HTTP monitoring: /varz, /routez, /jsz, /healthz
    tls: tuple[Path, Path, Path] | None = None  # (ca, cert, key): clients must present a certificate of `ca`
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'tls' if self.tls else 'nats'}://127.0.0.1:{self.client_port}"

    def write_config(self, peers: list[NatsNode]) -> Path:
        routes = ", ".join(f"nats-route://127.0.0.1:{p.route_port}" for p in peers if p is not self)
        cluster = (
            f"cluster {{ name: amoskys, listen: 127.0.0.1:{self.route_port}, routes: [{routes}] }}"
            if len(peers) > 1
            else ""
        )
        tls = ""
        if self.tls is not None:
            ca, cert, key = self.tls
            tls = f'tls {{ ca_file: "{ca}", cert_file: "{cert}", key_file: "{key}", verify: true }}'
        config = self.root / f"{self.name}.conf"
        config.write_text(
            f"server_name: {self.name}\nlisten: 127.0.0.1:{self.client_port}\nhttp: 127.0.0.1:{self.monitor_port}\n"
            f"jetstream {{ store_dir: {self.root / self.name} }}\n{cluster}\n{tls}\n"
        )
        return config

    def start(self, peers: list[NatsNode]) -> None:
        config = self.write_config(peers)
        log = (self.root / f"{self.name}.log").open("ab")
        self.proc = subprocess.Popen([str(NATS_SERVER), "-c", str(config)], stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.root / f"{self.name}.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", self.client_port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"{self.name} did not start")

    def kill(self) -> None:
        """kill -9."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop_process(self.proc, 5)


@dataclass
class NatsCluster:
    nodes: list[NatsNode]

    @property
    def servers(self) -> list[str]:
        return [node.url for node in self.nodes]

    def start(self) -> None:
        for node in self.nodes:
            node.start(self.nodes)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@contextmanager
def nats_cluster(root: Path, size: int = 3, tls: tuple[Path, Path, Path] | None = None) -> Iterator[NatsCluster]:
    """`size` JetStream nodes routed to each other (size 1: a single server), all stopped at the end;
    with `tls` (ca, cert, key), clients speak mTLS."""
    if NATS_SERVER is None:
        pytest.skip("nats-server is not installed (scripts/setup-host.sh --for test)")
    root.mkdir(parents=True, exist_ok=True)
    cluster = NatsCluster([NatsNode(f"n{i + 1}", root, tls=tls) for i in range(size)])
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
