"""A hub cluster (scenario `cluster`): NATS nodes routed over mTLS, the stream replicated, only the hubs and the
indexer admitted, and events of every agent host indexed exactly once while a NATS node is killed."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import subprocess
import time
from collections.abc import Iterator

import pytest
from fleet import (
    AGENT_HOSTS,
    AMOSKYS,
    EVENTBUS,
    HUB,
    HUB_METRICS_PORT,
    HUB_PORT,
    HUBS,
    INDEXER,
    INDEXER_HOSTS,
    INDEXER_METRICS_PORT,
    NATS,
    NATS_EXPORTER_METRICS_PORT,
    NATS_HOSTS,
    NATS_MONITOR_PORT,
    NATS_PORT,
    NATS_ROUTE_PORT,
    PROC_HOSTS,
    NotYet,
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
PARTITION_S = float(os.environ.get("AMOSKYS_PARTITION_S", "120"))
PARTITION_TABLE = "amx_molecule_partition"
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


@pytest.mark.parametrize("name", NATS_HOSTS)
def test_nats_exporter_scraped_from_prometheus_host(name: str) -> None:
    """Each node's exporter, asked from the Prometheus host as Prometheus does: up, routed to every other, healthy."""

    def node_state() -> list[float] | None:
        page = scrape(name, NATS_EXPORTER_METRICS_PORT)
        state = [metric_sum(page, f"amoskys_nats_{m} ") for m in ("up", "routes", "healthy")]
        return state if state == [1, len(NATS_HOSTS) - 1, 1] else None

    wait_until(
        node_state, timeout=60, interval=2, what=f"{name}'s exporter: up 1, {len(NATS_HOSTS) - 1} routes, healthy 1"
    )


def stream_view(node: str) -> dict:
    """The hubs' stream as the NATS node `node` reports it (config and cluster)."""
    details = monitor(node, "/jsz?streams=true&config=true")
    streams = [s for account in details["account_details"] for s in account.get("stream_detail", [])]
    return next(s for s in streams if s["name"] == "AMOSKYS")


def replicas_seen_by_the_leader() -> dict | NotYet:
    """The stream's cluster as its leader reports it, once every replica is current there; else NotYet with
    the view that was not (a timeout shows it).

    Only the leader hears from every replica: a follower's view of another follower goes stale after ~10 s.
    """
    first = stream_view(NATS_HOSTS[0])
    leader = first["cluster"].get("leader")
    if leader not in NATS_HOSTS:
        return NotYet({NATS_HOSTS[0]: first["cluster"]})
    cluster = (first if leader == NATS_HOSTS[0] else stream_view(leader))["cluster"]
    replicas = cluster.get("replicas", [])
    expected = {node for node in NATS_HOSTS if node != leader}
    if cluster.get("leader") != leader or {replica["name"] for replica in replicas} != expected:
        return NotYet({leader: cluster})
    return dict(cluster) if all(replica["current"] for replica in replicas) else NotYet({leader: cluster})


def test_stream_replicated_on_every_node() -> None:
    """The hubs' stream (created by the indexer or the first hub) has min(3, nodes) replicas, all current (within
    a minute: the recovery tests before this one have just killed and restarted every NATS node)."""
    assert stream_view(NATS_HOSTS[0])["config"]["num_replicas"] == min(3, len(NATS_HOSTS))
    wait_until(replicas_seen_by_the_leader, timeout=60, interval=2, what="every replica current at the leader")


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


def scrape(name: str, port: int) -> str:
    """The metrics page at `name`:`port`, asked from the Prometheus host."""
    status, body = http_get(HUB, f"http://{address(name)}:{port}/metrics")
    assert status == 200, body
    return body


def metric_sum(page: str, metric: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in page.splitlines() if line.startswith(metric))


def start_marked_process(name: str) -> tuple[str, str]:
    """A `sleep 1xxxxxx.yyy` (a unique argv) on an agent host: (marker, pid)."""
    marker = f"{secrets.randbelow(10**6) + 10**6}.{secrets.randbelow(10**6)}"
    pid = machine(name).check_output(f"setsid sleep {marker} </dev/null >/dev/null 2>&1 & echo $!").strip()
    return marker, pid


def start_marks(rounds: int, pause_s: float = 0.0) -> list[tuple[str, str, str]]:
    """`rounds` marked processes on every proc host, `pause_s` apart: (host, marker, pid) each."""
    started = []
    for _ in range(rounds):
        started += [(name, *start_marked_process(name)) for name in PROC_HOSTS]
        time.sleep(pause_s)
    return started


def assert_each_indexed_once(started: list[tuple[str, str, str]], timeout: float = 120) -> None:
    """Every marked process is in the index exactly once (the sleeps are ended either way); no duplicate in the
    index, no chain gap at any indexer, no chain break at any hub."""
    try:
        for name, marker, _ in started:
            events = wait_until(
                lambda name=name, marker=marker: hub_query("--since", "15m", "--host", name, "--agent", "proc",
                                                           "--text", marker),
                timeout=timeout,
                interval=2,
                what=f"process 'sleep {marker}' of {name} in the index",
            )  # fmt: skip
            ids = [event["event"]["event_id"] for event in events]
            assert len(ids) == len(set(ids)), f"{marker}: stored twice: {events}"
    finally:
        for name, _, pid in started:
            machine(name).run(f"kill {int(pid)}")
    assert index_duplicates() == 0
    for indexer in INDEXER_HOSTS:
        assert metric_sum(scrape(indexer, INDEXER_METRICS_PORT), "amoskys_indexer_chain_gaps_total") == 0
    for hub in HUBS:
        assert metric_sum(scrape(hub, HUB_METRICS_PORT), "amoskys_bus_chain_breaks_total") == 0, hub


def agent_streams(hub: str) -> int:
    """Agents' connections established to the hub on `hub` (its gRPC port, from the agent hosts)."""
    agents = {address(name) for name in AGENT_HOSTS}
    lines = machine(hub).check_output(f"ss -Htn state established '( sport = :{HUB_PORT} )'").splitlines()
    peers = [line.split()[-1].rpartition(":")[0].strip("[]").removeprefix("::ffff:") for line in lines]
    return sum(peer in agents for peer in peers)


def test_kill_9_of_a_nats_node_a_hub_and_the_indexer_loses_and_duplicates_nothing() -> None:
    """Processes started on every agent host while a NATS node, the hub most agents use and the indexer are
    killed one after the other (and as they come back) are each found in the index exactly once."""
    hub_victim = max((hub for hub in HUBS if hub != HUB), key=agent_streams)  # the console's hub answers queries
    nats_victim = next(node for node in reversed(NATS_HOSTS) if node not in (HUB, hub_victim))
    victims = [(nats_victim, NATS), (hub_victim, EVENTBUS), *[(indexer, INDEXER) for indexer in INDEXER_HOSTS]]
    started = start_marks(3)
    for name, unit in victims:
        machine(name).check_output(f"kill -9 {main_pid(name, unit)}")
        started += start_marks(4, pause_s=0.5)  # while it is down, restarting (RestartSec=2) and catching up
    for name, unit in victims:
        wait_until(lambda name=name, unit=unit: unit_property(name, unit, "ActiveState") == "active", timeout=60,
                   what=f"{unit} on {name}")  # fmt: skip
    assert_each_indexed_once(started)


@contextlib.contextmanager
def partitioned(victim: str) -> Iterator[None]:
    """The machine `victim` cut off from every other machine of the scenario (nft drop rules on the host's
    bridge, both ways, IPv4); removed on exit. The controller still reaches it (that is not bridged traffic)."""
    ruleset = f"""table bridge {PARTITION_TABLE} {{
  chain forward {{
    type filter hook forward priority -200; policy accept;
    ip saddr {address(victim)} drop
    ip daddr {address(victim)} drop
  }}
}}
"""
    subprocess.run(["nft", "-f", "-"], input=ruleset, text=True, check=True)
    try:
        yield
    finally:
        subprocess.run(["nft", "delete", "table", "bridge", PARTITION_TABLE], check=True)


def reaches(name: str, target: str, port: int) -> bool:
    return machine(name).run(f"timeout 3 bash -c 'exec 3<>/dev/tcp/{address(target)}/{port}'").rc == 0


def test_a_node_partitioned_for_two_minutes_loses_and_duplicates_nothing() -> None:
    """A NATS + hub node cut off from the others for PARTITION_S (default 120) s while processes start on every
    agent host (its agents fail over): after the heal each is in the index exactly once and its replica is
    current again."""
    victim = NATS_HOSTS[-1] if NATS_HOSTS[-1] != HUB else NATS_HOSTS[0]
    started = start_marks(2)
    with partitioned(victim):
        assert not reaches(HUB, victim, NATS_ROUTE_PORT), f"{victim} still reachable"
        deadline = time.monotonic() + PARTITION_S
        while time.monotonic() < deadline:
            started += start_marks(1)
            time.sleep(10)
    assert reaches(HUB, victim, NATS_ROUTE_PORT), f"{victim} unreachable after the heal"
    assert_each_indexed_once(started)
    # A replica that missed two minutes catches up from the leader: over 90 s once on a loaded 2-core host (CI,
    # 2026-12-02, while the unit tests ran beside it).
    wait_until(replicas_seen_by_the_leader, timeout=180, interval=2, what=f"{victim}'s replica current again")
