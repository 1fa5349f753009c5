"""snmp's settings: the devices polled and the trap receiver (section `snmp` of agent-snmp.yml)."""

from __future__ import annotations

import re
from typing import Annotated, Literal

import msgspec

from amoskys.config import AgentConfig, NonNegative, Port, Seconds, Section, check_address

__all__ = ["SnmpAgentConfig", "SnmpConfig", "SnmpTarget", "SnmpUser"]

SnmpAuthProtocol = Literal["SHA", "SHA256", "SHA512"]
SnmpPrivProtocol = Literal["AES", "AES256"]
USM_MIN_KEY = 8  # RFC 3414: passphrases shorter than 8 characters are refused


def _check_usm(user: str, auth_key: str, priv_key: str) -> None:
    """SNMPv3 is authPriv only: a user and both passphrases, each long enough (never echoed)."""
    missing = [key for key, value in (("user", user), ("auth_key", auth_key), ("priv_key", priv_key)) if not value]
    if missing:
        raise ValueError(f"{missing[0]}: version 3 needs user, auth_key and priv_key (authPriv)")
    for key, value in (("auth_key", auth_key), ("priv_key", priv_key)):
        if len(value) < USM_MIN_KEY:
            raise ValueError(f"{key}: must be at least {USM_MIN_KEY} characters (RFC 3414), got {len(value)}")


class SnmpTarget(Section, frozen=True):
    name: Annotated[str, msgspec.Meta(min_length=1)]
    address: Annotated[str, msgspec.Meta(min_length=1)]  # IPv4, IPv6 or a host name
    port: Port = 161
    version: Literal["2c", 3] = "2c"
    community: str = ""
    user: str = ""
    auth_protocol: SnmpAuthProtocol = "SHA"
    auth_key: str = ""
    priv_protocol: SnmpPrivProtocol = "AES"
    priv_key: str = ""
    context: Annotated[str, msgspec.Meta(max_length=32)] = ""  # SNMPv3 contextName (VRF, instance); "": default
    timeout_s: Seconds = 2.0
    retries: NonNegative = 1

    def __post_init__(self) -> None:
        if self.version == "2c" and not self.community:
            raise ValueError("community: version 2c needs a community")
        if self.version == "2c" and self.context:
            raise ValueError("context: a context name is SNMPv3's; with 2c the community selects the context")
        if self.version == 3:
            _check_usm(self.user, self.auth_key, self.priv_key)


class SnmpUser(Section, frozen=True):
    """An SNMPv3 user (authPriv) whose traps and informs the receiver accepts."""

    user: Annotated[str, msgspec.Meta(min_length=1)]
    engine_id: str = ""  # the sender's snmpEngineID in hex: needed for traps, not for informs
    auth_protocol: SnmpAuthProtocol = "SHA"
    auth_key: str = ""
    priv_protocol: SnmpPrivProtocol = "AES"
    priv_key: str = ""

    def __post_init__(self) -> None:
        _check_usm(self.user, self.auth_key, self.priv_key)
        if self.engine_id and not re.fullmatch(r"(0x)?([0-9A-Fa-f]{2}){5,32}", self.engine_id):
            raise ValueError(
                f"engine_id: expected 5 to 32 bytes in hex (e.g. 0x8000000001020304), got {self.engine_id!r}"
            )


class SnmpConfig(Section, frozen=True):
    targets: list[SnmpTarget] = msgspec.field(default_factory=list)
    interval_s: Seconds = 60.0
    trap_listen: str = ""  # host:port, e.g. 0.0.0.0:162; empty: no trap receiver
    trap_communities: list[Annotated[str, msgspec.Meta(min_length=1)]] = msgspec.field(default_factory=list)
    trap_users: list[SnmpUser] = msgspec.field(default_factory=list)

    def __post_init__(self) -> None:
        check_address(self.trap_listen, "trap_listen", allow_empty=True)
        if self.trap_listen and not (self.trap_communities or self.trap_users):
            raise ValueError("trap_listen: the trap receiver needs trap_communities and/or trap_users")
        names = [target.name for target in self.targets]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"targets: target name {name!r} is used twice")


class SnmpAgentConfig(AgentConfig, frozen=True):
    snmp: SnmpConfig = SnmpConfig()
