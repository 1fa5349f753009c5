"""systemd units: exposure per unit (systemd-analyze security --offline) within the thresholds."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from amoskys.catalog import AGENT_KINDS

SYSTEMD = Path(__file__).resolve().parents[2] / "systemd"
OPTIONAL = SYSTEMD / "optional"  # drop-ins the deployment adds only when configured
CEILING, SENSOR_CEILING = 2.0, 4.5  # the brief's: 4.5 for the network sensors (raw packets), 2.0 for the rest


def granted_raw_packets(kind: str) -> bool:
    """A network sensor: the kind's drop-ins grant CAP_NET_RAW (flow, scanner)."""
    return any("CAP_NET_RAW" in conf.read_text() for conf in SYSTEMD.glob(f"amoskys-agent@{kind}.service.d/*.conf"))


NETWORK_SENSORS = sorted(kind for kind in AGENT_KINDS if granted_raw_packets(kind))
# Every unit: the hub, the UI, the hub cluster's NATS node, its exporter and the indexer, and one per agent kind of
# the registry (a new kind is measured as it comes).
SERVICES = [
    "amoskys-eventbus.service", "amoskys-ui.service", "amoskys-nats.service", "amoskys-nats-exporter.service",
    "amoskys-indexer.service",
]  # fmt: skip
THRESHOLDS = dict.fromkeys(SERVICES, CEILING) | {
    f"amoskys-agent@{kind}.service": SENSOR_CEILING if kind in NETWORK_SENSORS else CEILING for kind in AGENT_KINDS
}

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")


def instantiate(unit: str, into: Path, *, optional: bool = False) -> Path:
    """A unit (or template instance) with its drop-ins, laid out as systemd would find them."""
    template = re.sub(r"@[^.]+\.service$", "@.service", unit)
    shutil.copy(SYSTEMD / template, into / unit)
    for source in (SYSTEMD, OPTIONAL) if optional else (SYSTEMD,):
        dropins = source / f"{unit}.d"
        if dropins.is_dir():
            shutil.copytree(dropins, into / f"{unit}.d", dirs_exist_ok=True)
    return into / unit


def exposure(unit: str, directory: Path) -> float:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", unit], cwd=directory, capture_output=True, text=True,
        check=False,
    )  # fmt: skip
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    return float(match.group(1))


@pytest.mark.parametrize(("unit", "ceiling"), sorted(THRESHOLDS.items()))
def test_exposure_within_threshold(unit: str, ceiling: float, tmp_path: Path) -> None:
    instantiate(unit, tmp_path)
    assert exposure(unit, tmp_path) <= ceiling


@pytest.mark.parametrize("unit", sorted(p.name.removesuffix(".d") for p in OPTIONAL.glob("*.service.d")))
def test_optional_dropins_stay_within_threshold(unit: str, tmp_path: Path) -> None:
    instantiate(unit, tmp_path, optional=True)
    assert exposure(unit, tmp_path) <= THRESHOLDS[unit]


def test_optional_dropin_grants_only_binding_privileged_ports() -> None:
    """The snmp trap drop-in adds exactly CAP_NET_BIND_SERVICE."""
    text = (OPTIONAL / "amoskys-agent@snmp.service.d" / "20-trap-port-below-1024.conf").read_text()
    granted = re.findall(r"^(?:CapabilityBoundingSet|AmbientCapabilities)=(.*)$", text, re.M)
    assert granted == ["CAP_NET_BIND_SERVICE", "CAP_NET_BIND_SERVICE"]


def test_network_sensors_get_raw_packets_and_nothing_else() -> None:
    assert NETWORK_SENSORS == ["flow", "scanner"]  # the brief's: only these may capture
    for kind in NETWORK_SENSORS:
        text = "".join(p.read_text() for p in (SYSTEMD / f"amoskys-agent@{kind}.service.d").glob("*.conf"))
        assert re.findall(r"^AmbientCapabilities=(.*)$", text, re.M) == ["CAP_NET_RAW"], kind
        assert re.findall(r"^CapabilityBoundingSet=(.*)$", text, re.M) == ["CAP_NET_RAW"], kind
        assert "AF_PACKET" in text, kind


def test_every_unit_is_measured() -> None:
    units = {p.name for p in SYSTEMD.glob("*.service")}
    dropins = {p.name.removesuffix(".d") for p in SYSTEMD.glob("*.service.d")}
    assert units - {"amoskys-agent@.service"} <= set(THRESHOLDS)
    assert dropins <= set(THRESHOLDS)


def test_hub_descriptors_fit_10000_agents() -> None:
    """One descriptor per agent stream and per connection in its handshake: room for 10,000 of each."""
    text = (SYSTEMD / "amoskys-eventbus.service").read_text()
    limits = re.findall(r"^LimitNOFILE=(\d+)(?::(\d+))?$", text, re.M)
    assert len(limits) == 1, limits
    soft, hard = int(limits[0][0]), int(limits[0][1] or limits[0][0])
    assert soft >= 2 * 10_000
    assert hard >= soft


def test_ptrace_capability_cannot_read_other_processes_memory() -> None:
    """Units granted CAP_SYS_PTRACE (to read /proc) must not reach another process's memory through a syscall."""
    for dropins in SYSTEMD.glob("*.service.d"):
        text = "".join(p.read_text() for p in dropins.glob("*.conf"))
        if "CAP_SYS_PTRACE" in text:
            denied = set(" ".join(re.findall(r"^SystemCallFilter=~(.*)$", text, re.M)).split())
            assert {"process_vm_readv", "process_vm_writev"} <= denied, dropins.name


def test_nats_exporter_unit_has_its_own_user_no_capabilities_and_loopback_only() -> None:
    """The drop-in (amoskys_nats role) adds the hubs and scrapers; the unit itself reaches only loopback."""
    text = (SYSTEMD / "amoskys-nats-exporter.service").read_text()
    settings = re.findall(r"^(\w+)=(.*)$", text, re.M)
    assert ("User", "amoskys-nats-exporter") in settings
    assert ("CapabilityBoundingSet", "") in settings
    assert [value for key, value in settings if key.startswith("IPAddress")] == ["any", "localhost"]
    assert "ReadWritePaths" not in dict(settings)
