"""Every unit the inventory places on a machine runs there, as the service user, hardened, on its ports."""

from __future__ import annotations

import os
import re
import shlex
import stat

import pytest
from fleet import (
    AGENT_METRICS_PORT,
    ALL_HOSTS,
    EVENTBUS,
    HOST_UNITS,
    HUB,
    HUB_METRICS_PORT,
    HUB_PORT,
    INDEXER,
    INDEXER_METRICS_PORT,
    NATS,
    NATS_EXPORTER,
    NATS_EXPORTER_METRICS_PORT,
    NATS_MONITOR_PORT,
    NATS_PORT,
    NATS_ROUTE_PORT,
    UI,
    UI_PORT,
    address,
    effective_config,
    exposure_limit,
    host_vars,
    http_get,
    ids,
    listeners,
    machine,
    main_pid,
    private_keys,
    service_user,
    unit_kind,
    unit_property,
    units_on,
)

ANY_ADDRESS = "0.0.0.0"  # noqa: S104 (a value read from configs, never bound here)
EXPOSURE_LINE = re.compile(r"Overall exposure level for \S+: (\d+\.\d+)")


@pytest.mark.parametrize("name", ALL_HOSTS)
def test_systemd_is_pid1_and_nothing_failed(name: str) -> None:
    host = machine(name)
    assert host.check_output("cat /proc/1/comm") == "systemd"
    state = host.run("systemctl is-system-running").stdout.strip()
    failed = host.run("systemctl --failed --no-legend --plain").stdout
    assert state == "running", f"{name}: {state}; failed units: {failed}"


@pytest.mark.parametrize(("name", "unit"), HOST_UNITS, ids=ids(HOST_UNITS))
def test_unit_active_enabled_as_service_user(name: str, unit: str) -> None:
    host = machine(name)
    assert host.run(f"systemctl is-active {unit}").stdout.strip() == "active"
    assert host.run(f"systemctl is-enabled {unit}").stdout.strip() == "enabled"
    user = service_user(unit)
    assert unit_property(name, unit, "User") == user
    pid = main_pid(name, unit)
    assert pid > 0
    assert host.check_output(f"ps -o user= -p {pid}").strip() == user
    # every process of the unit, not only the main one
    cgroup = unit_property(name, unit, "ControlGroup")
    procs = host.check_output("cat " + shlex.quote(f"/sys/fs/cgroup/systemd{cgroup}/cgroup.procs")).split()
    assert str(pid) in procs
    owners = host.check_output(f"ps -o user= -p {','.join(procs)}")
    assert set(owners.split()) == {user}


@pytest.mark.parametrize(("name", "unit"), HOST_UNITS, ids=ids(HOST_UNITS))
def test_exposure_within_threshold(name: str, unit: str) -> None:
    out = machine(name).check_output(f"systemd-analyze security --no-pager {unit}")
    match = EXPOSURE_LINE.search(out)
    assert match, out[-500:]
    exposure = float(match.group(1))
    print(f"{name} {unit}: exposure {exposure}")
    assert exposure <= exposure_limit(unit), f"{unit}: {exposure} > {exposure_limit(unit)}"


PROC_UNITS = [(name, unit) for name, unit in HOST_UNITS if unit_kind(unit) == "proc"]


@pytest.mark.parametrize(("name", "unit"), PROC_UNITS, ids=ids(PROC_UNITS))
def test_proc_keeps_real_time_priority_only_for_its_reader(name: str, unit: str) -> None:
    """With the role's real-time drop-in (amoskys_agents_proc_realtime, where systemd started a real-time service
    first) systemd starts proc at SCHED_FIFO, and under its syscall filter and RestrictRealtime=yes the agent gave
    it up for every thread but the idle one that starts the event reader (which runs at SCHED_FIFO where the
    kernel's process events are heard: not in these machines' own network namespaces, where proc polls).
    Without it (the cluster scenario) nothing of proc is real-time, and the agent runs all the same."""
    realtime = bool(host_vars(name).get("amoskys_agents_proc_realtime", True))
    fifo_threads = 1 if realtime else 0
    host = machine(name)
    assert unit_property(name, unit, "CPUSchedulingPolicy") == ("1" if realtime else "0")  # SCHED_FIFO, _OTHER
    pid = main_pid(name, unit)
    threads = host.check_output(f"ps -L -o cls= -p {pid}").split()  # TS: a normal task; FF: SCHED_FIFO
    assert sorted(threads) == ["FF"] * fifo_threads + ["TS"] * (len(threads) - fifo_threads), threads
    readers = host.run(f"ps -o cls= --ppid {pid}").stdout.split()
    assert set(readers) <= ({"FF"} if realtime else {"TS"}), readers


def _expected_ports(name: str, unit: str) -> dict[str, str]:
    """{role: "address:port"} the unit must hold, from its effective configuration (NATS: the role's defaults)."""
    if unit == NATS:
        return {
            "client": f"{ANY_ADDRESS}:{NATS_PORT}",
            "route": f"{ANY_ADDRESS}:{NATS_ROUTE_PORT}",
            "monitor": f"127.0.0.1:{NATS_MONITOR_PORT}",
        }
    config = effective_config(name, unit)
    if unit == EVENTBUS:
        return {"grpc": config["listen"], "metrics": config["metrics"]["listen"]}
    if unit == UI:
        return {"http": config["listen"]}
    return {"metrics": config["metrics"]["listen"]}


@pytest.mark.parametrize(("name", "unit"), HOST_UNITS, ids=ids(HOST_UNITS))
def test_listening_ports(name: str, unit: str) -> None:
    ports = _expected_ports(name, unit)
    kind = unit_kind(unit)
    if unit == EVENTBUS:
        assert ports["grpc"].endswith(f":{HUB_PORT}")
        assert ports["metrics"].endswith(f":{HUB_METRICS_PORT}")
    elif unit == UI:
        assert ports["http"] == f"127.0.0.1:{UI_PORT}", "the UI listens on loopback only by default"
    elif unit == INDEXER:
        assert ports["metrics"].endswith(f":{INDEXER_METRICS_PORT}"), ports
    elif unit == NATS_EXPORTER:
        assert ports["metrics"].endswith(f":{NATS_EXPORTER_METRICS_PORT}"), ports
    elif unit != NATS:
        assert ports["metrics"].endswith(f":{AGENT_METRICS_PORT[kind]}"), ports
    pid = main_pid(name, unit)
    held = {(addr, port) for addr, port, pids in listeners(name) if pid in pids}
    for role, listen in ports.items():
        addr, _, port = listen.rpartition(":")
        wanted = {"*", ANY_ADDRESS} if addr == ANY_ADDRESS else {addr}  # gRPC binds [::] (ss: *), NATS 0.0.0.0
        assert {(a, int(port)) for a in wanted} & held, (
            f"{unit} {role} {listen}: not held by its main process {pid}: {held}"
        )


# The UI serves no metrics; NATS's monitoring endpoint (loopback, JSON) is not Prometheus's format: its exporter's is.
METRICS_UNITS = [(name, unit) for name, unit in HOST_UNITS if unit not in (UI, NATS)]


@pytest.mark.parametrize(("name", "unit"), METRICS_UNITS, ids=ids(METRICS_UNITS))
def test_metrics_endpoint_answers(name: str, unit: str) -> None:
    """Asked from the hub, where Prometheus scrapes (the units admit only the hub and configured scrapers)."""
    listen = _expected_ports(name, unit)["metrics"]
    listen = listen.replace(ANY_ADDRESS, address(name))
    status, body = http_get(HUB, f"http://{listen}/metrics")
    assert status == 200, body
    prefixes = {EVENTBUS: "amoskys_bus_", INDEXER: "amoskys_indexer_", NATS_EXPORTER: "amoskys_nats_up 1"}
    prefix = prefixes.get(unit, "amoskys_agent_")
    assert prefix in body


@pytest.mark.parametrize(("name", "unit"), HOST_UNITS, ids=ids(HOST_UNITS))
def test_private_keys_0600_owned_by_service_user(name: str, unit: str) -> None:
    host = machine(name)
    for path in private_keys(name, unit):
        key = host.file(path)
        assert key.exists, path
        assert key.mode == 0o600, f"{path}: {oct(key.mode)}"
        assert (key.user, key.group) == (service_user(unit),) * 2, f"{path}: owner {key.user}:{key.group}"


@pytest.mark.parametrize("name", ALL_HOSTS)
def test_every_private_key_is_0600_and_no_ca_key_on_hosts(name: str) -> None:
    host = machine(name)
    found = host.check_output("find /etc/amoskys -type f \\( -name '*.key' -o -name '*signing*' \\) ! -name '*.pub'")
    for path in found.split():
        key = host.file(path)
        assert key.mode == 0o600, f"{path}: {oct(key.mode)}"
        assert key.user in {service_user(unit) for unit in units_on(name)} | {"root"}, f"{path}: owner {key.user}"
    assert host.check_output("find / -xdev -name ca.key -not -path '/proc/*' 2>/dev/null || true") == ""


def test_ca_key_only_on_controller() -> None:
    ca_dir = host_vars(ALL_HOSTS[0])["amoskys_pki_ca_dir"]
    ca_key = os.path.join(ca_dir, "ca.key")
    assert stat.S_IMODE(os.stat(ca_key).st_mode) == 0o600


def open_files_limit(name: str, pid: int) -> list[int]:
    """[soft, hard] 'Max open files' of a process in the machine."""
    limits = machine(name).check_output(f"cat /proc/{pid}/limits")
    line = next(line for line in limits.splitlines() if line.startswith("Max open files"))
    return [int(value) for value in line.split()[3:5]]


@pytest.mark.parametrize("name", [HUB])
def test_hub_descriptor_limit(name: str) -> None:
    """LimitNOFILE=65536 reached the running hub, or as much of it as the machine's systemd may grant."""
    assert unit_property(name, EVENTBUS, "LimitNOFILE") == "65536"
    ceiling = open_files_limit(name, 1)[1]  # PID 1 cannot raise its own hard limit without CAP_SYS_RESOURCE
    print(f"{name}: PID 1 may grant up to {ceiling} descriptors")
    assert open_files_limit(name, main_pid(name, EVENTBUS)) == [min(65536, ceiling)] * 2
