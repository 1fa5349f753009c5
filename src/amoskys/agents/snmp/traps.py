"""The SNMP trap receiver of the snmp agent, and the USM protocol names both sides use.

Accepts SNMPv1/v2c traps carrying one of `snmp.trap_communities` and SNMPv3 traps and informs
from `snmp.trap_users` (authPriv). A v3 *trap* is authenticated with keys localized to the
sender's engine, so its user needs the sender's `engine_id`; an *inform* is answered by this
receiver's own engine and needs none. Rejected messages (bad community, unknown user, wrong
digest, ...) are counted from the engine's own statistics, never logged with their credentials.
An inform sender's engine-ID discovery (RFC 3414 4: a noAuthNoPriv message without an engine ID,
answered with a report) is part of the protocol, not a rejection: it is counted on its own.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pysnmp.carrier.asyncio.dgram import udp, udp6  # type: ignore[import-untyped]
from pysnmp.entity import config as engine_config  # type: ignore[import-untyped]
from pysnmp.entity import engine as snmp_engine
from pysnmp.entity.rfc3413 import ntfrcv  # type: ignore[import-untyped]
from pysnmp.proto import errind  # type: ignore[import-untyped]
from pysnmp.proto.api import v2c  # type: ignore[import-untyped]

from amoskys.agents.snmp.config import SnmpConfig
from amoskys.config import parse_address
from amoskys.errors import ConfigError

__all__ = ["Trap", "TrapReceiver", "auth_protocol", "bind_trap_socket", "priv_protocol"]

log = logging.getLogger(__name__)

AUTH_PROTOCOLS = {
    "SHA": engine_config.USM_AUTH_HMAC96_SHA,
    "SHA256": engine_config.USM_AUTH_HMAC192_SHA256,
    "SHA512": engine_config.USM_AUTH_HMAC384_SHA512,
}
PRIV_PROTOCOLS = {
    "AES": engine_config.USM_PRIV_CFB128_AES,
    "AES256": engine_config.USM_PRIV_CFB256_AES_BLUMENTHAL,  # net-snmp's AES256 (draft-blumenthal-aes-usm)
}
SYS_UPTIME, TRAP_OID = "1.3.6.1.2.1.1.3.0", "1.3.6.1.6.3.1.1.4.1.0"
TRAP_COMMUNITY = "1.3.6.1.6.3.18.1.4.0"  # snmpTrapCommunity: a v1 trap's community, never reported
VERSIONS = {0: "1", 1: "2c", 3: "3"}
NO_AUTH_NO_PRIV = 1  # msgFlags security level
MAX_VARBINDS, MAX_VALUE_CHARS = 64, 1024
# The engine's statistics of refused messages, as (MIB, symbol) -> reason label.
REJECTION_COUNTERS = {
    ("__SNMPv2-MIB", "snmpInBadCommunityNames"): "bad_community",
    ("__SNMPv2-MIB", "snmpInASNParseErrs"): "malformed",
    ("__SNMP-USER-BASED-SM-MIB", "usmStatsUnknownUserNames"): "unknown_user",
    ("__SNMP-USER-BASED-SM-MIB", "usmStatsWrongDigests"): "auth_failure",
    ("__SNMP-USER-BASED-SM-MIB", "usmStatsDecryptionErrors"): "decryption_error",
    ("__SNMP-USER-BASED-SM-MIB", "usmStatsUnknownEngineIDs"): "unknown_engine_id",
    ("__SNMP-USER-BASED-SM-MIB", "usmStatsNotInTimeWindows"): "not_in_time_window",
    ("__SNMP-USER-BASED-SM-MIB", "usmStatsUnsupportedSecLevels"): "unsupported_security_level",
}


def auth_protocol(name: str) -> Any:
    return AUTH_PROTOCOLS[name]


def priv_protocol(name: str) -> Any:
    return PRIV_PROTOCOLS[name]


def bind_trap_socket(listen: str) -> socket.socket:
    """The receiver's UDP socket, bound now; ConfigError says why a port cannot be had."""
    host, port = parse_address(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        hint = ""
        if exc.errno == errno.EACCES and port < 1024:
            hint = " (ports below 1024 need CAP_NET_BIND_SERVICE, e.g. AmbientCapabilities= in the unit)"
        raise ConfigError(f"snmp.trap_listen {listen}: cannot bind: {exc.strerror}{hint}") from None
    sock.setblocking(False)
    return sock


@dataclass
class Trap:
    """One accepted trap or inform."""

    source: str  # sender address
    version: str  # 1, 2c or 3
    user: str  # SNMPv3 user name ("" for v1/v2c: community indexes are not names)
    trap_oid: str
    uptime_ticks: int
    varbinds: dict[str, str] = field(default_factory=dict)


def _value_text(value: Any) -> str:
    if isinstance(value, v2c.OctetString) and not isinstance(value, v2c.IpAddress):  # text if UTF-8 text, else hex
        raw = bytes(value)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = ""
        if not text or not all(c.isprintable() or c in "\t\r\n" for c in text):
            text = "0x" + raw.hex() if raw else ""
    else:
        text = value.prettyPrint()
    return text[:MAX_VALUE_CHARS]


def parse_trap(source: str, version: str, user: str, var_binds: Any) -> Trap:
    """The notification's varbinds as a Trap: sysUpTime and snmpTrapOID lifted out, the rest kept."""
    trap = Trap(source, version, user, "", 0)
    for name, value in var_binds:
        oid = str(name)
        if oid == SYS_UPTIME:
            trap.uptime_ticks = int(value)
        elif oid == TRAP_OID:
            trap.trap_oid = str(value.prettyPrint())
        elif oid != TRAP_COMMUNITY and len(trap.varbinds) < MAX_VARBINDS:
            trap.varbinds[oid] = _value_text(value)
    return trap


class TrapReceiver:
    """A pysnmp notification receiver on an already bound socket; `deliver` gets every accepted Trap."""

    def __init__(self, settings: SnmpConfig, sock: socket.socket, deliver: Callable[[Trap], None]) -> None:
        self.deliver = deliver
        self.engine = snmp_engine.SnmpEngine()
        ipv6 = sock.family == socket.AF_INET6
        transport = (udp6.Udp6Transport if ipv6 else udp.UdpTransport)().open_server_mode(sock=sock)
        engine_config.add_transport(self.engine, udp6.DOMAIN_NAME if ipv6 else udp.DOMAIN_NAME, transport)
        for number, community in enumerate(settings.trap_communities, 1):
            engine_config.add_v1_system(self.engine, f"trap-community-{number}", community)
        for user in settings.trap_users:
            engines = [None] + ([v2c.OctetString(hexValue=user.engine_id.removeprefix("0x"))] if user.engine_id else [])
            for engine_id in engines:
                engine_config.add_v3_user(
                    self.engine, user.user,
                    auth_protocol(user.auth_protocol), user.auth_key, priv_protocol(user.priv_protocol), user.priv_key,
                    securityEngineId=engine_id,
                )  # fmt: skip
        ntfrcv.NotificationReceiver(self.engine, self._received)
        self.discoveries = 0
        self.engine.observer.register_observer(self._security_failure, "rfc3412.prepareDataElements:sm-failure")

    def _security_failure(self, _engine: Any, _point: str, variables: dict[str, Any], _ctx: Any) -> None:
        """The USM refused a message: an unknown engine ID at noAuthNoPriv is a discovery request."""
        unknown_engine = isinstance(variables["statusInformation"].get("errorIndication"), errind.UnknownEngineID)
        if unknown_engine and variables["securityLevel"] == NO_AUTH_NO_PRIV:
            self.discoveries += 1

    def _received(self, engine: Any, state: Any, _ctx_engine: Any, _ctx_name: Any, var_binds: Any, _cb: Any) -> None:
        _domain, address = engine.message_dispatcher.get_transport_info(state)
        request = engine.observer.get_execution_context("rfc3412.receiveMessage:request") or {}
        version = VERSIONS.get(int(request.get("messageProcessingModel", 1)), "?")
        user = str(request.get("securityName", "")) if version == "3" else ""
        source = str(address[0]).removeprefix("::ffff:")  # IPv4 senders on a dual-stack [::] socket
        try:
            trap = parse_trap(source, version, user, var_binds)
        except (ValueError, TypeError) as exc:
            log.warning("snmp trap not understood", extra={"source": source, "error": str(exc)})
            return
        self.deliver(trap)

    def rejected(self) -> dict[str, int]:
        """Messages the engine refused so far, by reason (from its SNMPv2-MIB and USM statistics)."""
        builder = self.engine.get_mib_builder()
        counts: dict[str, int] = {}
        for (mib, symbol), reason in REJECTION_COUNTERS.items():
            (counter,) = builder.import_symbols(mib, symbol)
            counts[reason] = counts.get(reason, 0) + int(counter.syntax)
        counts["unknown_engine_id"] -= self.discoveries  # the USM counts discovery requests there too
        return counts

    def close(self) -> None:
        self.engine.close_dispatcher()
