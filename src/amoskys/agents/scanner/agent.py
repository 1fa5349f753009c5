"""scanner: the devices on the local networks, from ARP (or ICMP echo) sweeps of configured subnets.

Every `scanner.interval_s` each target (an interface and an IPv4 CIDR) is swept: one ARP request
per address (an ICMP echo request for a routed subnet, `icmp: true`), `rate_pps` probes a second
across all targets, replies awaited `reply_timeout_s` after the last. Only the target's addresses
are probed (never its network or broadcast address below /31, never this host's own address),
only on the target's interface; subnets larger than `max_prefix` are refused at config load.

Frames are built by hand on an AF_PACKET socket (ARP) or a raw ICMP socket: importing scapy would
add 34 MB (its l2/inet layers) to 59 MB (scapy.all) of RSS. Devices (MAC, addresses, vendor from
the IEEE registry, first and last seen) are kept in the outbox state with the events that
announced them, so a restart re-announces nothing.
Events: `device` NEW, CHANGED (its addresses changed; `previous_mac` when an address came from
another MAC, also alert `scanner.ip_mac_changed`), GONE after `gone_after_sweeps` sweeps without
an answer; alert `scanner.ip_conflict` when several MACs answer for one address in one sweep.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import msgspec

from amoskys.agents.runtime.base import Agent
from amoskys.agents.scanner.config import ScannerAgentConfig, ScannerConfig, ScanTarget
from amoskys.agents.scanner.oui import OuiRegistry
from amoskys.errors import ConfigError
from amoskys.v1 import events_pb2

__all__ = ["Device", "Inventory", "ScannerAgent", "Sweep", "arp_request", "parse_arp_reply", "sweep_addresses"]

log = logging.getLogger(__name__)
Action = events_pb2.DeviceEvent.Action
ETH_P_ARP = 0x0806
ETH_P_IP = 0x0800
ARPHRD_ETHER = 1
BROADCAST = b"\xff" * 6
MIN_FRAME = 60
ICMP_PAYLOAD = b"AMOSKYS-SWEEP"
STATE_KEY = "scanner.inventory"
STATE_VERSION = 1
POLL_SLICE_S = 0.2


# ---- frames ------------------------------------------------------------------------------------


def arp_request(src_mac: bytes, src_ip: int, target_ip: int) -> bytes:
    """A broadcast Ethernet frame asking who has `target_ip` (padded to the 60-byte minimum)."""
    arp = struct.pack("!HHBBH6sI6sI", ARPHRD_ETHER, ETH_P_IP, 6, 4, 1, src_mac, src_ip, bytes(6), target_ip)
    frame = BROADCAST + src_mac + struct.pack("!H", ETH_P_ARP) + arp
    return frame.ljust(MIN_FRAME, b"\0")


def parse_arp_reply(frame: bytes) -> tuple[str, int, int] | None:
    """(sender MAC, sender address, target address) of an Ethernet ARP reply; None for anything else."""
    if len(frame) < 42 or frame[12:14] != b"\x08\x06":
        return None
    hardware, protocol, hlen, plen, op, sender_mac, sender_ip, _, target_ip = struct.unpack_from(
        "!HHBBH6sI6sI", frame, 14
    )
    if (hardware, protocol, hlen, plen, op) != (ARPHRD_ETHER, ETH_P_IP, 6, 4, 2):
        return None
    if sender_mac[0] & 0x01 or sender_mac == bytes(6):  # a multicast or null sender is no device
        return None
    return sender_mac.hex(":"), sender_ip, target_ip


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def icmp_echo(ident: int, seq: int) -> bytes:
    header = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
    return struct.pack("!BBHHH", 8, 0, _checksum(header + ICMP_PAYLOAD), ident, seq) + ICMP_PAYLOAD


def _dotted(address: int) -> str:
    return socket.inet_ntoa(address.to_bytes(4, "big"))


def sweep_addresses(network: ipaddress.IPv4Network) -> range:
    """The addresses of `network` to probe: all but the network and broadcast address below /31."""
    first, last = int(network.network_address), int(network.broadcast_address)
    if network.prefixlen < 31:
        first, last = first + 1, last - 1
    return range(first, last + 1)


# ---- probing -----------------------------------------------------------------------------------


class Probe(Protocol):
    own_address: int

    def fileno(self) -> int: ...

    def send(self, address: int) -> None: ...

    def answers(self) -> Iterator[tuple[int, str]]:
        """(address, MAC or '') of the replies waiting now."""
        ...


def source_address(interface: str, network: ipaddress.IPv4Network) -> int:
    """The address this host sends from towards `network` on `interface` (0 if it has none).

    A UDP connect picks it (the kernel's own choice) without sending anything."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
        udp.connect((str(network.network_address), 9))
        return int.from_bytes(socket.inet_aton(udp.getsockname()[0]), "big")


class ArpProbe:
    """ARP requests and replies on one interface, through an AF_PACKET socket bound to it."""

    def __init__(self, sock: socket.socket, interface: str, network: ipaddress.IPv4Network) -> None:
        self.sock = sock
        sock.bind((interface, ETH_P_ARP))
        _, _, _, hatype, self.mac = sock.getsockname()
        if hatype != ARPHRD_ETHER or len(self.mac) != 6:
            raise OSError(f"{interface} is not an Ethernet interface; sweep it with icmp: true")
        self.own_address = source_address(interface, network)
        sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, address: int) -> None:
        self.sock.send(arp_request(self.mac, self.own_address, address))

    def answers(self) -> Iterator[tuple[int, str]]:
        while True:
            try:  # recv, not recvfrom: no ioctl per frame to name the interface we are bound to
                frame = self.sock.recv(2048)
            except BlockingIOError:
                return
            reply = parse_arp_reply(frame)  # our own requests never come back to this socket
            if reply and reply[2] == self.own_address:
                yield reply[1], reply[0]


class IcmpProbe:
    """ICMP echo requests and replies through a raw socket bound to one interface."""

    def __init__(self, sock: socket.socket, interface: str, network: ipaddress.IPv4Network) -> None:
        self.sock = sock
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
        sock.setblocking(False)
        self.own_address = source_address(interface, network)
        self.ident = int.from_bytes(os.urandom(2), "big")
        self.seq = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, address: int) -> None:
        self.seq = (self.seq + 1) & 0xFFFF
        self.sock.sendto(icmp_echo(self.ident, self.seq), (_dotted(address), 0))

    def answers(self) -> Iterator[tuple[int, str]]:
        while True:
            try:
                packet = self.sock.recv(2048)
            except BlockingIOError:
                return
            start = (packet[0] & 0x0F) * 4
            if (
                len(packet) >= start + 8
                and packet[start] == 0
                and packet[start + 4 : start + 6] == self.ident.to_bytes(2, "big")
            ):
                yield int.from_bytes(packet[12:16], "big"), ""


def open_socket(target: ScanTarget) -> socket.socket:
    """The raw socket a target's sweep needs (CAP_NET_RAW): AF_PACKET for ARP, IPPROTO_ICMP for ICMP."""
    if target.icmp:
        return socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    return socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))


@contextmanager
def open_probe(target: ScanTarget) -> Iterator[Probe]:
    sock = open_socket(target)
    try:
        kind = IcmpProbe if target.icmp else ArpProbe
        yield kind(sock, target.interface, target.network)
    finally:
        sock.close()


class Pacer:
    """Send slots `1 / rate_pps` apart, shared by every target of the agent."""

    def __init__(self, rate_pps: int) -> None:
        self.interval = 1 / rate_pps
        self.next = 0.0

    def slot(self) -> float:
        at = max(self.next, time.monotonic())
        self.next = at + self.interval
        return at


class Stopped(Exception):
    """The agent is stopping: the sweep was abandoned."""


def run_sweep(
    probe: Probe, addresses: range, pacer: Pacer, wait_s: float, stop: threading.Event
) -> dict[int, list[str]]:
    """Probe each address in its slot, then wait `wait_s`; address -> MACs that answered, in order."""
    answers: dict[int, list[str]] = {}

    def collect_until(deadline: float) -> None:
        while True:
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([probe], [], [], min(max(remaining, 0), POLL_SLICE_S))
            for address, mac in probe.answers() if ready else ():
                if address in addresses and address != probe.own_address:
                    macs = answers.setdefault(address, [])
                    if mac not in macs:
                        macs.append(mac)
            if stop.is_set():
                raise Stopped
            if remaining <= 0:
                return

    for address in addresses:
        if address != probe.own_address:
            collect_until(pacer.slot())
            probe.send(address)
    collect_until(time.monotonic() + wait_s)
    return answers


# ---- the inventory -----------------------------------------------------------------------------


class Device(msgspec.Struct, array_like=True):
    """One device: a MAC on an interface (for an ICMP target, one address: routed, no MAC)."""

    interface: str
    mac: str
    vendor: str
    first_seen_ns: int
    last_seen_ns: int
    addresses: dict[str, int]  # address -> sweeps in a row it went unanswered by this device
    missed: int = 0  # sweeps in a row this device answered nothing

    @property
    def key(self) -> tuple[str, str]:
        return self.interface, self.mac or next(iter(self.addresses), "")

    def sorted_addresses(self) -> list[str]:
        return sorted(self.addresses, key=socket.inet_aton)


class SavedInventory(msgspec.Struct):
    version: int
    devices: list[Device]


@dataclass(frozen=True)
class Sweep:
    """One target's sweep: address -> MACs that answered ([''] for ICMP); None when it failed."""

    interface: str
    network: ipaddress.IPv4Network
    answers: dict[str, list[str]] | None


@dataclass
class Change:
    action: Action.ValueType
    device: Device
    previous_mac: str = ""
    moved_in: list[tuple[str, Device]] = field(default_factory=list)  # (address, its previous holder)


@dataclass(frozen=True)
class Conflict:
    interface: str
    address: str
    macs: tuple[str, ...]


class Inventory:
    """Devices by (interface, MAC); `update` folds one round of sweeps in and says what changed."""

    def __init__(self, devices: list[Device] | None = None) -> None:
        self.devices = {d.key: d for d in devices or []}
        self.conflicts: set[Conflict] = set()

    def encode(self) -> str:
        return msgspec.json.encode(SavedInventory(STATE_VERSION, list(self.devices.values()))).decode()

    @classmethod
    def decode(cls, text: str) -> Inventory:
        """The inventory saved by `encode`; msgspec.DecodeError or ValueError when it is not one."""
        saved = msgspec.json.decode(text, type=SavedInventory)
        if saved.version != STATE_VERSION:
            raise ValueError(f"inventory version {saved.version}, expected {STATE_VERSION}")
        return cls(saved.devices)

    def holders(self) -> dict[tuple[str, str], Device]:
        """(interface, address) -> the MAC's device answering for it (ICMP devices have no MAC to move)."""
        return {(d.interface, a): d for d in self.devices.values() if d.mac for a in d.addresses}

    def update(self, sweeps: list[Sweep], now_ns: int, gone_after: int) -> tuple[list[Change], list[Conflict]]:
        """Fold in one round; the changes (NEW, CHANGED, GONE) and the new address conflicts."""
        changes: dict[tuple[str, str], Change] = {}
        answered: set[tuple[str, str]] = set()
        conflicts: set[Conflict] = set()
        holders = self.holders()
        for sweep in sweeps:
            for address, macs in (sweep.answers or {}).items():
                holder = holders.get((sweep.interface, address))
                if len(macs) > 1:
                    conflicts.add(Conflict(sweep.interface, address, tuple(sorted(macs))))
                mac = holder.mac if holder and holder.mac in macs else macs[0]
                device = self._answer(sweep.interface, address, mac, now_ns, changes)
                answered.add(device.key)
                if holder is not None and holder is not device:
                    del holder.addresses[address]
                    changes.setdefault(holder.key, Change(Action.CHANGED, holder))
                    changes[device.key].moved_in.append((address, holder))
        self._count_misses(sweeps, answered, gone_after, changes)
        for change in changes.values():
            if change.moved_in:
                change.action, change.previous_mac = Action.CHANGED, change.moved_in[0][1].mac
        new_conflicts, self.conflicts = conflicts - self.conflicts, conflicts
        order = {Action.NEW: 0, Action.CHANGED: 1, Action.GONE: 2}
        return sorted(changes.values(), key=lambda c: order[c.action]), sorted(new_conflicts, key=str)

    def _answer(
        self, interface: str, address: str, mac: str, now_ns: int, changes: dict[tuple[str, str], Change]
    ) -> Device:
        key = (interface, mac or address)
        device = self.devices.get(key)
        if device is None:
            device = self.devices[key] = Device(interface, mac, "", now_ns, now_ns, {})
            changes[key] = Change(Action.NEW, device)
        elif address not in device.addresses:
            changes.setdefault(key, Change(Action.CHANGED, device))
        device.addresses[address] = 0
        device.last_seen_ns, device.missed = now_ns, 0
        return device

    def _count_misses(
        self, sweeps: list[Sweep], answered: set[tuple[str, str]], gone_after: int,
        changes: dict[tuple[str, str], Change],
    ) -> None:  # fmt: skip
        """Count the silence of swept devices; drop addresses and devices silent `gone_after` sweeps."""
        for key, device in list(self.devices.items()):
            covering = _covering(device, sweeps)
            if not covering or any(s.answers is None for s in covering):
                continue  # not swept, or a sweep that failed: that says nothing about the device
            if key in answered:
                self._count_address_misses(device, covering, gone_after, changes)
                continue
            device.missed += 1
            if device.missed >= gone_after:
                del self.devices[key]
                changes[key] = Change(Action.GONE, device)

    @staticmethod
    def _count_address_misses(
        device: Device, covering: list[Sweep], gone_after: int, changes: dict[tuple[str, str], Change]
    ) -> None:
        for address in list(device.addresses):
            ip = ipaddress.IPv4Address(address)
            sweep = next((s for s in covering if ip in s.network), None)
            if sweep is None or device.mac in (sweep.answers or {}).get(address, ()):
                continue
            device.addresses[address] += 1
            if device.addresses[address] >= gone_after:
                del device.addresses[address]
                changes.setdefault(device.key, Change(Action.CHANGED, device))


def _covering(device: Device, sweeps: list[Sweep]) -> list[Sweep]:
    """The sweeps of this round that speak for `device`: on its interface, over one of its addresses
    (any on its interface when it has none left)."""
    on_interface = [s for s in sweeps if s.interface == device.interface]
    if not device.addresses:
        return on_interface
    addresses = [ipaddress.IPv4Address(a) for a in device.addresses]
    return [s for s in on_interface if any(a in s.network for a in addresses)]


# ---- the agent ---------------------------------------------------------------------------------


def check_targets(settings: ScannerConfig) -> None:
    """Refuse at start a target whose interface does not exist or whose socket cannot be opened."""
    interfaces = [name for _, name in socket.if_nameindex()]
    for index, target in enumerate(settings.targets):
        where = f"scanner.targets[{index}] ({target.interface} {target.cidr})"
        if target.interface not in interfaces:
            raise ConfigError(
                f"{where}: no interface {target.interface!r} on this host (it has {', '.join(interfaces)})"
            )
        try:
            open_socket(target).close()
        except PermissionError as exc:
            kind = "a raw ICMP socket" if target.icmp else "an AF_PACKET socket"
            raise ConfigError(f"{where}: cannot open {kind}: {exc.strerror} (the scanner needs CAP_NET_RAW)") from exc


class ScannerAgent(Agent[ScannerAgentConfig]):
    kind = "scanner"
    config_type = ScannerAgentConfig

    def __init__(self, config: ScannerAgentConfig, state_dir: Path) -> None:
        super().__init__(config, state_dir)
        settings = config.scanner
        if not settings.targets:
            raise ConfigError("scanner.targets: nothing to sweep; list at least one {interface, cidr}")
        self.oui = OuiRegistry(settings.oui_file)
        self.oui.check()
        check_targets(settings)
        self.inventory = Inventory()
        self.pacer = Pacer(settings.rate_pps)
        self.stopping = threading.Event()
        self.rounds = 0
        self.saved = ""  # the inventory matching every event yielded so far
        self._warn_if_slow(settings)

    @staticmethod
    def _warn_if_slow(settings: ScannerConfig) -> None:
        probes = sum(len(sweep_addresses(t.network)) for t in settings.targets)
        needed = probes / settings.rate_pps + settings.reply_timeout_s * len(settings.targets)
        if needed > settings.interval_s:
            log.warning(
                "a sweep takes longer than interval_s; sweeps run back to back",
                extra={"probes": probes, "rate_pps": settings.rate_pps, "sweep_s": round(needed, 1)},
            )

    def checkpoint(self) -> dict[str, str]:
        return {STATE_KEY: self.saved} if self.saved else {}

    def restore(self, state: dict[str, str]) -> None:
        text = state.get(STATE_KEY, "")
        if not text:
            return
        try:
            self.inventory = Inventory.decode(text)
        except (msgspec.DecodeError, ValueError) as exc:
            log.error(
                "saved inventory unreadable; starting empty (devices are announced again)", extra={"error": str(exc)}
            )
            return
        self.saved = text

    def reload(self, config: ScannerAgentConfig) -> None:
        super().reload(config)
        self.pacer = Pacer(config.scanner.rate_pps)

    async def close(self) -> None:
        self.stopping.set()

    async def collect(self) -> AsyncIterator[events_pb2.Event]:
        while True:
            started = time.monotonic()
            try:
                sweeps = await asyncio.to_thread(self.sweep_round)
            except Stopped:
                return
            except asyncio.CancelledError:  # stopping: the sweep thread must not go on probing
                self.stopping.set()
                raise
            events, saved = await asyncio.to_thread(self.fold, sweeps)
            for index, event in enumerate(events):
                if index == len(events) - 1:
                    self.saved = saved
                yield event
            self.saved, self.rounds = saved, self.rounds + 1
            await asyncio.sleep(max(0.0, self.config.scanner.interval_s - (time.monotonic() - started)))

    def sweep_round(self) -> list[Sweep]:
        settings = self.config.scanner
        return [self.sweep_target(target, settings) for target in settings.targets]

    def sweep_target(self, target: ScanTarget, settings: ScannerConfig) -> Sweep:
        started = time.monotonic()
        try:
            with open_probe(target) as probe:
                found = run_sweep(
                    probe, sweep_addresses(target.network), self.pacer, settings.reply_timeout_s, self.stopping
                )
        except OSError as exc:
            log.error("sweep failed", extra={"interface": target.interface, "cidr": target.cidr, "error": str(exc)})
            return Sweep(target.interface, target.network, None)
        log.debug(
            "swept",
            extra={"interface": target.interface, "cidr": target.cidr, "answered": len(found),
                   "seconds": round(time.monotonic() - started, 2)},
        )  # fmt: skip
        return Sweep(target.interface, target.network, {_dotted(a): macs for a, macs in found.items()})

    def fold(self, sweeps: list[Sweep]) -> tuple[list[events_pb2.Event], str]:
        """Update the inventory with one round; its events and the inventory to save with them."""
        changes, conflicts = self.inventory.update(sweeps, time.time_ns(), self.config.scanner.gone_after_sweeps)
        unnamed = [c.device for c in changes if c.action != Action.GONE and c.device.mac and not c.device.vendor]
        vendors = self.oui.vendors(d.mac for d in unnamed)
        for device in unnamed:
            device.vendor = vendors[device.mac]
        events = [event for change in changes for event in self.change_events(change)]
        events += [self.conflict_alert(conflict) for conflict in conflicts]
        return events, self.inventory.encode()

    def change_events(self, change: Change) -> list[events_pb2.Event]:
        device = change.device
        body = events_pb2.DeviceEvent(
            action=change.action, mac=device.mac, ips=device.sorted_addresses(), vendor=device.vendor,
            interface=device.interface, previous_mac=change.previous_mac,
            first_seen_ns=device.first_seen_ns, last_seen_ns=device.last_seen_ns,
        )  # fmt: skip
        severity = events_pb2.SEVERITY_NOTICE if change.moved_in else events_pb2.SEVERITY_INFO
        event = self.event(severity, device=body)
        return [event] + [self.moved_alert(event, address, holder) for address, holder in change.moved_in]

    def moved_alert(self, device_event: events_pb2.Event, address: str, previous: Device) -> events_pb2.Event:
        device = device_event.device
        summary = (
            f"{address} moved from {previous.mac} to {device.mac} on {device.interface}: "
            "possible ARP spoofing (or a replaced device)"
        )
        details = {
            "ip": address, "interface": device.interface, "mac": device.mac, "vendor": device.vendor,
            "previous_mac": previous.mac, "previous_vendor": previous.vendor,
        }  # fmt: skip
        alert = self.alert("scanner.ip_mac_changed", summary, details)
        alert.alert.related_event_id = device_event.event_id
        return alert

    def conflict_alert(self, conflict: Conflict) -> events_pb2.Event:
        summary = (
            f"{conflict.address} answered by {len(conflict.macs)} MACs on {conflict.interface} "
            f"({', '.join(conflict.macs)}): possible ARP spoofing or a duplicate address"
        )
        details = {"ip": conflict.address, "interface": conflict.interface, "macs": ",".join(conflict.macs)}
        return self.alert("scanner.ip_conflict", summary, details)
