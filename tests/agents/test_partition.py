"""A silent partition between an agent and its hub: noticed in seconds, nothing lost, nothing twice.

The hub runs as a process in its own network namespace, reached over a veth pair; the partition is an
nftables drop-everything table inside that namespace (no RST, no ICMP: packets vanish, as on a cut
link). The agent (in this process) must notice within 40 s (keepalive pings plus TCP_USER_TIMEOUT), and
every event made during the partition must be stored exactly once after it heals.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml

from amoskys import keys
from amoskys.agents.host import HostAgentConfig
from amoskys.agents.runtime.runner import AgentRuntime
from amoskys.client import hub_channel, hub_stub
from amoskys.config import TlsConfig
from amoskys.v1 import bus_pb2, bus_pb2_grpc, events_pb2
from tests.conftest import TestPki
from tests.netlab import free_subnets, ip
from tests.processes import stop_process

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("nft") is None,
    reason="needs root, ip and nft (network namespaces)",
)
DETECT_WITHIN_S = 40
PARTITION_S = 45
DROP_ALL = """table inet amoskys_partition {
  chain input { type filter hook input priority -300; policy drop; }
  chain output { type filter hook output priority -300; policy drop; }
}"""


AGENT_ID = "parthost-host"  # enrolled (HOST-KIND) for host parthost, kind host


@dataclass
class NamespacedHub:
    namespace: str
    address: str
    pki: TestPki
    agent: HostAgentConfig  # the host agent, heartbeat every second, trusted by this hub

    def partition(self) -> None:
        subprocess.run(["ip", "netns", "exec", self.namespace, "nft", "-f", "-"], input=DROP_ALL, text=True,
                       check=True)  # fmt: skip

    def heal(self) -> None:
        subprocess.run(["ip", "netns", "exec", self.namespace, "nft", "delete", "table", "inet", "amoskys_partition"],
                       check=True)  # fmt: skip

    async def stored(self, agent_id: str) -> list[bus_pb2.StoredEvent]:
        tls = consumer_tls(self.pki)
        async with hub_channel(self.address, tls, "localhost") as channel:
            stub: bus_pb2_grpc.EventBusAsyncStub = hub_stub(channel)
            flt = bus_pb2.EventFilter(agent_ids=[agent_id])
            events: list[bus_pb2.StoredEvent] = []
            token = ""
            while True:
                request = bus_pb2.QueryRequest(filter=flt, page_size=1000, page_token=token)
                page = await stub.Query(request, timeout=10)
                events += page.events
                token = page.next_page_token
                if not token:
                    return events


def consumer_tls(pki: TestPki) -> TlsConfig:
    key_path, cert_path = pki.root / "certs" / "ui.key", pki.root / "certs" / "ui.crt"
    if not cert_path.exists():
        pki.issue("ui", "client")
    return TlsConfig(ca=str(pki.ca_cert), cert=str(cert_path), key=str(key_path))


def wait_for_port(log: Path, process: subprocess.Popen[bytes]) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            entry = json.loads(line) if line.startswith("{") else {}
            if entry.get("msg") == "eventbus serving":
                return int(entry["port"])
        assert process.poll() is None, log.read_text()
        time.sleep(0.1)
    raise AssertionError(f"hub did not start: {log.read_text()}")


@pytest.fixture
def namespaced_hub(test_pki: TestPki, tmp_path: Path) -> Iterator[NamespacedHub]:
    """`amoskys eventbus` in a new namespace, on the far end of a /30 veth pair; all removed afterwards."""
    (subnet,) = free_subnets(1, prefix=30)
    near, far = (str(subnet.network_address + i) for i in (1, 2))
    tag = secrets.token_hex(3)
    namespace, veth = f"amsk-{tag}-hub", f"amp{tag}"
    process: subprocess.Popen[bytes] | None = None
    try:
        ip("netns", "add", namespace)
        ip("link", "set", "lo", "up", namespace=namespace)
        ip("link", "add", veth, "type", "veth", "peer", "name", "hub0", "netns", namespace)
        ip("addr", "add", f"{near}/30", "dev", veth)
        ip("link", "set", veth, "up")
        ip("addr", "add", f"{far}/30", "dev", "hub0", namespace=namespace)
        ip("link", "set", "hub0", "up", namespace=namespace)
        key, cert = test_pki.issue("hub", "server", ["localhost"])
        trust_dir = tmp_path / "trust"
        trust_dir.mkdir()
        identity = agent_identity(test_pki, trust_dir, tmp_path)
        config = tmp_path / "eventbus.yml"
        config.write_text(yaml.safe_dump({
            "listen": f"{far}:0",
            "tls": {"ca": str(test_pki.ca_cert), "cert": str(cert), "key": str(key)},
            "trust_map": str(trust_dir), "crl": str(tmp_path / "crl.pem"),
            "store": {"path": str(tmp_path / "store" / "events.db")},
            "metrics": {"listen": ""}, "logging": {"level": "info", "format": "json"},
        }))  # fmt: skip
        log = tmp_path / "hub.log"
        with log.open("wb") as err:
            command = ["ip", "netns", "exec", namespace, sys.executable, "-m", "amoskys", "eventbus", "--config"]
            process = subprocess.Popen([*command, str(config)], stderr=err)
        port = wait_for_port(log, process)
        address = f"{far}:{port}"
        yield NamespacedHub(
            namespace, address, test_pki, msgspec.convert({**identity, "hub": address}, HostAgentConfig)
        )
    finally:
        if process is not None:
            stop_process(process, timeout=10)
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True, check=False)
        subprocess.run(["ip", "link", "del", veth], capture_output=True, check=False)


def agent_identity(pki: TestPki, trust_dir: Path, tmp_path: Path) -> dict[str, Any]:
    """The agent's config document but the hub address, its key in the trust dir (before the hub starts)."""
    key_path, cert_path = pki.issue(AGENT_ID, "client")
    signing = tmp_path / f"{AGENT_ID}.sign"
    keys.write_private_key(signing, keys.generate_signing_key())
    public = keys.public_key_text(keys.load_signing_key(signing).public_key())
    (trust_dir / f"{AGENT_ID}.pub").write_text(public + "\n")
    return {
        "agent_id": AGENT_ID, "host": "parthost", "hub_server_name": "localhost",
        "tls": {"ca": str(pki.ca_cert), "cert": str(cert_path), "key": str(key_path)},
        "signing_key": str(signing), "state_dir": str(tmp_path / "state"), "heartbeat_s": 1.0,
        "batch": {"max_events": 200, "max_linger_ms": 100}, "logging": {"level": "info", "format": "text"},
    }  # fmt: skip


async def wait_until(predicate: Any, timeout: float, step: float = 0.2) -> float:
    """Seconds until `predicate()` held; AssertionError after `timeout`."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, f"not within {timeout} s"
        await asyncio.sleep(step)
    return time.monotonic() - start


def connected_gauge(runtime: AgentRuntime) -> float | None:
    return runtime.metrics.registry.get_sample_value("amoskys_agent_connected")


@pytest.mark.slow
@pytest.mark.parametrize("busy", [pytest.param(True, id="sending"), pytest.param(False, id="idle")])
async def test_silent_partition_is_noticed_in_seconds_and_loses_nothing(
    namespaced_hub: NamespacedHub, busy: bool
) -> None:
    """Sending: an event a second, unacknowledged data times out. Idle (no heartbeat due): only the
    keepalive pings go unanswered; events are made once the partition is noticed."""
    hub = namespaced_hub
    quiet = msgspec.structs.replace(hub.agent.host_metrics, interval_s=600.0, ports_interval_s=600.0)
    config = hub.agent if busy else msgspec.structs.replace(hub.agent, heartbeat_s=600.0, host_metrics=quiet)
    runtime = AgentRuntime("host", None, config)
    task = asyncio.create_task(runtime.run())
    try:
        await wait_until(lambda: runtime.publisher.connected and runtime.publisher.idle, timeout=60)
        assert connected_gauge(runtime) == 1.0
        hub.partition()
        made_during: list[str] = []
        detected_after = None
        start = time.monotonic()
        while time.monotonic() - start < PARTITION_S:  # one marked event a second while cut off
            if detected_after is None and connected_gauge(runtime) == 0.0:
                detected_after = time.monotonic() - start
            if busy or detected_after is not None:
                marker = runtime.agent.event(
                    host_metrics=events_pb2.HostMetrics(), labels={"partition": str(len(made_during))}
                )
                runtime.buffer.append(marker.SerializeToString())
                made_during.append(marker.event_id)
            await asyncio.sleep(1.0)
        assert detected_after is not None, "the partition was not noticed"
        assert detected_after <= DETECT_WITHIN_S, detected_after
        assert not runtime.publisher.connected
        hub.heal()
        await wait_until(lambda: runtime.outbox.sizes()[0] == 0 and not runtime.buffer, timeout=120)
        assert connected_gauge(runtime) == 1.0
    finally:
        runtime._stopping.set()
        with suppress(asyncio.TimeoutError):
            await asyncio.wait_for(task, 30)
    stored = await hub.stored(AGENT_ID)
    ids = [s.event.event_id for s in stored]
    assert len(ids) == len(set(ids)), "an event was stored twice"
    partition_ids = [s.event.event_id for s in stored if "partition" in s.event.labels]
    assert sorted(partition_ids) == sorted(made_during)  # every event made during the partition, once
    print(f"partition noticed after {detected_after:.1f} s; {len(made_during)} events made meanwhile, all stored once")
