"""A real hub on its own loop thread, seeded once per module with signed envelopes from test agents.

The UI is synchronous (WSGI threads) and keeps its own gRPC loop, so the hub must not share the
test's loop: it runs here on a background thread, and tests call the UI like a WSGI server would.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
import wsgiref.util
import wsgiref.validate
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote
from wsgiref.headers import Headers

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from amoskys import pki
from amoskys.config import UiConfig
from amoskys.eventbus.server import create_server
from amoskys.ui.app import create_app
from amoskys.ui.auth import Authenticator
from amoskys.ui.hubclient import HubClient
from amoskys.ui.server import bound_port, build_server
from amoskys.v1 import envelope_pb2, events_pb2
from tests.conftest import TestPki
from tests.hubfixture import AgentIdentity, LiveHub, hub_config
from tests.processes import stop_process

T = TypeVar("T")
S = 1_000_000_000
HOSTILE = "<script>alert('x')</script>\"'><img src=x onerror=alert(1)>\x1b[31m\x00\u202egnp.exe"
HOSTILE_HOST = '<script>alert("host")</script>'
NEEDLE = "planted-needle-7731"


class ThreadedHub:
    """The real EventBus hub (mTLS on 127.0.0.1:0, temp PKI and store) served from its own thread."""

    def __init__(self, root: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-hub", daemon=True)
        self.thread.start()
        test_pki = TestPki(root, pki.init_ca(root / "ca", "Test CA", days=60))
        config = hub_config(test_pki, root, metrics={"listen": ""})
        hub = create_server(config)
        self.run(hub.start())
        self.live = LiveHub(hub, test_pki, config)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def publish(self, agent: AgentIdentity, events: list[events_pb2.Event]) -> None:
        ack = self.run(self.live.publish(agent, agent.seal(events)))
        assert ack.status == envelope_pb2.PublishAck.OK, ack

    def client(self, **kwargs: Any) -> HubClient:
        return HubClient(self.live.address, self.live.consumer_tls("ui"), "localhost", **kwargs)

    def close(self) -> None:
        self.run(self.live.hub.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def event(host: str, agent: str, ts_ns: int, severity: int = events_pb2.SEVERITY_INFO, **body: Any) -> events_pb2.Event:
    name = next(iter(body))
    return events_pb2.Event(
        event_id=f"{host}-{agent}-{name}-{ts_ns}", ts_ns=ts_ns, host=host, agent=agent, severity=severity, **body
    )  # type: ignore[arg-type]


def heartbeat(host: str, agent: str, ts_ns: int, interval_s: int = 30) -> events_pb2.Event:
    return event(host, agent, ts_ns, heartbeat=events_pb2.Heartbeat(version="0.1.0", interval_s=interval_s))


@dataclass
class Fleet:
    """What the seeded hub holds, for assertions."""

    hub: ThreadedHub
    agents: dict[str, AgentIdentity] = field(default_factory=dict)

    def agent(self, agent_id: str, host: str = "") -> AgentIdentity:
        """The identity `agent_id`, enrolled as HOST-KIND says (or for `host`, with the id's kind)."""
        if agent_id not in self.agents:
            kind = agent_id.rsplit("-", 1)[-1] if host else ""
            self.agents[agent_id] = self.hub.live.agent(agent_id, host=host, kind=kind)
        return self.agents[agent_id]

    def publish(self, agent_id: str, events: list[events_pb2.Event]) -> None:
        self.hub.publish(self.agent(agent_id), events)


def seed(fleet: Fleet) -> None:
    """web1 up (with metrics, ports, a brute force and a hostile process), db1 late, old1 down,
    gw1's scanner with devices, a host with a hostile name, and one planted auth line."""
    now = time.time_ns()
    listening = [
        events_pb2.ListenSocket(protocol="tcp", address="0.0.0.0", port=22, pid=401, process="sshd"),
        events_pb2.ListenSocket(protocol="tcp6", address="::", port=443, pid=977, process="nginx", uid=0, user="root"),
        events_pb2.ListenSocket(protocol="tcp", address="127.0.0.1", port=5432, uid=108, user="postgres"),  # unseen
    ]
    metrics = events_pb2.HostMetrics(
        cpu_percent=12.5, load1=0.5, mem_total_bytes=8 << 30, mem_available_bytes=5 << 30, listening=listening
    )
    fleet.publish("web1-host", [heartbeat("web1", "host", now), event("web1", "host", now, host_metrics=metrics)])
    process = events_pb2.ProcessEvent(action=events_pb2.ProcessEvent.START, pid=4242, name=HOSTILE, cmdline=[HOSTILE])
    fleet.publish("web1-proc", [heartbeat("web1", "proc", now), event("web1", "proc", now - 5 * S, process=process)])
    planted = events_pb2.AuthEvent(
        kind=events_pb2.AuthEvent.SSH_FAILED,
        user=NEEDLE,
        raw=f"Failed password for invalid user {NEEDLE} from 203.0.113.9",
    )
    brute = events_pb2.Alert(rule="auth.brute_force", summary="5 failures from 203.0.113.9 in 60 s")
    fleet.publish(
        "web1-auth",
        [
            heartbeat("web1", "auth", now),
            event("web1", "auth", now - 60 * S, events_pb2.SEVERITY_NOTICE, auth=planted),
            event("web1", "auth", now - 50 * S, events_pb2.SEVERITY_WARNING, alert=brute),
        ],
    )
    fleet.publish("db1-host", [heartbeat("db1", "host", now - 100 * S)])  # 100 s > 2.5 x 30 s: late
    fleet.publish("old1-proc", [heartbeat("old1", "proc", now - 1000 * S)])  # > 5 x 30 s: down
    device = events_pb2.DeviceEvent
    seen = [
        (30, device(action=device.NEW, mac="aa:bb:cc:00:00:01", ips=["10.0.0.7"], vendor="Acme")),
        (20, device(action=device.NEW, mac="aa:bb:cc:00:00:02", ips=["10.0.0.8"])),
        (10, device(action=device.GONE, mac="aa:bb:cc:00:00:02", ips=["10.0.0.8"])),
    ]
    scans = [event("gw1", "scanner", now - ago * S, device=found) for ago, found in seen]
    fleet.publish("gw1-scanner", [heartbeat("gw1", "scanner", now), *scans])
    fleet.agent("evil-proc", host=HOSTILE_HOST)  # a host name enrolled as it is, markup and all
    fleet.publish("evil-proc", [heartbeat(HOSTILE_HOST, "proc", now)])


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    hub = ThreadedHub(tmp_path_factory.mktemp("hub"))
    try:
        fleet = Fleet(hub)
        seed(fleet)
        yield fleet
    finally:
        hub.close()


@pytest.fixture(scope="module")
def client(seeded: Fleet) -> Iterator[HubClient]:
    with seeded.hub.client(timeout_s=5.0, refresh_s=3600) as hub_client:
        yield hub_client


@pytest.fixture(scope="module")
def app(client: HubClient) -> Any:
    return create_app(client)


@dataclass
class Response:
    status: int
    headers: Headers  # case-insensitive, as HTTP header names are
    body: str

    def json(self) -> Any:
        import json

        assert self.headers["Content-Type"].startswith("application/json"), self.headers
        return json.loads(self.body)


def call(app: Any, path: str, headers: dict[str, str] | None = None) -> Response:
    """One GET through wsgiref's validator (which also checks the app obeys WSGI), no socket."""
    environ: dict[str, Any] = {}
    wsgiref.util.setup_testing_defaults(environ)
    raw_path, _, environ["QUERY_STRING"] = path.partition("?")
    environ["PATH_INFO"] = unquote(raw_path).encode().decode("latin-1")  # as WSGI servers pass it
    for name, value in (headers or {}).items():
        environ[f"HTTP_{name.upper().replace('-', '_')}"] = value
    seen: dict[str, Any] = {}

    def start_response(status: str, response_headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        seen["status"], seen["headers"] = int(status.split(maxsplit=1)[0]), response_headers
        return lambda data: None

    result = wsgiref.validate.validator(app)(environ, start_response)
    try:
        body = b"".join(result)
    finally:
        result.close()  # type: ignore[attr-defined]
    return Response(seen["status"], Headers(seen["headers"]), body.decode())


def authed_app(client: HubClient, password_hash: str) -> Any:
    return create_app(client, Authenticator(password_hash))


@contextmanager
def running(config: UiConfig, app: Any) -> Iterator[int]:
    """The production server (cheroot) for `app` on config.listen; yields its port."""
    server = build_server(config, app)
    server.prepare()
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    try:
        yield bound_port(server)
    finally:
        server.stop()
        thread.join(10)


class NotifySocket:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)

    def wait_for(self, prefix: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                message = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            for line in message.splitlines():
                if line.startswith(prefix):
                    return line
        raise AssertionError(f"no {prefix} from the UI within {timeout} s")

    def drain(self) -> None:
        """Drop what was sent so far (a later `wait_for` sees only what comes after)."""
        self.sock.setblocking(False)
        try:
            while True:
                self.sock.recv(4096)
        except BlockingIOError:
            pass
        finally:
            self.sock.settimeout(0.2)

    def close(self) -> None:
        self.sock.close()


@dataclass
class UiProcess:
    """`amoskys ui` as its own process, reading the test hub."""

    process: subprocess.Popen[bytes]
    port: int

    def rss_bytes(self) -> int:
        """Resident memory now, from /proc/PID/status."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS in /proc status")


@contextmanager
def ui_process(root: Path, hub: ThreadedHub, **document: Any) -> Iterator[UiProcess]:
    """`python -m amoskys ui` on 127.0.0.1:0 with `document` as its config; stopped on exit."""
    tls = hub.live.consumer_tls("ui")
    config = {
        "listen": "127.0.0.1:0",
        "hub": hub.live.address,
        "hub_server_name": "localhost",
        "tls": {"ca": tls.ca, "cert": tls.cert, "key": tls.key},
        "logging": {"level": "warning"},
        **document,
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "ui.yml").write_text(yaml.safe_dump(config))
    notify = NotifySocket(root / "notify")
    env = {**os.environ, "NOTIFY_SOCKET": str(notify.path)}
    command = [sys.executable, "-m", "amoskys", "ui", "--config", str(root / "ui.yml")]
    process = subprocess.Popen(command, env=env)
    try:
        port = int(notify.wait_for("STATUS=serving on port", timeout=60).rsplit(" ", 1)[1])
        yield UiProcess(process, port)
    finally:
        stop_process(process, 20)
        notify.close()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text as {(sample name, sorted labels): value}."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
