"""A hub cluster (scenario `cluster`): NATS nodes routed over mTLS, the stream replicated, only the hubs and the
indexer admitted, and events of every agent host indexed exactly once while a NATS node is killed."""

from __future__ import annotations

import json
import secrets
import shlex
import time

import pytest
from fleet import (
    AGENT_HOSTS,
    AMOSKYS,
    HUB,
    HUB_METRICS_PORT,
    HUBS,
    INDEXER_HOSTS,
    INDEXER_METRICS_PORT,
    NATS,
    NATS_HOSTS,
    NATS_MONITOR_PORT,
    NATS_PORT,
    PROC_HOSTS,
    address,
    http_get,
    hub_query,
    machine,
    main_pid,
    unit_property,
    wait_until,
)

pytestmark = pytest.mark.skipif(not NATS_HOSTS, reason="a single hub: no NATS cluster in this scenario")
MONITOR = f"http://127.0.0.1:{NATS_MONITOR_PORT}"
INDEX = "/var/lib/amoskys/index/events.db"
VENV_PYTHON = AMOSKYS.rpartition("/")[0] + "/python"  # the venv has nats-py
# Connect to a NATS node with a client certificate of this host; prints "connected" or the error's class name.
NATS_CONNECT = """
import asyncio, ssl, sys
import nats, nats.errors
async def main(url, cert, key):
    context = ssl.create_default_context(cafile="/etc/amoskys/tls/ca.crt")
    context.load_cert_chain(cert, key)
    try:
        client = await nats.connect(url, tls=context, allow_reconnect=False, max_reconnect_attempts=0,
                                    connect_timeout=5)
    except (nats.errors.Error, OSError) as error:
        print(type(error).__name__)
        return
    await client.close()
    print("connected")
asyncio.run(main(*sys.argv[1:]))
"""


def monitor(name: str, path: str) -> dict:
    status, body = http_get(name, MONITOR + path)
    assert status == 200, f"{name} {path}: {status} {body}"
    return dict(json.loads(body))


@pytest.mark.parametrize("name", NATS_HOSTS)
def test_nats_node_routed_to_every_other_and_jetstream_ready(name: str) -> None:
    routes = monitor(name, "/routez")["routes"]
    assert {route["ip"] for route in routes} == {address(other) for other in NATS_HOSTS if other != name}, routes
    assert monitor(name, "/healthz")["status"] == "ok"


def test_stream_replicated_on_every_node() -> None:
    """The hubs' stream (created by the indexer or the first hub) has min(3, nodes) current replicas."""
    details = monitor(NATS_HOSTS[0], "/jsz?streams=true&config=true")
    streams = [s for account in details["account_details"] for s in account.get("stream_detail", [])]
    stream = next(s for s in streams if s["name"] == "AMOSKYS")
    assert stream["config"]["num_replicas"] == min(3, len(NATS_HOSTS))
    cluster = stream["cluster"]
    replicas = cluster.get("replicas", [])
    assert cluster.get("leader"), cluster
    assert len(replicas) == min(3, len(NATS_HOSTS)) - 1, cluster
    assert all(replica["current"] for replica in replicas), cluster


def nats_connect(name: str, cert: str, key: str, node: str) -> str:
    url = f"tls://{address(node)}:{NATS_PORT}"
    command = " ".join(map(shlex.quote, [VENV_PYTHON, "-c", NATS_CONNECT, url, cert, key]))
    return str(machine(name).check_output(command)).strip()


@pytest.mark.parametrize("node", NATS_HOSTS)
def test_nats_admits_the_hubs_and_the_indexer(node: str) -> None:
    clients = [(hub, "hub-nats") for hub in HUBS] + [(indexer, "indexer") for indexer in INDEXER_HOSTS]
    for name, identity in clients:
        tls = f"/etc/amoskys/tls/{identity}"
        assert nats_connect(name, f"{tls}.crt", f"{tls}.key", node) == "connected", f"{identity} on {name}"


@pytest.mark.parametrize("node", NATS_HOSTS)
def test_nats_refuses_an_agent_certificate_of_the_same_ca(node: str) -> None:
    agent_id = f"{AGENT_HOSTS[0]}-proc"
    tls = f"/etc/amoskys/tls/{agent_id}"
    assert nats_connect(AGENT_HOSTS[0], f"{tls}.crt", f"{tls}.key", node) != "connected"


def index_duplicates() -> int:
    """Events stored more than once in the index (by the agents' own event ids)."""
    query = "SELECT COUNT(*) - COUNT(DISTINCT event_id) FROM events"
    index = f"file:{INDEX}?mode=ro"
    script = f"import sqlite3; print(sqlite3.connect({index!r}, uri=True).execute({query!r}).fetchone()[0])"
    return int(machine(HUB).check_output(f"python3 -c {shlex.quote(script)}"))


def metric_sum(name: str, port: int, metric: str) -> float:
    status, body = http_get(HUB, f"http://{address(name)}:{port}/metrics")
    assert status == 200, body
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines() if line.startswith(metric))


def start_marked_process(name: str) -> tuple[str, str]:
    """A `sleep 1xxxxxx.yyy` (a unique argv) on an agent host: (marker, pid)."""
    marker = f"{secrets.randbelow(10**6) + 10**6}.{secrets.randbelow(10**6)}"
    pid = machine(name).check_output(f"setsid sleep {marker} </dev/null >/dev/null 2>&1 & echo $!").strip()
    return marker, pid


def test_kill_9_of_a_nats_node_loses_and_duplicates_nothing() -> None:
    """Processes started on every agent host while one NATS node is killed (and again as it comes back) are each
    found in the index exactly once; no chain break on any hub, no chain gap in the stream."""
    victim = next(node for node in NATS_HOSTS if node != HUB)
    started = []
    pid = main_pid(victim, NATS)
    for _ in range(3):
        started += [(name, *start_marked_process(name)) for name in PROC_HOSTS]
    machine(victim).check_output(f"kill -9 {pid}")
    for _ in range(10):  # while it is down and restarting (RestartSec=2) and catching up
        started += [(name, *start_marked_process(name)) for name in PROC_HOSTS]
        time.sleep(0.5)
    wait_until(lambda: unit_property(victim, NATS, "ActiveState") == "active", timeout=60, what=f"{NATS} on {victim}")
    try:
        for name, marker, _ in started:
            events = wait_until(
                lambda name=name, marker=marker: hub_query("--since", "10m", "--host", name, "--agent", "proc",
                                                           "--text", marker),
                timeout=120,
                interval=2,
                what=f"process 'sleep {marker}' of {name} in the index",
            )  # fmt: skip
            ids = [event["event"]["event_id"] for event in events]
            assert len(ids) == len(set(ids)), f"{marker}: stored twice: {events}"
    finally:
        for name, _, pid_ in started:
            machine(name).run(f"kill {int(pid_)}")
    assert index_duplicates() == 0
    for indexer in INDEXER_HOSTS:
        assert metric_sum(indexer, INDEXER_METRICS_PORT, "amoskys_indexer_chain_gaps_total") == 0
    for hub in HUBS:
        assert metric_sum(hub, HUB_METRICS_PORT, "amoskys_bus_chain_breaks_total") == 0, hub
