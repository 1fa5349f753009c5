"""A throw-away L2 network for the network agents' tests and benchmarks (root only).

A bridge in its own network namespace; devices are namespaces with a veth into the bridge (a MAC
and an address of ours); the host side is one veth in the root namespace (`uplink`) with the
subnet's first address. Every name carries a random tag and the subnet is one of 10.199.0.0/16
that the root namespace does not use; `close()` deletes all of it.
"""

from __future__ import annotations

import ipaddress
import random
import secrets
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["NetLab", "net_lab"]


def ip(*args: str, namespace: str = "") -> str:
    command = ["ip", *(["-n", namespace] if namespace else []), *args]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)}: {result.stderr.strip()}")
    return result.stdout


def _used_networks() -> list[ipaddress.IPv4Network]:
    routes = ip("-4", "route", "show", "table", "all") + ip("-4", "addr", "show")
    found = []
    for word in routes.split():
        try:
            found.append(ipaddress.IPv4Network(word, strict=False))
        except ValueError:
            continue
    return found


def free_subnets(count: int, prefix: int = 24) -> list[ipaddress.IPv4Network]:
    """`count` random subnets of 10.199.0.0/16 the root namespace has no route or address in."""
    used = _used_networks()
    pool = list(ipaddress.IPv4Network("10.199.0.0/16").subnets(new_prefix=prefix))
    chosen: list[ipaddress.IPv4Network] = []
    for candidate in random.sample(pool, len(pool)):
        if not any(candidate.overlaps(u) for u in used + chosen):
            chosen.append(candidate)
            if len(chosen) == count:
                return chosen
    raise RuntimeError("no free subnet in 10.199.0.0/16")


class NetLab:
    def __init__(self, network: ipaddress.IPv4Network) -> None:
        self.tag = secrets.token_hex(3)
        self.network = network
        self.bridge_ns = self.ns_name("br")
        self.uplink = f"ams{self.tag}"  # 9 characters: interface names stop at 15
        self.namespaces: list[str] = []

    def build(self) -> None:
        """The bridge namespace and the uplink with the subnet's first address."""
        network = self.network
        self._add_ns(self.bridge_ns)
        ip("link", "add", "br0", "type", "bridge", namespace=self.bridge_ns)
        ip("link", "set", "br0", "up", namespace=self.bridge_ns)
        ip("link", "add", self.uplink, "type", "veth", "peer", "name", "up0", "netns", self.bridge_ns)
        self._attach("up0")
        ip("addr", "add", f"{self.host(1)}/{network.prefixlen}", "dev", self.uplink)
        ip("link", "set", self.uplink, "up")

    def ns_name(self, name: str) -> str:
        return f"amsk-{self.tag}-{name}"

    def host(self, index: int) -> str:
        return str(self.network.network_address + index)

    def _add_ns(self, name: str) -> None:
        ip("netns", "add", name)
        self.namespaces.append(name)
        ip("link", "set", "lo", "up", namespace=name)

    def _attach(self, port: str) -> None:
        ip("link", "set", port, "master", "br0", namespace=self.bridge_ns)
        ip("link", "set", port, "up", namespace=self.bridge_ns)

    def device(self, name: str, mac: str, address: str, prefix: int | None = None) -> str:
        """A namespace `name` with eth0 (`mac`, `address`) on the bridge; returns the namespace."""
        namespace = self.ns_name(name)
        self._add_ns(namespace)
        port = f"p-{name}"
        ip("link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", namespace, namespace=self.bridge_ns)
        self._attach(port)
        ip("link", "set", "eth0", "address", mac, namespace=namespace)
        ip("addr", "add", f"{address}/{prefix or self.network.prefixlen}", "dev", "eth0", namespace=namespace)
        ip("link", "set", "eth0", "up", namespace=namespace)
        return namespace

    def routed(self, name: str, subnet: ipaddress.IPv4Network, hosts: list[int]) -> list[str]:
        """A router namespace on the bridge (last address of the lab subnet) leading to `subnet`,
        where each of `hosts` (indexes) is a namespace; the root namespace routes `subnet` via it."""
        router = self.device(name, "02:00:00:00:00:fe", str(self.network.broadcast_address - 1))
        subprocess.run(["ip", "netns", "exec", router, "sysctl", "-qw", "net.ipv4.ip_forward=1"], check=True)
        ip("link", "add", "br1", "type", "bridge", namespace=router)
        ip("addr", "add", f"{subnet.network_address + 1}/{subnet.prefixlen}", "dev", "br1", namespace=router)
        ip("link", "set", "br1", "up", namespace=router)
        addresses = []
        for index in hosts:
            namespace, address = self.ns_name(f"{name}{index}"), str(subnet.network_address + index)
            self._add_ns(namespace)
            ip("link", "add", f"h{index}", "type", "veth", "peer", "name", "eth0", "netns", namespace, namespace=router)
            ip("link", "set", f"h{index}", "master", "br1", namespace=router)
            ip("link", "set", f"h{index}", "up", namespace=router)
            ip("addr", "add", f"{address}/{subnet.prefixlen}", "dev", "eth0", namespace=namespace)
            ip("link", "set", "eth0", "up", namespace=namespace)
            ip("route", "add", "default", "via", str(subnet.network_address + 1), namespace=namespace)
            addresses.append(address)
        ip("route", "add", str(subnet), "via", str(self.network.broadcast_address - 1), "dev", self.uplink)
        return addresses

    def remove(self, name: str) -> None:
        """Unplug and delete device `name` (its namespace and veth)."""
        namespace = self.ns_name(name)
        ip("netns", "del", namespace)
        self.namespaces.remove(namespace)

    def set_mac(self, name: str, mac: str) -> None:
        ip("link", "set", "eth0", "address", mac, namespace=self.ns_name(name))

    def close(self) -> None:
        for namespace in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, check=False)
        subprocess.run(["ip", "link", "del", self.uplink], capture_output=True, check=False)
        self.namespaces.clear()


@contextmanager
def net_lab(prefix: int = 24) -> Iterator[NetLab]:
    """A lab on a free subnet, deleted on exit even when building it failed half-way."""
    lab = NetLab(free_subnets(1, prefix)[0])
    try:
        lab.build()
        yield lab
    finally:
        lab.close()
