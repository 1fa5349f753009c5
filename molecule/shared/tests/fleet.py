"""What the scenario's inventory says runs where, and small helpers the verify tests share.

Every expectation comes from Molecule's inventory (groups amoskys_hub / amoskys_agents, in a hub cluster also
amoskys_nats / amoskys_indexer, the per-host amoskys_agents_enabled list), so one suite verifies every scenario.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import shlex
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import jinja2
import testinfra
import testinfra.utils.ansible_runner
import yaml

T = TypeVar("T")

INVENTORY = os.environ["MOLECULE_INVENTORY_FILE"]
RUNNER = testinfra.utils.ansible_runner.AnsibleRunner(INVENTORY)

AMOSKYS = "/opt/amoskys/venv/bin/amoskys"
# One user per service (systemd/*.service User=), each also in the shared group that reaches /etc/amoskys.
HUB_USER, UI_USER, AGENT_USER_PREFIX = "amoskys-hub", "amoskys-ui", "amoskys-agent-"
NATS_USER, NATS_EXPORTER_USER, INDEXER_USER = "amoskys-nats", "amoskys-nats-exporter", "amoskys-indexer"
SHARED_GROUP = "amoskys"
LEGACY_USER = "amoskys"  # the one user of earlier releases, retired by site.yml
SOURCE = Path(__file__).resolve().parents[3]  # the repository: its venv (`make`) is the build the roles deploy


def _registry() -> list[dict[str, Any]]:
    """The agent kinds as the roles read them: `amoskys agent --list --json` of the controller's build."""
    command = [str(SOURCE / ".venv" / "bin" / "amoskys"), "agent", "--list", "--json"]
    kinds: list[dict[str, Any]] = json.loads(subprocess.run(command, capture_output=True, check=True).stdout)
    return kinds


AGENT_KINDS = _registry()
KINDS = [kind["name"] for kind in AGENT_KINDS]
DEFAULT_AGENTS = [kind["name"] for kind in AGENT_KINDS if kind["default"]]  # amoskys_agents_enabled's default
AGENT_METRICS_PORT = {kind["name"]: kind["metrics_port"] for kind in AGENT_KINDS}
AGENT_EVENT_KIND = {kind["name"]: kind["main_body"] for kind in AGENT_KINDS}  # what each reports on its own
HUB_PORT, HUB_METRICS_PORT, UI_PORT = 50051, 9124, 8080
NATS_PORT, NATS_ROUTE_PORT, NATS_MONITOR_PORT, INDEXER_METRICS_PORT = 4222, 6222, 8222, 9127
NATS_EXPORTER_METRICS_PORT = (
    9128  # amoskys nats-exporter on every NATS node (amoskys_common_nats_exporter_metrics_port)
)
EVENTBUS, UI = "amoskys-eventbus.service", "amoskys-ui.service"
NATS, NATS_EXPORTER, INDEXER = "amoskys-nats.service", "amoskys-nats-exporter.service", "amoskys-indexer.service"
SERVICE_USERS = {
    EVENTBUS: HUB_USER, UI: UI_USER, NATS: NATS_USER, NATS_EXPORTER: NATS_EXPORTER_USER, INDEXER: INDEXER_USER,
}  # fmt: skip
# CAP_NET_RAW (the unit's drop-ins grant it): the issue allows these network sensors a higher exposure
NETWORK_SENSORS = {
    kind for kind in KINDS
    if any("CAP_NET_RAW" in conf.read_text() for conf in (SOURCE / "systemd").glob(f"amoskys-agent@{kind}.service.d/*"))
}  # fmt: skip
EXPOSURE_LIMIT_SENSOR, EXPOSURE_LIMIT = 4.5, 2.0


def agent_unit(kind: str) -> str:
    return f"amoskys-agent@{kind}.service"


def unit_kind(unit: str) -> str:
    """'amoskys-agent@flow.service' -> 'flow'; hub, UI, NATS, its exporter, indexer -> 'eventbus' / 'ui' / 'nats' /
    'nats-exporter' / 'indexer'."""
    name = unit.removesuffix(".service")
    return name.split("@", 1)[1] if "@" in name else name.removeprefix("amoskys-")


def service_user(unit: str) -> str:
    """The user (and group) the unit runs as: amoskys-hub, -ui, -nats, -nats-exporter, -indexer, amoskys-agent-KIND."""
    return SERVICE_USERS.get(unit) or AGENT_USER_PREFIX + unit_kind(unit)


def exposure_limit(unit: str) -> float:
    return EXPOSURE_LIMIT_SENSOR if unit_kind(unit) in NETWORK_SENSORS else EXPOSURE_LIMIT


def group(name: str) -> list[str]:
    return sorted(RUNNER.get_hosts(name))


HUBS = group("amoskys_hub")
NATS_HOSTS = group("amoskys_nats")  # a hub cluster: its NATS nodes (none for a single hub)
INDEXER_HOSTS = group("amoskys_indexer") if NATS_HOSTS else []
HUB = (INDEXER_HOSTS or HUBS)[0]  # the console: the hub queries are answered by, the UI, Prometheus, the operator
AGENT_HOSTS = group("amoskys_agents")
ALL_HOSTS = sorted(set(HUBS) | set(AGENT_HOSTS) | set(NATS_HOSTS))


@functools.cache
def host_vars(name: str) -> dict[str, Any]:
    return dict(RUNNER.get_variables(name))


def address(name: str) -> str:
    return str(host_vars(name)["ansible_host"])


def agents_on(name: str) -> list[str]:
    if name not in AGENT_HOSTS:
        return []
    enabled = host_vars(name).get("amoskys_agents_enabled", DEFAULT_AGENTS)
    if isinstance(enabled, str):  # a template over the registry, e.g. every kind: render it as Ansible would
        template = jinja2.Environment().from_string(enabled)  # noqa: S701 - YAML, not HTML
        enabled = template.render(amoskys_common_agent_kinds=AGENT_KINDS)
        enabled = yaml.safe_load(enabled)
    return list(enabled)


def units_on(name: str) -> list[str]:
    services = [
        *([NATS, NATS_EXPORTER] if name in NATS_HOSTS else []),
        *([INDEXER] if name in INDEXER_HOSTS else []),
        *([EVENTBUS] if name in HUBS else []),
        *([UI] if name == HUB else []),
    ]
    return services + [agent_unit(kind) for kind in agents_on(name)]


def agent_ids() -> list[str]:
    return [f"{name}-{kind}" for name in AGENT_HOSTS for kind in agents_on(name)]


HOST_UNITS = [(name, unit) for name in ALL_HOSTS for unit in units_on(name)]
HOST_AGENTS = [(name, kind) for name in AGENT_HOSTS for kind in agents_on(name)]


def ids(pairs: list[tuple[str, str]]) -> list[str]:
    return [f"{name}/{item}" for name, item in pairs]


@functools.cache
def machine(name: str) -> Any:
    """The testinfra host for an inventory host (ansible backend, SSH as root)."""
    return testinfra.get_host(f"ansible://{name}", ansible_inventory=INVENTORY)


class NotYet:
    """A probe's falsy answer that keeps what it saw: wait_until's timeout shows the last one."""

    def __init__(self, seen: object) -> None:
        self.seen = seen

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"not yet: {self.seen!r}"


def wait_until(probe: Callable[[], T | None], timeout: float, interval: float = 1.0, what: str = "") -> T:
    """The first truthy result of probe() within timeout seconds; AssertionError naming what and the last value."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what or probe}: last {result!r}")
        time.sleep(interval)


def unit_property(name: str, unit: str, prop: str) -> str:
    return str(machine(name).check_output(f"systemctl show -P {prop} {shlex.quote(unit)}")).strip()


def main_pid(name: str, unit: str) -> int:
    return int(unit_property(name, unit, "MainPID"))


def unit_config_path(unit: str) -> str:
    kind = unit_kind(unit)
    if unit == NATS:
        return "/etc/amoskys/nats.conf"
    own = (EVENTBUS, UI, INDEXER, NATS_EXPORTER)
    return f"/etc/amoskys/{kind}.yml" if unit in own else f"/etc/amoskys/agent-{kind}.yml"


NATS_KEY = "/etc/amoskys/tls/nats.key"  # the NATS node's server and route key (nats.conf)


def private_keys(name: str, unit: str) -> list[str]:
    """The unit's private keys: its TLS key, its NATS client key (hub cluster), an agent's signing key (the NATS
    exporter has none)."""
    if unit == NATS:
        return [NATS_KEY]
    config = effective_config(name, unit)
    keys = [config["tls"]["key"]] if "tls" in config else []
    if unit == INDEXER or config.get("store", {}).get("backend") == "jetstream":
        keys.append(config["nats"]["key"])
    if "signing_key" in config:
        keys.append(config["signing_key"])
    return keys


@functools.cache
def effective_config(name: str, unit: str) -> dict[str, Any]:
    """The unit's configuration as the program sees it (`amoskys config check`, defaults filled in)."""
    component = {EVENTBUS: "eventbus", UI: "ui", INDEXER: "indexer", NATS_EXPORTER: "nats-exporter"}.get(unit, "agent")
    out = machine(name).check_output(f"{AMOSKYS} config check --component {component} {unit_config_path(unit)}")
    return dict(yaml.safe_load(out))


def http_get(name: str, url: str, timeout: float = 5.0) -> tuple[int, str]:
    """GET url from inside the machine (python3 urllib): (status, body); status 0 when unreachable."""
    script = (
        "import sys, urllib.request\n"
        "try:\n"
        f"    r = urllib.request.urlopen({url!r}, timeout={timeout})\n"
        "    sys.stdout.write(str(r.status) + '\\n' + r.read().decode())\n"
        "except Exception as e:\n"
        "    sys.stdout.write('0\\n' + repr(e))\n"
    )
    out = machine(name).check_output(f"python3 -c {shlex.quote(script)}")
    status, _, body = out.partition("\n")
    return int(status), body


def hub_query(*args: str) -> list[dict[str, Any]]:
    """`amoskys query --json ARGS` on the hub with its defaults (operator certificate, localhost:50051)."""
    cmd = " ".join([AMOSKYS, "query", "--json", *map(shlex.quote, args)])
    result = machine(HUB).run(cmd)
    assert result.rc == 0, f"{cmd}: {result.stderr}"
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def hub_status() -> dict[str, Any]:
    return dict(json.loads(machine(HUB).check_output(f"{AMOSKYS} status --json")))


def listeners(name: str) -> list[tuple[str, int, set[int]]]:
    """TCP and UDP listening sockets: (address, port, pids holding it), from `ss -Hlntup`."""
    sockets = []
    for line in machine(name).check_output("ss -Hlntup").splitlines():
        fields = line.split()
        local, procs = fields[4], " ".join(fields[6:])
        addr, _, port = local.rpartition(":")
        pids = {int(p.split("=")[1]) for p in procs.replace(")", ",").split(",") if p.startswith("pid=")}
        sockets.append((addr.strip("[]").split("%")[0], int(port), pids))
    return sockets


AUTH_HOSTS = [name for name in AGENT_HOSTS if "auth" in agents_on(name)]
PROC_HOSTS = [name for name in AGENT_HOSTS if "proc" in agents_on(name)]


def failed_ssh_login_reaches_hub(agent_host: str) -> None:
    """From the hub, try to log in to agent_host as a user that does not exist; find that on the hub."""
    user = f"amxprobe{secrets.token_hex(4)}"
    ssh = (
        "ssh -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o ConnectTimeout=5 "
        f"{user}@{address(agent_host)} true; echo rc=$?"  # testinfra takes ssh's own exit code 255 for its own
    )
    out = machine(HUB).check_output(ssh)
    assert out.endswith("rc=255"), f"a login as a user that does not exist: {out}"
    events = wait_until(
        lambda: hub_query("--since", "10m", "--host", agent_host, "--agent", "auth", "--text", user),
        timeout=60,
        what=f"auth event for {user} from {agent_host}",
    )
    assert events[0]["event"]["auth"]["user"] == user, events[0]


def new_process_reaches_hub(agent_host: str) -> None:
    """Start a uniquely-named process on agent_host; find its start on the hub."""
    marker = f"{secrets.randbelow(10**6) + 10**6}.{secrets.randbelow(10**6)}"  # sleep 1xxxxxx.yyy: unique argv
    host = machine(agent_host)
    pid = host.check_output(f"setsid sleep {marker} </dev/null >/dev/null 2>&1 & echo $!").strip()
    try:
        events = wait_until(
            lambda: hub_query("--since", "10m", "--host", agent_host, "--agent", "proc", "--text", marker),
            timeout=60,
            what=f"process event for 'sleep {marker}' on {agent_host}",
        )
        assert marker in events[0]["event"]["process"]["cmdline"], events[0]
    finally:
        host.run(f"kill {int(pid)}")


def every_agent_up() -> dict[str, str]:
    """Wait until `amoskys status` on the hub lists every agent of the inventory as up."""

    def all_up() -> dict[str, str] | None:
        states = {a["agent_id"]: a["liveness"] for a in hub_status()["agents"]}
        return states if all(states.get(agent_id) == "up" for agent_id in agent_ids()) else None

    return wait_until(all_up, timeout=60, what=f"{agent_ids()} up in `amoskys status`")


def tcp_exchange(name: str, port: int = 22) -> bytes:
    """Open a TCP connection from the controller to the machine's address and read its greeting (traffic on host0)."""
    with socket.create_connection((address(name), port), timeout=5) as conn:
        return conn.recv(64)
