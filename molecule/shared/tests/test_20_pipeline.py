"""End to end: what happens on an agent host is found on the hub, and Prometheus scrapes everything."""

from __future__ import annotations

import json
import shlex
import socket
from collections import Counter

import pytest
from fleet import (
    AGENT_EVENT_KIND,
    AGENT_HOSTS,
    AGENT_METRICS_PORT,
    AUTH_HOSTS,
    HOST_AGENTS,
    HUB,
    HUB_METRICS_PORT,
    HUBS,
    INDEXER_HOSTS,
    INDEXER_METRICS_PORT,
    NATS_EXPORTER_METRICS_PORT,
    NATS_HOSTS,
    PROC_HOSTS,
    address,
    agents_on,
    every_agent_up,
    failed_ssh_login_reaches_hub,
    http_get,
    hub_query,
    ids,
    listeners,
    machine,
    new_process_reaches_hub,
    tcp_exchange,
    wait_until,
)

PROMETHEUS = "http://127.0.0.1:9090"
PROMETHEUS_PORT = 9090


@pytest.mark.parametrize("agent_host", AUTH_HOSTS)
def test_failed_ssh_login_on_agent_host_found_on_hub(agent_host: str) -> None:
    failed_ssh_login_reaches_hub(agent_host)


@pytest.mark.parametrize("agent_host", PROC_HOSTS)
def test_new_process_on_agent_host_found_on_hub(agent_host: str) -> None:
    new_process_reaches_hub(agent_host)


def test_every_agent_registered_and_up() -> None:
    every_agent_up()


@pytest.mark.parametrize(("name", "kind"), HOST_AGENTS, ids=ids(HOST_AGENTS))
def test_agent_events_of_its_kind_stored(name: str, kind: str) -> None:
    """Each agent's own kind of event (process, host_metrics, device, snmp...) reached the hub's store."""
    agent_id = f"{name}-{kind}"
    event_kind = AGENT_EVENT_KIND[kind]
    if kind == "auth":  # an auth event needs something to happen: the failed login test provides it
        failed_ssh_login_reaches_hub(name)
    if kind == "flow":  # a flow needs traffic on the host's interface: a connection from the controller
        assert tcp_exchange(name).startswith(b"SSH-")
    events = wait_until(
        lambda: hub_query("--since", "30m", "--agent-id", agent_id, "--kind", event_kind, "--limit", "1"),
        timeout=120,
        interval=3,
        what=f"a {event_kind} event from {agent_id}",
    )
    assert events[0]["agent_id"] == agent_id


def prometheus(path: str) -> dict:
    status, body = http_get(HUB, PROMETHEUS + path)
    assert status == 200, body
    return json.loads(body)


def expected_scrape_ports() -> Counter[int]:
    """How many targets Prometheus should scrape per port: every hub's metrics, the indexer's, each NATS node's
    exporter, then each agent."""
    ports = Counter({HUB_METRICS_PORT: len(HUBS)})
    ports.update(INDEXER_METRICS_PORT for _ in INDEXER_HOSTS)
    ports.update(NATS_EXPORTER_METRICS_PORT for _ in NATS_HOSTS)
    for name in AGENT_HOSTS:
        ports.update(AGENT_METRICS_PORT[kind] for kind in agents_on(name))
    return ports


def test_prometheus_scrapes_every_target_from_file_sd() -> None:
    host = machine(HUB)
    assert host.service("prometheus").is_running
    assert host.service("prometheus").is_enabled
    expected = expected_scrape_ports()

    def all_up() -> list[dict] | None:
        targets = prometheus("/api/v1/targets?state=active")["data"]["activeTargets"]
        amoskys = [t for t in targets if t["discoveredLabels"].get("__meta_filepath")]  # from file_sd
        ports = Counter(int(t["scrapeUrl"].split("/")[2].rpartition(":")[2]) for t in amoskys)
        return amoskys if ports == expected and all(t["health"] == "up" for t in amoskys) else None

    targets = wait_until(all_up, timeout=90, interval=3, what=f"targets up per port {dict(expected)}")
    print("\n".join(f"{t['scrapeUrl']} {t['health']} {t['discoveredLabels']['__meta_filepath']}" for t in targets))
    stored = prometheus("/api/v1/query?query=amoskys_bus_events_stored_total")["data"]["result"]
    assert len(stored) == len(HUBS), stored  # one series per hub
    assert sum(float(series["value"][1]) for series in stored) > 0, stored


def test_promtool_checks_config_and_shipped_rules() -> None:
    host = machine(HUB)
    config = host.run("promtool check config /etc/prometheus/prometheus.yml")
    assert config.rc == 0, config.stdout + config.stderr
    rule_files = host.check_output("grep -rl amoskys /etc/prometheus --include='*.yml' --include='*.yaml' "
                                   "| xargs grep -l '^groups:' || true").split()  # fmt: skip
    assert rule_files, "no amoskys alert rules under /etc/prometheus"
    rules = host.run("promtool check rules " + " ".join(map(shlex.quote, rule_files)))
    assert rules.rc == 0, rules.stdout + rules.stderr
    print(rules.stdout)


def test_prometheus_listens_only_where_the_inventory_says() -> None:
    """amoskys_prometheus_listen (loopback by default): not on the hub's address, so no agent host reaches it."""
    listen = {(a, p) for a, p, _ in listeners(HUB) if p == PROMETHEUS_PORT}
    assert listen == {("127.0.0.1", PROMETHEUS_PORT)}, listen
    for name in AGENT_HOSTS:
        if name != HUB:
            status, body = http_get(name, f"http://{address(HUB)}:{PROMETHEUS_PORT}/-/ready", timeout=3)
            assert (status, "Connection refused" in body) == (0, True), f"from {name}: {status} {body}"
    try:
        socket.create_connection((address(HUB), PROMETHEUS_PORT), timeout=3).close()
    except ConnectionRefusedError:
        pass
    else:
        pytest.fail(f"the controller reached Prometheus on {address(HUB)}:{PROMETHEUS_PORT}")
