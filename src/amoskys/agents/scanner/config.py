"""scanner's settings: the subnets swept, how fast and how often (section `scanner` of agent-scanner.yml)."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated

import msgspec

from amoskys.config import AgentConfig, Positive, Seconds, Section

__all__ = ["ScanTarget", "ScannerAgentConfig", "ScannerConfig"]


def _ipv4_network(cidr: str) -> ipaddress.IPv4Network:
    """An IPv4 network written without host bits, e.g. 192.168.1.0/24 (ValueError naming the fix)."""
    try:
        network = ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        raise ValueError(f"cidr: {cidr!r} is not an IPv4 network such as 192.168.1.0/24") from None
    if not isinstance(network, ipaddress.IPv4Network):
        raise ValueError(f"cidr: {cidr!r} is IPv6; only IPv4 subnets can be swept")
    if str(network) != cidr:
        raise ValueError(f"cidr: {cidr!r} has host bits set; did you mean {str(network)!r}?")
    return network


class ScanTarget(Section, frozen=True):
    interface: str
    cidr: str
    icmp: bool = False  # a routed subnet: ICMP echo instead of ARP (finds addresses, not MACs)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[^/:\s]{1,15}", self.interface):
            raise ValueError(f"interface: {self.interface!r} is not a Linux interface name (1-15 characters, "
                             "no '/', ':' or spaces)")  # fmt: skip
        _ipv4_network(self.cidr)

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.cidr)


class ScannerConfig(Section, frozen=True):
    targets: list[ScanTarget] = msgspec.field(default_factory=list)
    interval_s: Seconds = 300.0
    max_prefix: Annotated[int, msgspec.Meta(ge=0, le=32)] = 22
    allow_large: bool = False
    rate_pps: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 100
    reply_timeout_s: Seconds = 1.0  # how long replies are awaited after a target's last probe
    gone_after_sweeps: Positive = 3
    oui_file: str = "/usr/share/ieee-data/oui.txt"  # "": no vendor names

    def __post_init__(self) -> None:
        for index, target in enumerate(self.targets):
            network, name = target.network, f"target {index} ({target.interface} {target.cidr})"
            if network.prefixlen < self.max_prefix and not self.allow_large:
                raise ValueError(
                    f"targets: {name} is larger than max_prefix /{self.max_prefix} ({network.num_addresses} "
                    "addresses); set allow_large: true to sweep it anyway"
                )
            for other in self.targets[:index]:
                if other.interface == target.interface and other.network.overlaps(network):
                    raise ValueError(f"targets: {name} overlaps {other.cidr} on the same interface")


class ScannerAgentConfig(AgentConfig, frozen=True):
    scanner: ScannerConfig = ScannerConfig()
