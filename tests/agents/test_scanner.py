"""scanner: frames, inventory rules and config checks; then real sweeps of namespaces on a bridge.

The root tests build their own network (tests/netlab.py): devices are network namespaces with
MACs of ours on a bridge in its own namespace, the scanner sweeps from a veth in the root
namespace, and the end-to-end test publishes through a live hub.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from amoskys.agents.runtime.runner import AgentRuntime
from amoskys.agents.scanner.agent import (
    Inventory,
    ScannerAgent,
    Sweep,
    arp_request,
    icmp_echo,
    parse_arp_reply,
    sweep_addresses,
)
from amoskys.agents.scanner.config import ScannerAgentConfig
from amoskys.agents.scanner.oui import OuiRegistry
from amoskys.config import load_config
from amoskys.errors import ConfigError
from amoskys.v1 import bus_pb2, events_pb2
from tests.agents.conftest import agent_config
from tests.hubfixture import LiveHub
from tests.netlab import NetLab, free_subnets, net_lab

OUI_FILE = Path("/usr/share/ieee-data/oui.txt")
Action = events_pb2.DeviceEvent.Action
NET = ipaddress.IPv4Network("10.0.0.0/24")
LOCAL_MAC = ["02:00:00:00:00:0a", "02:00:00:00:00:0b", "02:00:00:00:00:0c"]
KNOWN_OUI_MAC = "00:22:72:00:00:01"  # IEEE MA-L 002272 (a real vendor prefix, on a private test link)


def registry_vendor(mac: str) -> str:
    """The vendor oui.txt lists for `mac`, read here independently of the code under test."""
    prefix = mac.replace(":", "").upper()[:6]
    match = re.search(rf"^{prefix}\s+\(base 16\)\s+(.+?)\s*$", OUI_FILE.read_text(), re.M)
    assert match, prefix
    return match.group(1)


# ---- frames ---------------------------------------------------------------------------------------

# An ARP reply as captured on the wire: 10.0.0.7 is at 00:22:72:00:00:01, answering 10.0.0.1.
REPLY = bytes.fromhex(
    "0200000000aa" "002272000001" "0806"
    "0001" "0800" "06" "04" "0002" "002272000001" "0a000007" "0200000000aa" "0a000001"
)  # fmt: skip


def test_arp_request_is_a_padded_broadcast_who_has() -> None:
    frame = arp_request(bytes.fromhex("0200000000aa"), int(NET[1]), int(NET[7]))
    assert len(frame) == 60 and frame[42:] == bytes(18)
    assert frame[:14] == bytes.fromhex("ffffffffffff0200000000aa0806")
    assert frame[14:42] == bytes.fromhex(
        "0001" "0800" "06" "04" "0001" "0200000000aa" "0a000001" "000000000000" "0a000007"
    )  # fmt: skip


def test_arp_reply_parsed_and_other_frames_ignored() -> None:
    assert parse_arp_reply(REPLY) == ("00:22:72:00:00:01", int(NET[7]), int(NET[1]))
    request = arp_request(bytes.fromhex("0200000000aa"), int(NET[1]), int(NET[7]))
    assert parse_arp_reply(request) is None  # op 1
    assert parse_arp_reply(REPLY[:40]) is None  # truncated
    assert parse_arp_reply(REPLY[:12] + b"\x08\x00" + REPLY[14:]) is None  # IPv4, not ARP
    multicast_sender = REPLY[:22] + bytes.fromhex("010000000001") + REPLY[28:]
    assert parse_arp_reply(multicast_sender) is None


def test_icmp_echo_checksum_verifies() -> None:
    packet = icmp_echo(0xBEEF, 7)
    assert packet[0] == 8 and packet[4:8] == bytes.fromhex("beef0007")
    padded = packet + b"\0" * (len(packet) % 2)
    words = struct.unpack(f"!{len(padded) // 2}H", padded)
    total = sum(words)
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    assert total == 0xFFFF


@pytest.mark.parametrize(
    ("cidr", "first", "last", "count"),
    [
        ("10.0.0.0/24", "10.0.0.1", "10.0.0.254", 254),
        ("10.0.0.0/30", "10.0.0.1", "10.0.0.2", 2),
        ("10.0.0.4/31", "10.0.0.4", "10.0.0.5", 2),
        ("10.0.0.9/32", "10.0.0.9", "10.0.0.9", 1),
    ],
)
def test_sweep_skips_network_and_broadcast_below_31(cidr: str, first: str, last: str, count: int) -> None:
    addresses = sweep_addresses(ipaddress.IPv4Network(cidr))
    assert (addresses[0], addresses[-1], len(addresses)) == (
        int(ipaddress.IPv4Address(first)), int(ipaddress.IPv4Address(last)), count
    )  # fmt: skip


# ---- inventory rules --------------------------------------------------------------------------------


def sweep(answers: dict[int, list[str]] | None, interface: str = "eth0", network: str = "10.0.0.0/24") -> Sweep:
    found = None if answers is None else {str(NET[i]): macs for i, macs in answers.items()}
    return Sweep(interface, ipaddress.IPv4Network(network), found)


def actions(changes: list[Any]) -> list[tuple[str, str, list[str], str]]:
    return [(Action.Name(c.action), c.device.mac, c.device.sorted_addresses(), c.previous_mac) for c in changes]


def test_inventory_new_then_quiet_then_gone_after_n_sweeps() -> None:
    inventory = Inventory()
    changes, _ = inventory.update([sweep({7: ["02:00:00:00:00:07"], 8: ["02:00:00:00:00:08"]})], 1, 2)
    assert actions(changes) == [
        ("NEW", "02:00:00:00:00:07", ["10.0.0.7"], ""), ("NEW", "02:00:00:00:00:08", ["10.0.0.8"], "")
    ]  # fmt: skip
    assert inventory.update([sweep({7: ["02:00:00:00:00:07"], 8: ["02:00:00:00:00:08"]})], 2, 2) == ([], [])
    assert inventory.update([sweep({7: ["02:00:00:00:00:07"]})], 3, 2) == ([], [])  # one miss: not yet
    changes, _ = inventory.update([sweep({7: ["02:00:00:00:00:07"]})], 4, 2)
    assert actions(changes) == [("GONE", "02:00:00:00:00:08", ["10.0.0.8"], "")]
    assert changes[0].device.last_seen_ns == 2
    assert list(inventory.devices) == [("eth0", "02:00:00:00:00:07")]


def test_inventory_answer_resets_the_miss_count() -> None:
    inventory = Inventory()
    inventory.update([sweep({7: ["02:00:00:00:00:07"]})], 1, 2)
    for now in range(2, 6):  # silent, answers, silent, answers: never two misses in a row
        answers = {7: ["02:00:00:00:00:07"]} if now % 2 else {}
        assert inventory.update([sweep(answers)], now, 2) == ([], [])


def test_a_failed_sweep_counts_no_miss() -> None:
    inventory = Inventory()
    inventory.update([sweep({7: ["02:00:00:00:00:07"]})], 1, 1)
    assert inventory.update([sweep(None)], 2, 1) == ([], [])
    assert inventory.update([sweep({}, interface="eth1")], 3, 1) == ([], [])  # another interface
    changes, _ = inventory.update([sweep({})], 4, 1)
    assert actions(changes) == [("GONE", "02:00:00:00:00:07", ["10.0.0.7"], "")]


def test_address_moved_to_another_mac_is_a_change_with_the_previous_mac() -> None:
    inventory = Inventory()
    inventory.update([sweep({7: ["02:00:00:00:00:07"], 8: ["02:00:00:00:00:08"]})], 1, 3)
    changes, _ = inventory.update([sweep({7: ["02:00:00:00:00:08"], 8: ["02:00:00:00:00:08"]})], 2, 3)
    assert actions(changes) == [
        ("CHANGED", "02:00:00:00:00:08", ["10.0.0.7", "10.0.0.8"], "02:00:00:00:00:07"),
        ("CHANGED", "02:00:00:00:00:07", [], ""),
    ]
    assert [(a, h.mac) for a, h in changes[0].moved_in] == [("10.0.0.7", "02:00:00:00:00:07")]
    changes, _ = inventory.update([sweep({7: ["02:00:00:00:00:08"], 8: ["02:00:00:00:00:08"]})], 3, 3)
    assert changes == []  # reported once
    changes, _ = inventory.update([sweep({8: ["02:00:00:00:00:08"]})], 4, 3)
    assert actions(changes) == [("GONE", "02:00:00:00:00:07", [], "")]  # the old MAC, silent 3 sweeps
    assert inventory.update([sweep({8: ["02:00:00:00:00:08"]})], 5, 3) == ([], [])
    changes, _ = inventory.update([sweep({8: ["02:00:00:00:00:08"]})], 6, 3)
    assert actions(changes) == [("CHANGED", "02:00:00:00:00:08", ["10.0.0.8"], "")]  # .7 unanswered 3 sweeps


def test_a_new_mac_taking_a_known_address_is_a_change_not_new() -> None:
    inventory = Inventory()
    inventory.update([sweep({7: ["02:00:00:00:00:07"]})], 1, 3)
    changes, _ = inventory.update([sweep({7: ["02:00:00:00:00:99"]})], 2, 3)
    assert actions(changes) == [
        ("CHANGED", "02:00:00:00:00:99", ["10.0.0.7"], "02:00:00:00:00:07"),
        ("CHANGED", "02:00:00:00:00:07", [], ""),
    ]


def test_two_macs_answering_one_address_is_a_conflict_once() -> None:
    inventory = Inventory()
    inventory.update([sweep({7: ["02:00:00:00:00:07"]})], 1, 3)
    both = {7: ["02:00:00:00:00:66", "02:00:00:00:00:07"]}
    changes, conflicts = inventory.update([sweep(both)], 2, 3)
    assert changes == []  # the holder keeps the address; the other MAC is named in the alert
    assert [(c.address, c.macs) for c in conflicts] == [("10.0.0.7", ("02:00:00:00:00:07", "02:00:00:00:00:66"))]
    assert inventory.update([sweep(both)], 3, 3)[1] == []  # still going on: not raised again
    inventory.update([sweep({7: ["02:00:00:00:00:07"]})], 4, 3)
    assert len(inventory.update([sweep(both)], 5, 3)[1]) == 1  # it stopped, then came back


def test_icmp_answers_are_devices_by_address() -> None:
    inventory = Inventory()
    changes, _ = inventory.update([sweep({5: [""], 6: [""]}, network="10.0.0.0/28")], 1, 1)
    assert actions(changes) == [("NEW", "", ["10.0.0.5"], ""), ("NEW", "", ["10.0.0.6"], "")]
    changes, _ = inventory.update([sweep({5: [""]}, network="10.0.0.0/28")], 2, 1)
    assert actions(changes) == [("GONE", "", ["10.0.0.6"], "")]


def test_inventory_survives_encode_and_decode() -> None:
    inventory = Inventory()
    inventory.update([sweep({7: ["02:00:00:00:00:07"], 9: [""]})], 11, 3)
    inventory.update([sweep({9: [""]})], 12, 3)
    copy = Inventory.decode(inventory.encode())
    assert copy.devices == inventory.devices
    assert copy.devices[("eth0", "02:00:00:00:00:07")].missed == 1
    with pytest.raises(ValueError, match="version 9"):
        Inventory.decode(json.dumps({"version": 9, "devices": []}))
    with pytest.raises(msgspec.DecodeError):
        Inventory.decode('{"version": 1, "devices": [["eth0"]]}')


# ---- vendors -----------------------------------------------------------------------------------------


@pytest.mark.skipif(not OUI_FILE.exists(), reason="needs Debian's ieee-data")
def test_vendors_from_the_ieee_registry() -> None:
    registry = OuiRegistry(str(OUI_FILE))
    registry.check()
    found = registry.vendors([KNOWN_OUI_MAC, "fc:fb:fb:01:02:03", "02:00:00:00:00:01", "00:00:00:00:00:00"])
    assert found[KNOWN_OUI_MAC] == registry_vendor(KNOWN_OUI_MAC)
    assert found["fc:fb:fb:01:02:03"] == registry_vendor("fc:fb:fb:01:02:03")
    assert found["02:00:00:00:00:01"] == ""  # locally administered: no vendor owns it
    assert found["00:00:00:00:00:00"] == registry_vendor("00:00:00:00:00:00")


def test_vendor_registry_refused_when_missing_or_wrong_and_optional(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"scanner.oui_file: .*nothere.txt: cannot be read.*install ieee-data"):
        OuiRegistry(str(tmp_path / "nothere.txt")).check()
    (tmp_path / "bad.txt").write_text("this is not the registry\n")
    with pytest.raises(ConfigError, match=r"not an IEEE oui\.txt"):
        OuiRegistry(str(tmp_path / "bad.txt")).check()
    OuiRegistry("").check()
    assert OuiRegistry("").vendors([KNOWN_OUI_MAC]) == {KNOWN_OUI_MAC: ""}


def test_vendor_lookup_caches_and_reads_a_registry_with_crlf(tmp_path: Path) -> None:
    registry_file = tmp_path / "oui.txt"
    registry_file.write_bytes(b"AABBCC   (hex)\t\tNope\r\n00AA01     (base 16)\t\tExample \xc3\x9cnion\r\n")
    registry = OuiRegistry(str(registry_file))
    assert registry.vendors(["00:aa:01:00:00:01", "00:aa:02:00:00:01"]) == {
        "00:aa:01:00:00:01": "Example \u00dcnion", "00:aa:02:00:00:01": ""
    }  # fmt: skip
    registry_file.unlink()  # answered from the cache, unknown prefixes included
    assert registry.vendors(["00:aa:01:ff:ff:ff", "00:aa:02:00:00:02"])["00:aa:01:ff:ff:ff"] == "Example \u00dcnion"


# ---- config ------------------------------------------------------------------------------------------


def scanner_yaml(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "agent-scanner.yml"
    path.write_text("scanner:\n" + body)
    return path


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            "  targets: [{interface: eth0, cidr: 10.0.0.0/24}, {interface: eth1, cidr: 10.8.0.0/16}]\n",
            "key 'scanner.targets': target 1 (eth1 10.8.0.0/16) is larger than max_prefix /22 (65536 addresses); "
            "set allow_large: true to sweep it anyway",
        ),
        (
            "  max_prefix: 26\n  targets: [{interface: eth0, cidr: 10.0.0.0/24}]\n",
            "key 'scanner.targets': target 0 (eth0 10.0.0.0/24) is larger than max_prefix /26 (256 addresses)",
        ),
        ("  targets: [{interface: eth0, cidr: 10.0.0.7/24}]\n", "did you mean '10.0.0.0/24'?"),
        ("  targets: [{interface: eth0, cidr: 'fd00::/64'}]\n", "'fd00::/64' is IPv6; only IPv4"),
        ("  targets: [{interface: eth0, cidr: lan}]\n", "key 'scanner.targets[0].cidr': 'lan' is not an IPv4"),
        ("  targets: [{interface: eth0/1, cidr: 10.0.0.0/24}]\n", "'eth0/1' is not a Linux interface name"),
        ("  targets: [{interface: eth0}]\n", "key 'scanner.targets[0]': object missing required field cidr"),
        (
            "  targets: [{interface: eth0, cidr: 10.0.0.0/24}, {interface: eth0, cidr: 10.0.0.64/26}]\n",
            "target 1 (eth0 10.0.0.64/26) overlaps 10.0.0.0/24 on the same interface",
        ),
        ("  rate_pps: 0\n", "key 'scanner.rate_pps': expected int >= 1"),
        ("  gone_after_sweeps: 0\n", "key 'scanner.gone_after_sweeps': expected int >= 1"),
    ],
)
def test_bad_scanner_config_is_refused_at_load(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(scanner_yaml(tmp_path, body), ScannerAgentConfig, env={})


def test_large_subnet_accepted_when_allowed_explicitly(tmp_path: Path) -> None:
    body = "  allow_large: true\n  targets: [{interface: eth0, cidr: 10.8.0.0/16, icmp: true}]\n"
    config = load_config(scanner_yaml(tmp_path, body), ScannerAgentConfig, env={})
    assert config.scanner.targets[0].network.num_addresses == 65536


def bare_config(tmp_path: Path, **scanner: Any) -> ScannerAgentConfig:
    return msgspec.convert({"state_dir": str(tmp_path / "state"), "scanner": scanner}, ScannerAgentConfig)


def test_agent_refuses_to_start_without_targets_interface_or_registry(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"scanner\.targets: nothing to sweep"):
        ScannerAgent(bare_config(tmp_path), tmp_path)
    missing = f"nx{os.urandom(4).hex()}"
    target = {"interface": missing, "cidr": "10.0.0.0/24"}
    with pytest.raises(ConfigError, match=rf"scanner.targets\[0\] \({missing} 10.0.0.0/24\): no interface '{missing}'"):
        ScannerAgent(bare_config(tmp_path, targets=[target], oui_file=""), tmp_path)
    with pytest.raises(ConfigError, match="oui_file"):
        ScannerAgent(bare_config(tmp_path, targets=[target], oui_file=str(tmp_path / "x")), tmp_path)


# ---- real sweeps (root) -------------------------------------------------------------------------------


@pytest.fixture
def lab() -> Iterator[NetLab]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    with net_lab() as built:
        yield built


def populate(lab: NetLab) -> dict[str, tuple[str, str]]:
    """Three devices inside the /27 swept, one outside it: name -> (MAC, address)."""
    devices = {
        "d1": (KNOWN_OUI_MAC, lab.host(10)), "d2": (LOCAL_MAC[1], lab.host(11)), "d3": (LOCAL_MAC[2], lab.host(12)),
        "outside": ("02:00:00:00:00:99", lab.host(100)),
    }  # fmt: skip
    for name, (mac, address) in devices.items():
        lab.device(name, mac, address)
    return devices


def scanner_section(lab: NetLab, **overrides: Any) -> dict[str, Any]:
    section = {
        "targets": [{"interface": lab.uplink, "cidr": f"{lab.network.network_address}/27"}],
        "interval_s": 0.5, "rate_pps": 1000, "reply_timeout_s": 0.3, "gone_after_sweeps": 2,
    }  # fmt: skip
    return section | overrides


async def device_events(live_hub: LiveHub, agent_id: str) -> list[events_pb2.Event]:
    stored = await live_hub.query(bus_pb2.EventFilter(agent_ids=[agent_id], kinds=["device"]))
    return [s.event for s in reversed(stored)]  # oldest first


async def wait_for(condition: Any, what: str, timeout: float = 15) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = await condition()
        if result:
            return result
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


async def run_until(runtime: AgentRuntime, condition: Any, what: str) -> Any:
    task = asyncio.create_task(runtime.run())
    try:
        return await wait_for(condition, what)
    finally:
        runtime._stopping.set()
        await asyncio.wait_for(task, 30)


@pytest.mark.root
async def test_devices_found_gone_and_mac_swap_through_a_live_hub(
    live_hub: LiveHub, tmp_path: Path, lab: NetLab
) -> None:
    devices = populate(lab)
    config = agent_config(live_hub, tmp_path, "scanner", scanner=scanner_section(lab))
    runtime = AgentRuntime("scanner", None, config)
    agent = runtime.agent
    assert isinstance(agent, ScannerAgent)
    task = asyncio.create_task(runtime.run())
    try:

        async def actions_of(action: int) -> list[events_pb2.DeviceEvent]:
            return [e.device for e in await device_events(live_hub, "test-scanner") if e.device.action == action]

        async def three_new() -> list[events_pb2.DeviceEvent]:
            found = await actions_of(Action.NEW)
            return found if len(found) >= 3 else []

        new = await wait_for(three_new, "three NEW devices")
        seen = {(d.mac, tuple(d.ips), d.vendor, d.interface) for d in new}
        assert seen == {
            (KNOWN_OUI_MAC, (lab.host(10),), registry_vendor(KNOWN_OUI_MAC), lab.uplink),
            (LOCAL_MAC[1], (lab.host(11),), "", lab.uplink),
            (LOCAL_MAC[2], (lab.host(12),), "", lab.uplink),
        }
        assert all(d.first_seen_ns and d.first_seen_ns <= d.last_seen_ns for d in new)

        rounds_before = agent.rounds
        lab.remove("d3")
        (gone,) = await wait_for(lambda: actions_of(Action.GONE), "d3 GONE")
        assert (gone.mac, list(gone.ips)) == (LOCAL_MAC[2], [lab.host(12)])
        assert agent.rounds >= rounds_before + 2, "GONE only after gone_after_sweeps missed sweeps"

        lab.set_mac("d2", "02:00:00:00:00:2b")

        async def swap_reported() -> list[events_pb2.Event]:
            changed = [e for e in await device_events(live_hub, "test-scanner") if e.device.previous_mac]
            alerts = await live_hub.query(bus_pb2.EventFilter(agent_ids=["test-scanner"], kinds=["alert"]))
            return [changed[0], alerts[0].event] if changed and alerts else []

        changed, alert = await wait_for(swap_reported, "the MAC swap reported")
        assert (changed.device.action, changed.device.mac, changed.device.previous_mac, list(changed.device.ips)) == (
            Action.CHANGED, "02:00:00:00:00:2b", LOCAL_MAC[1], [lab.host(11)]
        )  # fmt: skip
        assert (alert.alert.rule, alert.severity) == ("scanner.ip_mac_changed", events_pb2.SEVERITY_WARNING)
        assert alert.alert.related_event_id == changed.event_id
        assert dict(alert.alert.details) == {
            "ip": lab.host(11), "interface": lab.uplink, "mac": "02:00:00:00:00:2b", "vendor": "",
            "previous_mac": LOCAL_MAC[1], "previous_vendor": "",
        }  # fmt: skip
        assert lab.host(100) not in {ip for d in await device_events(live_hub, "test-scanner") for ip in d.device.ips}
    finally:
        runtime._stopping.set()
        await asyncio.wait_for(task, 30)

    # A restart takes the inventory back from the outbox: nothing is announced as new again.
    before = len(await device_events(live_hub, "test-scanner"))
    restarted = AgentRuntime("scanner", None, config)

    async def two_rounds() -> bool:
        return getattr(restarted.agent, "rounds", 0) >= 2

    await run_until(restarted, two_rounds, "two sweeps after the restart")
    after = await device_events(live_hub, "test-scanner")
    assert [e for e in after[before:] if e.device.action == Action.NEW] == []
    assert sorted(e.device.mac for e in after if e.device.action == Action.NEW) == sorted(
        devices[n][0] for n in ("d1", "d2", "d3")
    )


SO_TIMESTAMPNS = 35  # Linux; Python 3.11 does not name it


def capture_arp(stop: threading.Event, frames: list[tuple[float, int, bytes]]) -> None:
    """Every outgoing ARP frame of the root namespace, on any interface, with the kernel's
    timestamp, until `stop`."""
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003)) as sock:  # ETH_P_ALL: sees sends
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        sock.settimeout(0.05)
        while not stop.is_set():
            try:
                frame, ancillary, _, origin = sock.recvmsg(2048, 64)
            except TimeoutError:
                continue
            if origin[2] == socket.PACKET_OUTGOING and frame[12:14] == b"\x08\x06":
                seconds, nanoseconds = struct.unpack("qq", ancillary[0][2][:16])
                frames.append((seconds + nanoseconds / 1e9, socket.if_nametoindex(origin[0]), frame))


@pytest.mark.root
def test_probes_only_the_configured_addresses_on_the_configured_interface_at_the_rate(
    tmp_path: Path, lab: NetLab
) -> None:
    devices = populate(lab)
    rate = 200
    agent = ScannerAgent(bare_config(tmp_path, **scanner_section(lab, rate_pps=rate)), tmp_path)
    frames: list[tuple[float, int, bytes]] = []
    stop = threading.Event()
    capture = threading.Thread(target=capture_arp, args=(stop, frames))
    capture.start()
    try:
        time.sleep(0.1)
        (result,) = agent.sweep_round()
    finally:
        stop.set()
        capture.join()
    assert result.answers == {devices[n][1]: [devices[n][0]] for n in ("d1", "d2", "d3")}
    ours = [(at, index, frame) for at, index, frame in frames if ipaddress.IPv4Address(frame[38:42]) in lab.network]
    assert {index for _, index, _ in ours} == {socket.if_nametoindex(lab.uplink)}
    asked = [str(ipaddress.IPv4Address(frame[38:42])) for _, _, frame in ours]
    swept = ipaddress.IPv4Network(f"{lab.network.network_address}/27")
    assert sorted(asked, key=socket.inet_aton) == [str(a) for a in swept.hosts() if str(a) != lab.host(1)]
    assert str(swept.network_address) not in asked and str(swept.broadcast_address) not in asked
    start = ours[0][0]  # the n-th probe leaves n / rate after the first, or later: never a burst
    early = [n for n, (at, _, _) in enumerate(ours) if at - start < n / rate - 0.002]
    assert early == [], f"probes ahead of {rate} pps: {early}"


@pytest.mark.root
def test_a_sweep_that_fails_reports_nothing_gone(tmp_path: Path, lab: NetLab, caplog: pytest.LogCaptureFixture) -> None:
    populate(lab)
    agent = ScannerAgent(bare_config(tmp_path, **scanner_section(lab, gone_after_sweeps=1)), tmp_path)
    events, _ = agent.fold(agent.sweep_round())
    assert len(events) == 3
    subprocess.run(["ip", "link", "set", lab.uplink, "down"], check=True)
    (failed,) = agent.sweep_round()
    assert failed.answers is None
    assert agent.fold([failed])[0] == []
    assert any(r.message == "sweep failed" and getattr(r, "interface", "") == lab.uplink for r in caplog.records)


@pytest.mark.root
def test_icmp_sweep_of_a_routed_subnet(tmp_path: Path, lab: NetLab) -> None:
    routed = free_subnets(1, 28)[0]
    hosts = lab.routed("r", routed, [5, 6])
    section = scanner_section(lab, gone_after_sweeps=1, targets=[
        {"interface": lab.uplink, "cidr": str(routed), "icmp": True},
    ])  # fmt: skip
    agent = ScannerAgent(bare_config(tmp_path, **section), tmp_path)
    events, _ = agent.fold(agent.sweep_round())
    found = {(e.device.mac, tuple(e.device.ips)) for e in events if e.device.action == Action.NEW}
    router = str(routed.network_address + 1)
    assert found == {("", (hosts[0],)), ("", (hosts[1],)), ("", (router,))}
    lab.remove("r6")
    events, _ = agent.fold(agent.sweep_round())
    assert [(Action.Name(e.device.action), list(e.device.ips)) for e in events] == [("GONE", [hosts[1]])]


SWEEP_SNIPPET = """
import json, sys
from pathlib import Path
from amoskys.agents.scanner.agent import ScannerAgent
import msgspec
from amoskys.agents.scanner.config import ScannerAgentConfig
config = msgspec.convert(json.loads(sys.argv[1]), ScannerAgentConfig)
agent = ScannerAgent(config, Path(config.state_dir))
print(json.dumps([e.device.mac for e in agent.fold(agent.sweep_round())[0]]))
"""


@pytest.mark.root
def test_cap_net_raw_is_the_only_privilege_needed(tmp_path: Path, lab: NetLab) -> None:
    devices = populate(lab)
    document = json.dumps({"state_dir": str(tmp_path), "scanner": scanner_section(lab)})

    def sweep_with(capabilities: str) -> subprocess.CompletedProcess[str]:
        drop = ["setpriv", f"--bounding-set=-all{capabilities}", f"--inh-caps=-all{capabilities}",
                f"--ambient-caps=-all{capabilities}", "--"]  # fmt: skip
        command = [*drop, sys.executable, "-c", SWEEP_SNIPPET, document]
        return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)

    allowed = sweep_with(",+net_raw")
    assert allowed.returncode == 0, allowed.stderr
    assert sorted(json.loads(allowed.stdout)) == sorted(devices[n][0] for n in ("d1", "d2", "d3"))
    refused = sweep_with("")
    assert refused.returncode != 0
    assert "cannot open an AF_PACKET socket: Operation not permitted (the scanner needs CAP_NET_RAW)" in refused.stderr


@pytest.mark.root
def test_restore_takes_the_inventory_back_and_survives_a_corrupt_one(
    tmp_path: Path, lab: NetLab, caplog: pytest.LogCaptureFixture
) -> None:
    populate(lab)
    config = bare_config(tmp_path, **scanner_section(lab))
    first = ScannerAgent(config, tmp_path)
    events, _ = first.fold(first.sweep_round())
    assert len(events) == 3
    saved = first.inventory.encode()
    again = ScannerAgent(config, tmp_path)
    again.restore({"scanner.inventory": saved})
    assert again.checkpoint() == {"scanner.inventory": saved}
    assert again.fold(again.sweep_round())[0] == []  # nothing new after a restart
    corrupt = ScannerAgent(config, tmp_path)
    corrupt.restore({"scanner.inventory": saved[: len(saved) // 2]})
    assert "saved inventory unreadable" in caplog.text
    assert corrupt.checkpoint() == {}
    assert len(corrupt.fold(corrupt.sweep_round())[0]) == 3  # announced again: nothing is lost


@pytest.mark.root
def test_arp_on_an_interface_without_ethernet_is_a_clear_sweep_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    if os.geteuid() != 0:
        pytest.skip("raw sockets need root")
    agent = ScannerAgent(bare_config(tmp_path, targets=[{"interface": "lo", "cidr": "127.0.0.0/30"}]), tmp_path)
    assert agent.sweep_round()[0].answers is None
    errors = [getattr(r, "error", "") for r in caplog.records if r.message == "sweep failed"]
    assert errors == ["lo is not an Ethernet interface; sweep it with icmp: true"]


@pytest.mark.root
def test_stopping_abandons_a_sweep_at_once(tmp_path: Path, lab: NetLab) -> None:
    slow = scanner_section(lab, rate_pps=5)  # 29 probes: about 6 s
    agent = ScannerAgent(bare_config(tmp_path, **slow), tmp_path)

    async def stop_mid_sweep() -> float:
        collecting = agent.collect()
        first = asyncio.ensure_future(collecting.__anext__())
        await asyncio.sleep(0.5)
        stopped = time.monotonic()
        await agent.close()
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(first, 5)
        return time.monotonic() - stopped

    assert asyncio.run(stop_mid_sweep()) < 0.5


def test_cancelling_the_collector_stops_the_sweep_thread(tmp_path: Path, lab: NetLab) -> None:
    """The runtime cancels the collector on SIGTERM before it calls close(): probing stops then, not later."""
    slow = scanner_section(lab, rate_pps=5)
    agent = ScannerAgent(bare_config(tmp_path, **slow), tmp_path)

    async def cancel_mid_sweep() -> None:
        first = asyncio.ensure_future(agent.collect().__anext__())
        await asyncio.sleep(0.5)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first

    asyncio.run(cancel_mid_sweep())
    assert agent.stopping.is_set()
