"""snmp: polls SNMP devices (system group, IF-MIB counters as rates, interface changes) and receives traps.

Every target is polled in its own task every `snmp.interval_s`, with its own timeout and retries
(kept by the clock, not by pysnmp's timer ticks), so a slow or dead device delays nobody else. A
poll reads sysName, sysDescr and sysUpTime, then walks the interface table (ifTable + ifXTable:
names, status, 64-bit octet counters, errors, speed) with GETBULK. Each interface takes its 64-bit
counters (ifHCInOctets/ifHCOutOctets) when the device answers them for it, else the 32-bit ones of
ifTable, and ifHighSpeed when present, else ifSpeed. Octet counters become bits per second between
two polls; a 32-bit counter may wrap once, a 64-bit counter that goes back, or any counter after the
device restarted (sysUpTime went back), was reset and gives no rate for that poll. A change of
ifOperStatus/ifAdminStatus is an INTERFACE_CHANGE event; a failed poll is a POLL_ERROR event and
`amoskys_agent_snmp_poll_errors_total{target,reason}`. Communities and keys never appear in logs,
events or error messages.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector
from pysnmp.error import PySnmpError  # type: ignore[import-untyped]
from pysnmp.hlapi.v3arch.asyncio import (  # type: ignore[import-untyped]
    CommunityData,
    ContextData,
    ObjectIdentity,
    ObjectType,
    SnmpEngine,
    Udp6TransportTarget,
    UdpTransportTarget,
    UsmUserData,
    bulk_cmd,
    get_cmd,
)
from pysnmp.proto import errind  # type: ignore[import-untyped]
from pysnmp.proto.rfc1905 import EndOfMibView, NoSuchInstance, NoSuchObject  # type: ignore[import-untyped]

from amoskys.agents.runtime.base import Agent
from amoskys.agents.snmp.config import SnmpAgentConfig, SnmpTarget
from amoskys.agents.snmp.traps import Trap, TrapReceiver, auth_protocol, bind_trap_socket, priv_protocol
from amoskys.v1 import events_pb2

__all__ = [
    "InterfaceTable",
    "SnmpAgent",
    "SnmpMetrics",
    "TargetPoller",
    "counter_delta",
    "engine_slots",
    "walk_columns",
]

log = logging.getLogger(__name__)
Kind = events_pb2.SnmpEvent.Kind
Oid = tuple[int, ...]

SYSTEM = {
    "descr": (1, 3, 6, 1, 2, 1, 1, 1, 0),
    "uptime": (1, 3, 6, 1, 2, 1, 1, 3, 0),
    "name": (1, 3, 6, 1, 2, 1, 1, 5, 0),
}
IF_TABLE, IF_X_TABLE = (1, 3, 6, 1, 2, 1, 2, 2, 1), (1, 3, 6, 1, 2, 1, 31, 1, 1, 1)
COLUMNS: dict[str, Oid] = {  # walked side by side in one GETBULK stream
    "descr": (*IF_TABLE, 2),
    "speed": (*IF_TABLE, 5),
    "admin": (*IF_TABLE, 7),
    "oper": (*IF_TABLE, 8),
    "in_octets32": (*IF_TABLE, 10),
    "in_errors": (*IF_TABLE, 14),
    "out_octets32": (*IF_TABLE, 16),
    "out_errors": (*IF_TABLE, 20),
    "name": (*IF_X_TABLE, 1),
    "in_octets": (*IF_X_TABLE, 6),
    "out_octets": (*IF_X_TABLE, 10),
    "high_speed": (*IF_X_TABLE, 15),
}
WARNING_TRAPS = {"1.3.6.1.6.3.1.1.5.3", "1.3.6.1.6.3.1.1.5.5"}  # linkDown, authenticationFailure
IF_STATUS = {1: "up", 2: "down", 3: "testing", 4: "unknown", 5: "dormant", 6: "notPresent", 7: "lowerLayerDown"}
MAX_REPETITIONS = 10
MAX_BULK_CALLS = 1000  # 10,000 rows per column: a device answering forever is cut off
INTERFACES_PER_EVENT = 256  # keeps a POLL event well under the hub's per-event limit
MISSING = (NoSuchObject, NoSuchInstance, EndOfMibView)
CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")

# (column name -> {ifIndex -> value}) as walked
InterfaceTable = dict[str, dict[int, Any]]
BulkFn = Callable[[list[Oid]], Awaitable[list[tuple[Oid, Any]]]]


class PollError(Exception):
    """A failed poll: `reason` is the metric label, the message is safe to show (no secrets)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class SnmpMetrics:
    """`amoskys_agent_snmp_*`; created unregistered, registered into the runtime's registry."""

    def __init__(self) -> None:
        self.polls = Counter("amoskys_agent_snmp_polls", "Successful polls, by target", ["target"], registry=None)
        self.poll_errors = Counter(
            "amoskys_agent_snmp_poll_errors", "Failed polls, by target and reason", ["target", "reason"], registry=None
        )
        self.poll_seconds = Histogram(
            "amoskys_agent_snmp_poll_seconds", "Duration of a successful poll, by target", ["target"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=None,
        )  # fmt: skip
        self.traps = Counter("amoskys_agent_snmp_traps", "Traps and informs accepted", registry=None)

    def collectors(self) -> list[Counter | Histogram]:
        return [self.polls, self.poll_errors, self.poll_seconds, self.traps]


def secrets_of(config: SnmpAgentConfig) -> list[str]:
    """Every community and key in the snmp section: what no message may contain."""
    snmp = config.snmp
    found = [*snmp.trap_communities]
    for target in snmp.targets:
        found += [target.community, target.auth_key, target.priv_key]
    for user in snmp.trap_users:
        found += [user.auth_key, user.priv_key]
    return [secret for secret in found if secret]


def redact(text: str, secrets: Iterable[str]) -> str:
    """`text` with every secret replaced by ***: the guard on messages that quote library errors."""
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def counter_delta(previous: int, current: int, bits: int) -> int | None:
    """Octets between two readings: a 32-bit counter may wrap once; a 64-bit one that went back was reset."""
    if current >= previous:
        return current - previous
    if bits == 32:
        return current + (1 << 32) - previous
    return None


def _text(value: Any) -> str:
    """A DisplayString as text: trailing NULs (a C string sent with its terminator) dropped, other
    control characters escaped as \\xNN (tab and line ends kept: multi-line sysDescr)."""
    if value is None or isinstance(value, MISSING):
        return ""
    text = bytes(value).rstrip(b"\0").decode("utf-8", "replace")
    return CONTROL_CHARACTERS.sub(lambda found: f"\\x{ord(found.group()):02x}", text)


def _number(value: Any) -> int | None:
    return None if value is None or isinstance(value, MISSING) else int(value)


async def walk_columns(bulk: BulkFn, columns: dict[str, Oid]) -> InterfaceTable:
    """Walk table columns side by side with GETBULK: {column: {index: value}} (single-index tables)."""
    table: InterfaceTable = {name: {} for name in columns}
    cursor = dict(columns)  # column -> the OID to continue after
    for _ in range(MAX_BULK_CALLS):
        if not cursor:
            return table
        names = list(cursor)
        var_binds = await bulk([cursor[name] for name in names])
        if not var_binds:
            return table
        finished: set[str] = set()
        for position, (oid, value) in enumerate(var_binds):
            name = names[position % len(names)]
            prefix = columns[name]
            if name in finished:
                continue
            if isinstance(value, EndOfMibView) or oid[: len(prefix)] != prefix:
                finished.add(name)
                continue
            if oid <= cursor[name]:
                raise PollError("bad_response", f"the device returned a non-increasing OID in column {name}")
            if len(oid) == len(prefix) + 1:
                table[name][oid[-1]] = value
            cursor[name] = oid
        for name in finished:
            del cursor[name]
    raise PollError("bad_response", f"the interface table did not end after {MAX_BULK_CALLS} requests")


@dataclass
class Sample:
    """What the rates and changes of the next poll are computed against."""

    at: float  # time.monotonic() when the table was read
    uptime: int
    octets: dict[int, tuple[int, int, int]]  # ifIndex -> (in, out, counter bits)
    status: dict[int, tuple[str, str]]  # ifIndex -> (oper, admin)


@dataclass
class PollResult:
    system: dict[str, Any]
    interfaces: list[events_pb2.InterfaceStats]
    sample: Sample
    changes: list[tuple[events_pb2.InterfaceStats, tuple[str, str]]] = field(default_factory=list)


def interface_stats(table: InterfaceTable, index: int) -> tuple[events_pb2.InterfaceStats, tuple[int, int, int]]:
    """One interface from the walked columns, and its octet counters (64-bit when the device has them)."""
    column = {name: values.get(index) for name, values in table.items()}
    bits = 64 if _number(column["in_octets"]) is not None and _number(column["out_octets"]) is not None else 32
    in_octets = _number(column["in_octets" if bits == 64 else "in_octets32"]) or 0
    out_octets = _number(column["out_octets" if bits == 64 else "out_octets32"]) or 0
    stats = events_pb2.InterfaceStats(
        index=index,
        name=_text(column["name"]) or _text(column["descr"]),
        oper_status=IF_STATUS.get(_number(column["oper"]) or 0, "unknown"),
        admin_status=IF_STATUS.get(_number(column["admin"]) or 0, "unknown"),
        in_octets=in_octets, out_octets=out_octets,
        in_errors=_number(column["in_errors"]) or 0, out_errors=_number(column["out_errors"]) or 0,
        speed_mbps=speed_mbps(column),
    )  # fmt: skip
    return stats, (in_octets, out_octets, bits)


def speed_mbps(column: dict[str, Any]) -> int:
    """ifHighSpeed (Mbit/s) when the device has it, else ifSpeed (bit/s) rounded to Mbit/s as IF-MIB
    rounds ifHighSpeed (4294 for an ifSpeed at its maximum: "at least 4.29 Gbit/s")."""
    high = _number(column["high_speed"])
    if high is not None:
        return high
    return ((_number(column["speed"]) or 0) + 500_000) // 1_000_000


def build_result(system: dict[str, Any], table: InterfaceTable, at: float, previous: Sample | None) -> PollResult:
    """Interfaces with rates against `previous` (absent on the first poll, after a restart or reset), and
    status changes."""
    uptime = _number(system.get("uptime")) or 0
    restarted = previous is not None and uptime < previous.uptime
    elapsed = at - previous.at if previous else 0.0
    sample = Sample(at, uptime, {}, {})
    result = PollResult(system, [], sample)
    indexes = sorted(set().union(*(values.keys() for values in table.values())))
    for index in indexes:
        stats, octets = interface_stats(table, index)
        sample.octets[index] = octets
        sample.status[index] = (stats.oper_status, stats.admin_status)
        before = previous.octets.get(index) if previous and not restarted else None
        if before is not None and before[2] == octets[2] and elapsed > 0:
            in_delta = counter_delta(before[0], octets[0], octets[2])
            out_delta = counter_delta(before[1], octets[1], octets[2])
            if in_delta is not None:  # else absent: no rate (a reset), which 0 bit/s would misstate
                stats.in_bps = in_delta * 8 / elapsed
            if out_delta is not None:
                stats.out_bps = out_delta * 8 / elapsed
        result.interfaces.append(stats)
        was = previous.status.get(index) if previous else None
        if was is not None and was != sample.status[index]:
            result.changes.append((stats, was))
    return result


def _timeout_hint(target: SnmpTarget) -> str:
    if target.version == 3 and target.context:
        return f"device down or unreachable, a wrong priv_key/priv_protocol, or no context {target.context!r} there?"
    if target.version == 3:
        return "device down or unreachable, or a wrong priv_key/priv_protocol?"
    return "device down or unreachable, a wrong community, or this address not allowed?"


def classify(target: SnmpTarget, indication: Any, secrets: Iterable[str] = ()) -> PollError:
    """A pysnmp error indication as a reason label and an operator's message (no secrets)."""
    attempts = target.retries + 1
    user = f"SNMPv3 user {target.user!r}"
    known: dict[type, tuple[str, str]] = {
        errind.RequestTimedOut: (
            "timeout",
            f"no response within {target.timeout_s:g} s ({attempts} attempt{'s' * (attempts > 1)}): "
            + _timeout_hint(target),
        ),
        errind.WrongDigest: ("auth_failure", f"authentication failed for {user}: wrong auth_key or auth_protocol"),
        errind.AuthenticationFailure: ("auth_failure", f"authentication failed for {user}"),
        errind.UnknownUserName: ("unknown_user", f"the device does not know {user}"),
        errind.UnknownSecurityName: ("unknown_user", f"the device does not know {user}"),
        errind.DecryptionError: ("decryption_error", f"decryption failed for {user}: wrong priv_key or priv_protocol"),
        errind.UnsupportedSecurityLevel: ("unsupported_security_level", f"the device refuses authPriv for {user}"),
        errind.NotInTimeWindow: ("not_in_time_window", "the device's engine time is out of the USM time window"),
        errind.UnknownEngineID: ("unknown_engine_id", "SNMPv3 engine discovery failed"),
    }
    for kind, (reason, message) in known.items():
        if isinstance(indication, kind):
            return PollError(reason, message)
    return PollError("snmp_error", redact(f"SNMP error: {indication}", secrets))


class TargetPoller:
    """Polls one target: system group, then the interface table; keeps the sample for the next rates."""

    def __init__(self, target: SnmpTarget, engine: Any, secrets: list[str]) -> None:
        self.target = target
        self.engine = engine
        self.secrets = secrets
        self.previous: Sample | None = None
        self.context = ContextData(contextName=target.context.encode())
        if target.version == 3:
            self.auth = UsmUserData(
                target.user, authKey=target.auth_key, privKey=target.priv_key,
                authProtocol=auth_protocol(target.auth_protocol), privProtocol=priv_protocol(target.priv_protocol),
            )  # fmt: skip
        else:
            self.auth = CommunityData(target.community, mpModel=1)  # noqa: S508 - v2c when configured so

    async def _transport(self) -> Any:
        """pysnmp counts its timeouts in ticks of its event-loop timer, which fall behind on a busy loop
        (a 2 s timeout took 4 s beside 12 busy targets): the poller keeps its own clock and retries
        (`_request`); pysnmp's timeout, a second later, only clears what it still waits for."""
        target = self.target
        kind = Udp6TransportTarget if ":" in target.address else UdpTransportTarget
        try:
            return await kind.create((target.address, target.port), timeout=target.timeout_s + 1, retries=0)
        except PySnmpError as exc:
            raise PollError("resolve", redact(f"cannot resolve {target.address!r}: {exc}", self.secrets)) from None

    async def _request(self, send: Callable[[], Awaitable[Any]]) -> Any:
        """One request, `retries` + 1 attempts of `timeout_s` each by the clock; the answer, checked."""
        for _ in range(self.target.retries + 1):
            try:
                async with asyncio.timeout(self.target.timeout_s):
                    found = await send()
            except TimeoutError:
                continue
            self._check(*found)
            return found
        raise classify(self.target, errind.requestTimedOut, self.secrets)

    def _check(self, indication: Any, status: Any, index: Any, var_binds: Any) -> None:
        if indication:
            raise classify(self.target, indication, self.secrets)
        if status:
            where = f" at {var_binds[int(index) - 1][0]}" if index and var_binds else ""
            raise PollError("error_status", f"the device answered {status.prettyPrint()}{where}")

    async def poll(self) -> PollResult:
        """One poll; raises PollError (with a safe message) when it fails."""
        try:
            transport = await self._transport()
            system = await self._system(transport)
            table = await walk_columns(lambda oids: self._bulk(transport, oids), COLUMNS)
        except (PySnmpError, OSError) as exc:
            raise PollError("transport", redact(f"{type(exc).__name__}: {exc}", self.secrets)) from None
        try:
            result = build_result(system, table, time.monotonic(), self.previous)
        except (ValueError, TypeError) as exc:  # e.g. a counter column answered with a string
            raise PollError(
                "bad_response", redact(f"the device's answer has the wrong type: {exc}", self.secrets)
            ) from None
        self.previous = result.sample
        return result

    async def _system(self, transport: Any) -> dict[str, Any]:
        objects = [ObjectType(ObjectIdentity(oid)) for oid in SYSTEM.values()]
        found = await self._request(
            lambda: get_cmd(self.engine, self.auth, transport, self.context, *objects, lookupMib=False)
        )
        values = {tuple(oid): value for oid, value in found[3]}
        return {name: values.get(oid) for name, oid in SYSTEM.items()}

    async def _bulk(self, transport: Any, oids: list[Oid]) -> list[tuple[Oid, Any]]:
        objects = [ObjectType(ObjectIdentity(oid)) for oid in oids]
        found = await self._request(
            lambda: bulk_cmd(
                self.engine, self.auth, transport, self.context, 0, MAX_REPETITIONS, *objects, lookupMib=False
            )
        )
        return [(tuple(oid), value) for oid, value in found[3]]


def release_free_memory() -> None:
    """Collect garbage and hand the C heap's free pages back to the kernel (glibc's malloc_trim).

    Each SNMP engine compiles pysnmp's MIB modules from source (twice: pysnmp reads them, then runs
    them with runpy); what start-up freed stays in the process, in the holes of the heap, unless trimmed.
    """
    gc.collect()
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc only; elsewhere nothing to do
    if trim is not None:
        trim(0)


def engine_slots(targets: list[SnmpTarget]) -> list[int]:
    """Which SNMP engine each target uses: all share one (an engine costs ~1 MB), except that pysnmp
    keeps one entry per v3 user name, so the same name with other keys needs an engine of its own."""
    users_by_engine: list[dict[str, tuple[str, ...]]] = []
    slots = []
    for target in targets:
        keys = (target.auth_protocol, target.auth_key, target.priv_protocol, target.priv_key)
        fits = (
            i for i, users in enumerate(users_by_engine) if target.version != 3 or users.get(target.user, keys) == keys
        )
        slot = next(fits, len(users_by_engine))
        if slot == len(users_by_engine):
            users_by_engine.append({})
        if target.version == 3:
            users_by_engine[slot][target.user] = keys
        slots.append(slot)
    return slots


class TrapRejections(Collector):
    """`amoskys_agent_snmp_traps_rejected_total{reason}` and `_engine_discoveries_total`, read from the
    receiver when scraped."""

    def __init__(self, counts: Callable[[], dict[str, int]], discoveries: Callable[[], int]) -> None:
        self.counts, self.discoveries = counts, discoveries

    def collect(self) -> Iterable[CounterMetricFamily]:
        family = CounterMetricFamily(
            "amoskys_agent_snmp_traps_rejected", "Traps and informs refused, by reason", labels=["reason"]
        )
        for reason, count in sorted(self.counts().items()):
            family.add_metric([reason], count)
        yield family
        yield CounterMetricFamily(
            "amoskys_agent_snmp_engine_discoveries",
            "SNMPv3 engine-ID discovery requests answered (inform senders learning this engine's ID)",
            value=self.discoveries(),
        )


class SnmpAgent(Agent[SnmpAgentConfig]):
    kind = "snmp"
    config_type = SnmpAgentConfig
    QUEUE_SIZE = 10_000

    def __init__(self, config: SnmpAgentConfig, state_dir: Path) -> None:
        super().__init__(config, state_dir)
        settings = config.snmp
        self.metrics = SnmpMetrics()
        self.secrets = secrets_of(config)
        # Bound now, so a port that cannot be had stops the agent at start with a clear error.
        self.trap_socket = bind_trap_socket(settings.trap_listen) if settings.trap_listen else None
        self.trap_port = self.trap_socket.getsockname()[1] if self.trap_socket else 0
        self.receiver: TrapReceiver | None = None
        self.trap_drops = 0
        self.start_up_steps_left = 0  # the receiver and each target's first poll (see _start_up_step_done)
        self.queue: asyncio.Queue[events_pb2.Event] = asyncio.Queue(self.QUEUE_SIZE)  # polls and traps
        slots = engine_slots(settings.targets)
        self.engines: list[Any] = [SnmpEngine() for _ in set(slots)]
        self.pollers = [
            TargetPoller(target, self.engines[slot], self.secrets)
            for target, slot in zip(settings.targets, slots, strict=True)
        ]
        release_free_memory()  # what building the engines freed

    def register_metrics(self, registry: CollectorRegistry) -> None:
        for collector in self.metrics.collectors():
            registry.register(collector)
        registry.register(TrapRejections(self.trap_rejections, self.engine_discoveries))

    def reload(self, config: SnmpAgentConfig) -> None:
        """SIGHUP: a new interval applies at once; targets and trap settings need a restart."""
        old, new = self.config.snmp, config.snmp
        if (old.targets, old.trap_listen, old.trap_communities, old.trap_users) != (
            new.targets, new.trap_listen, new.trap_communities, new.trap_users,
        ):  # fmt: skip
            log.warning("snmp targets and trap settings change on restart; the new interval applies now")
        self.config = config

    async def collect(self) -> AsyncIterator[events_pb2.Event]:
        tasks = [asyncio.create_task(self._poll_loop(poller)) for poller in self.pollers]
        if self.trap_socket is not None and self.receiver is None:  # it outlives a restarted collect loop
            self.receiver = TrapReceiver(self.config.snmp, self.trap_socket, self._on_trap)
        log.info(
            "snmp agent running",
            extra={"targets": [p.target.name for p in self.pollers], "trap_port": self.trap_port},
        )
        if not (self.pollers or self.receiver):
            log.warning("snmp agent has nothing to do: no snmp.targets and no snmp.trap_listen")
        self.start_up_steps_left = len(self.pollers) + 1
        self._start_up_step_done()  # the receiver is up; each poll loop reports its first poll
        try:
            while True:
                yield await self.queue.get()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _poll_loop(self, poller: TargetPoller) -> None:
        first = True
        while True:
            started = time.monotonic()
            for event in await self.poll_once(poller):
                await self.queue.put(event)
            if first:
                first = False
                self._start_up_step_done()
            await asyncio.sleep(max(0.0, started + self.config.snmp.interval_s - time.monotonic()))

    def _start_up_step_done(self) -> None:
        """Once the receiver is up and every target was polled once, what start-up freed is released."""
        self.start_up_steps_left -= 1
        if self.start_up_steps_left == 0:
            release_free_memory()

    async def poll_once(self, poller: TargetPoller) -> list[events_pb2.Event]:
        """Poll one target: POLL (+ INTERFACE_CHANGE) events, or one POLL_ERROR event."""
        name = poller.target.name
        started = time.monotonic()
        try:
            result = await poller.poll()
        except PollError as exc:
            return self.poll_error(name, exc)
        except Exception as exc:  # a bug must not end this target's polling silently
            log.exception("snmp poll crashed", extra={"target": name})
            return self.poll_error(name, PollError("internal", f"the agent failed on the answer: {type(exc).__name__}"))
        self.metrics.polls.labels(name).inc()
        self.metrics.poll_seconds.labels(name).observe(time.monotonic() - started)
        return self.poll_events(name, result)

    def poll_error(self, target: str, error: PollError) -> list[events_pb2.Event]:
        """A failed poll: counted, logged (no secrets: PollError messages are made safe) and reported."""
        self.metrics.poll_errors.labels(target, error.reason).inc()
        log.warning("snmp poll failed", extra={"target": target, "reason": error.reason, "error": str(error)})
        body = events_pb2.SnmpEvent(kind=Kind.POLL_ERROR, target=target, error=str(error))
        return [self.event(events_pb2.SEVERITY_WARNING, snmp=body, labels={"reason": error.reason})]

    def poll_events(self, target: str, result: PollResult) -> list[events_pb2.Event]:
        """POLL events (interfaces split into parts on large devices), then one per interface change."""

        def body(kind: int, interfaces: list[events_pb2.InterfaceStats]) -> events_pb2.SnmpEvent:
            return events_pb2.SnmpEvent(
                kind=kind, target=target, interfaces=interfaces,  # type: ignore[arg-type]
                sys_name=_text(result.system.get("name")), sys_descr=_text(result.system.get("descr")),
                sys_uptime_ticks=_number(result.system.get("uptime")) or 0,
            )  # fmt: skip

        every = result.interfaces
        parts = [every[i : i + INTERFACES_PER_EVENT] for i in range(0, len(every), INTERFACES_PER_EVENT)] or [[]]
        events = [
            self.event(snmp=body(Kind.POLL, part), labels={"part": f"{n}/{len(parts)}"} if len(parts) > 1 else {})
            for n, part in enumerate(parts, 1)
        ]
        for stats, (oper, admin) in result.changes:
            link_lost = stats.admin_status == "up" and stats.oper_status != "up"
            severity = events_pb2.SEVERITY_WARNING if link_lost else events_pb2.SEVERITY_INFO
            labels = {"previous_oper_status": oper, "previous_admin_status": admin}
            events.append(self.event(severity, snmp=body(Kind.INTERFACE_CHANGE, [stats]), labels=labels))
        return events

    def _on_trap(self, trap: Trap) -> None:
        try:
            self.queue.put_nowait(self.trap_event(trap))
        except asyncio.QueueFull:
            self.trap_drops += 1
            return
        self.metrics.traps.inc()

    def trap_event(self, trap: Trap) -> events_pb2.Event:
        """A TRAP event; `target` is the one target configured at the sender's address, else the address."""
        named = [target.name for target in self.config.snmp.targets if target.address == trap.source]
        body = events_pb2.SnmpEvent(
            kind=Kind.TRAP, target=named[0] if len(named) == 1 else trap.source, trap_oid=trap.trap_oid,
            sys_uptime_ticks=trap.uptime_ticks, varbinds=trap.varbinds,
        )  # fmt: skip
        labels = {"source": trap.source, "version": trap.version} | ({"user": trap.user} if trap.user else {})
        severity = events_pb2.SEVERITY_WARNING if trap.trap_oid in WARNING_TRAPS else events_pb2.SEVERITY_INFO
        return self.event(severity, snmp=body, labels=labels)

    def engine_discoveries(self) -> int:
        return self.receiver.discoveries if self.receiver is not None else 0

    def trap_rejections(self) -> dict[str, int]:
        """Traps refused by the receiver, by reason, plus those dropped because the agent fell behind."""
        counts = self.receiver.rejected() if self.receiver is not None else {}
        return counts | {"queue_full": self.trap_drops}

    async def close(self) -> None:
        for engine in self.engines:
            engine.close_dispatcher()
        if self.receiver is not None:
            self.receiver.close()
        elif self.trap_socket is not None:
            self.trap_socket.close()
