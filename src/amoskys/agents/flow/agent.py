"""flow: bidirectional network flows from live capture (AF_PACKET + BPF) or a pcap/pcapng replay.

A flow is keyed by its 5-tuple (plus VLAN and interface) in the direction of its initiator: the
sender of its first packet, or for TCP the sender of the SYN (a SYN-ACK seen first makes its
receiver the initiator). It counts packets, IP bytes and TCP flags each way and ends with a
`flow` event when:

- TCP: both sides sent FIN, or one sent RST, plus `CLOSE_GRACE_NS` for the last ACKs (FIN / RST);
- no packet for `flow.idle_timeout_s` (IDLE_TIMEOUT);
- it has lasted `flow.active_timeout_s`: that slice is reported (ACTIVE_TIMEOUT), counters start
  over and the flow goes on;
- the table holds `flow.max_flows` and a new flow needs room: one not seen lately goes (EVICTED,
  counted in `amoskys_agent_flow_evicted_total`);
- the agent stops or the pcap ends (SHUTDOWN).

Time is the packets' own: kernel timestamps live, file timestamps in a replay, so a replay gives
the same flows every time.

A fragmented datagram counts into its flow whole: the first fragment carries the ports, and the
later ones (no transport header) are attributed by `Fragments`, a bounded cache keyed by source,
destination, protocol and IP id (IPv6: fragment id) that forgets a datagram `FRAGMENT_TTL_NS`
after its first fragment seen. A later fragment that arrives before its first is held until then;
one whose first never comes is counted in `amoskys_agent_flow_fragments_unattributed_total`,
never made a flow of its own.

Live, one AF_PACKET socket per interface (CAP_NET_RAW; the BPF filter compiled by libpcap) is
read by a thread of its own, so the event loop's outbox writes never stall the capture; frames
the kernel still drops are counted (`amoskys_agent_flow_kernel_drops_total`). A replay
(`flow.pcap`, `amoskys agent flow --pcap FILE`) reads the file on the event loop, reports every
flow still open at its end as SHUTDOWN, and the command exits once the hub has them all.
"""

from __future__ import annotations

import array
import asyncio
import collections
import errno
import itertools
import logging
import selectors
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from amoskys.agents.flow.config import FlowAgentConfig, FlowConfig
from amoskys.agents.flow.packets import (
    FRAGMENT_FIRST,
    SUPPORTED_LINKTYPES,
    BpfError,
    Capture,
    Frame,
    Parsed,
    PcapReader,
    Record,
    compile_bpf,
    parse_frame,
)
from amoskys.agents.runtime.base import Agent
from amoskys.errors import ConfigError
from amoskys.v1 import events_pb2

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

__all__ = ["FlowAgent", "FlowTable", "Fragments"]

log = logging.getLogger(__name__)
EndReason = events_pb2.FlowEvent.EndReason
SEC = 1_000_000_000
TICK_NS = SEC  # timeouts are checked once a second (of packet time)
CLOSE_GRACE_NS = 2 * SEC  # after both FINs or a RST: the last ACKs still belong to the flow
FIN, SYN, RST, ACK = 0x01, 0x02, 0x04, 0x10
READ_BUDGET = 4096  # frames read from one socket before looking at the others and the clock
POLL_S = 0.1  # the capture thread checks the clock and whether to stop at least this often
REPLAY_BATCH = 4096  # records replayed between yields to the event loop
YIELD_EVERY = 1000  # events handed over between yields to the event loop
NEVER = 1 << 62
LOW_BEGAN = 1  # the key's first (lower) side began the flow
FIN_LOW, FIN_HIGH = 2, 4  # each side's FIN seen
RECENT = 8  # seen since the eviction clock last passed (second chance)

# A flow's key: lower address, higher address, their ports, protocol, vlan, interface index; the
# lower side is the one whose (address, port) sorts first, so both directions find the same key.
KEY_TAIL = struct.Struct(">HHBHH")
KEY_V4 = struct.Struct(">4s4sHHBHH")
KEY_V6 = struct.Struct(">16s16sHHBHH")
_key_tail = KEY_TAIL.pack
_fragment_tail = struct.Struct(">QHH").pack  # id << 8 | protocol, vlan, interface (after src + dst)
FRAGMENT_TTL_NS = 5 * SEC  # a datagram's fragments arrive within ms; the kernel gives reassembly 30 s
MAX_DATAGRAMS = 10_000  # fragmented datagrams remembered at once (about 200 bytes each)
MAX_HELD = 64  # later fragments held for one datagram whose first fragment has not come yet

# A reported flow: key, state bits, first_ns, last_ns, packets and bytes out and in, flags, end reason
Ended = tuple[bytes, int, int, int, int, int, int, int, int, int]


class Fragments:
    """Which ports the later fragments of a datagram take: its first fragment's (bounded, time-limited).

    Datagrams are remembered in arrival order with a deadline, so expiry and eviction take the oldest.
    """

    def __init__(self) -> None:
        # datagram key -> [deadline, src_port, dst_port, lengths of the later fragments held]
        # (ports -1: the first fragment has not come yet)
        self.datagrams: dict[bytes, list[Any]] = {}
        self.unattributed = 0  # later fragments whose first never came (or that did not fit)

    def first(self, key: bytes, ts: int, sport: int, dport: int) -> list[int]:
        """Remember the ports of datagram `key`; the lengths of its later fragments held until now."""
        entry = self.datagrams.get(key)
        if entry is None:
            self._make_room()
            self.datagrams[key] = [ts + FRAGMENT_TTL_NS, sport, dport, []]
            return []
        held = entry[3]
        entry[1:] = [sport, dport, []]
        return held  # type: ignore[no-any-return]

    def later(self, key: bytes, ts: int, length: int) -> tuple[int, int] | None:
        """The ports of datagram `key`, or None: this fragment is held until its first (or counted lost)."""
        entry = self.datagrams.get(key)
        if entry is None:
            self._make_room()
            self.datagrams[key] = [ts + FRAGMENT_TTL_NS, -1, -1, [length]]
            return None
        if entry[1] >= 0:
            return entry[1], entry[2]
        if len(entry[3]) < MAX_HELD:
            entry[3].append(length)
        else:
            self.unattributed += 1
        return None

    def _make_room(self) -> None:
        if len(self.datagrams) >= MAX_DATAGRAMS:
            self._forget(next(iter(self.datagrams)))

    def _forget(self, key: bytes) -> None:
        self.unattributed += len(self.datagrams.pop(key)[3])

    def expire(self, now: int) -> None:
        """Forget the datagrams past their deadline (the oldest first); what they held is unattributed."""
        datagrams = self.datagrams
        while datagrams:
            key = next(iter(datagrams))
            if datagrams[key][0] > now:
                return
            self._forget(key)

    def clear(self) -> None:
        while self.datagrams:
            self._forget(next(iter(self.datagrams)))


class FlowTable:
    """The bounded flow table, in columns: an array per field and a row per flow (about 200 bytes a flow).

    `add` counts parsed packets, `expire` applies the timeouts at a time, and `take` hands out the
    flows that ended as events. A full table evicts a flow not seen lately (the clock algorithm:
    a flow seen since the clock hand last passed gets a second chance).
    """

    def __init__(self, settings: FlowConfig, interface_name: Callable[[int], str]) -> None:
        self.rows: dict[bytes, int] = {}  # key -> row
        self.keys: list[bytes] = []  # row -> key; b"" for a free row
        self.free = array.array("I")
        self.first, self.last = array.array("q"), array.array("q")
        self.due = array.array("q")  # first + active timeout, or close time if sooner; 0: empty slice
        self.packets_out, self.bytes_out = array.array("Q"), array.array("Q")
        self.packets_in, self.bytes_in = array.array("Q"), array.array("Q")
        self.flags = array.array("H")  # the initiator's TCP flags | the responder's << 8
        self.state = array.array("B")
        self.closing: dict[int, tuple[int, int]] = {}  # row -> (close time, FIN or RST)
        self.ended: list[Ended] = []
        self.ending_all = False
        self.hand = 0
        self.interface_name = interface_name
        self.evicted = 0
        self.reported: collections.Counter[int] = collections.Counter()
        self.next_tick = 0
        self.fragments = Fragments()
        self.configure(settings)

    def configure(self, settings: FlowConfig) -> None:
        self.idle = int(settings.idle_timeout_s * SEC)
        self.active = int(settings.active_timeout_s * SEC)
        self.max_flows = settings.max_flows

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, ts: int, iface: int, packet: Parsed) -> None:
        """Count one packet (`ts` in ns) into its flow, creating, ending or slicing flows as due."""
        if ts >= self.next_tick:
            self.expire(ts)
        protocol, src, sport, dst, dport, flags, length, vlan, fragment = packet
        if fragment:
            ports = self._fragment_ports(ts, iface, packet)
            if ports is None:
                return
            sport, dport = ports
        low_sends = src < dst or (src == dst and sport <= dport)
        if low_sends:
            key = src + dst + _key_tail(sport, dport, protocol, vlan, iface)
        else:
            key = dst + src + _key_tail(dport, sport, protocol, vlan, iface)
        row = self.rows.get(key)
        if row is None or ts >= self.due[row] or ts - self.last[row] >= self.idle:
            row = self._row_after_deadline(key, row, ts, low_sends, protocol == 6 and flags & (SYN | ACK) == SYN | ACK)
        states = self.state
        state = states[row]
        states[row] = state | RECENT
        self.last[row] = ts
        if (state & LOW_BEGAN != 0) == low_sends:  # from the initiator
            self.packets_out[row] += 1
            self.bytes_out[row] += length
            self.flags[row] |= flags
        else:
            self.packets_in[row] += 1
            self.bytes_in[row] += length
            self.flags[row] |= flags << 8
        if flags & (FIN | RST) and protocol == 6:
            self._tcp_end(row, flags, low_sends, ts)

    def _fragment_ports(self, ts: int, iface: int, packet: Parsed) -> tuple[int, int] | None:
        """A fragment's ports: a first fragment's own (the later ones held for it are counted now), a
        later one's from its datagram's first; None while that has not come (it is held)."""
        protocol, src, sport, dst, dport, _, length, vlan, fragment = packet
        key = src + dst + _fragment_tail(fragment >> 2, vlan, iface)
        if fragment & FRAGMENT_FIRST:
            for held in self.fragments.first(key, ts, sport, dport):
                self.add(ts, iface, (protocol, src, sport, dst, dport, 0, held, vlan, 0))
            return sport, dport
        return self.fragments.later(key, ts, length)

    def _row_after_deadline(self, key: bytes, row: int | None, ts: int, low_sends: bool, syn_ack: bool) -> int:
        """The row for a packet of a new flow, or of a flow past a deadline (which may end it first)."""
        if row is not None and not self._deadline(row, ts):
            if not self.due[row]:  # a new slice begins with this packet
                self.first[row] = ts
                self.due[row] = min(ts + self.active, self.closing.get(row, (NEVER, 0))[0])
            return row
        # a new flow: its sender began it, unless it is a SYN-ACK (we missed the SYN: its receiver began)
        return self._start(key, ts, low_sends != syn_ack)

    def _start(self, key: bytes, ts: int, began_low: bool) -> int:
        while len(self.rows) >= self.max_flows:
            self._evict()
        row = self.free.pop() if self.free else self._grow()
        self.rows[key], self.keys[row] = row, key
        self.first[row] = self.last[row] = ts
        self.due[row] = ts + self.active
        self.packets_out[row] = self.bytes_out[row] = self.packets_in[row] = self.bytes_in[row] = self.flags[row] = 0
        self.state[row] = LOW_BEGAN if began_low else 0
        return row

    def _grow(self) -> int:
        for column in (self.first, self.last, self.due, self.packets_out, self.bytes_out, self.packets_in,
                       self.bytes_in, self.flags, self.state):  # fmt: skip
            column.append(0)
        self.keys.append(b"")
        return len(self.keys) - 1

    def _evict(self) -> None:
        keys, state = self.keys, self.state
        while True:
            row, self.hand = self.hand, (self.hand + 1) % len(keys)
            if not keys[row]:
                continue
            if state[row] & RECENT:
                state[row] &= ~RECENT
                continue
            self.evicted += 1
            self._end(row, EndReason.EVICTED)
            return

    def _deadline(self, row: int, now: int) -> bool:
        """End the flow (True) if it closed or idled out by `now`; report its slice if that is due."""
        closing = self.closing.get(row)
        if closing is not None and now >= closing[0]:
            self._end(row, closing[1])
            return True
        if now - self.last[row] >= self.idle:
            self._end(row, EndReason.IDLE_TIMEOUT)
            return True
        if self.due[row] and now - self.first[row] >= self.active:
            self._report(row, EndReason.ACTIVE_TIMEOUT)
            self.packets_out[row] = self.bytes_out[row] = self.packets_in[row] = self.bytes_in[row] = 0
            self.flags[row] = self.due[row] = 0  # the counters start over; the next packet opens a slice
        return False

    def _tcp_end(self, row: int, flags: int, low_sends: bool, ts: int) -> None:
        """Both FINs or a RST: the flow closes after CLOSE_GRACE_NS (the last ACKs still count)."""
        if row in self.closing:
            return
        if flags & RST:
            reason = EndReason.RST
        else:
            state = self.state[row] = self.state[row] | (FIN_LOW if low_sends else FIN_HIGH)
            if state & (FIN_LOW | FIN_HIGH) != FIN_LOW | FIN_HIGH:
                return
            reason = EndReason.FIN
        close_at = ts + CLOSE_GRACE_NS
        self.closing[row] = (close_at, reason)
        self.due[row] = min(self.due[row], close_at)

    def _report(self, row: int, reason: int) -> None:
        if self.packets_out[row] or self.packets_in[row]:  # empty: its last slice was reported already
            self.ended.append((self.keys[row], self.state[row], self.first[row], self.last[row],
                               self.packets_out[row], self.bytes_out[row], self.packets_in[row],
                               self.bytes_in[row], self.flags[row], reason))  # fmt: skip

    def _end(self, row: int, reason: int) -> None:
        self._report(row, reason)
        del self.rows[self.keys[row]]
        self.keys[row] = b""
        self.closing.pop(row, None)
        self.free.append(row)

    def expire(self, now: int) -> None:
        """End or slice every flow whose deadline is at or before `now` (ns)."""
        self.next_tick = now + TICK_NS
        self.fragments.expire(now)
        last, due, idle = self.last, self.due, self.idle
        for row, key in enumerate(self.keys):
            if key and (now - last[row] >= idle or 0 < due[row] <= now):
                self._deadline(row, now)

    def end_all(self) -> None:
        """End every open flow (SHUTDOWN, or FIN/RST if it was closing) as `take` hands them out;
        fragments still waiting for their first are unattributed."""
        self.ending_all = True
        self.fragments.clear()

    def take(self) -> Iterator[events_pb2.FlowEvent]:
        """The flows that ended, as events built one at a time (ending a capture can end 100,000)."""
        while self.ended:
            ended, self.ended = self.ended, []
            for flow in ended:
                yield self._event(*flow)
        if self.ending_all:
            self.ending_all = False
            for row, key in enumerate(self.keys):
                if key:
                    self._end(row, self.closing.get(row, (0, EndReason.SHUTDOWN))[1])
                    while self.ended:
                        yield self._event(*self.ended.pop())

    def _event(self, key: bytes, state: int, first: int, last: int, packets_out: int, bytes_out: int,
               packets_in: int, bytes_in: int, flags: int, reason: int) -> events_pb2.FlowEvent:  # fmt: skip
        layout, family = (KEY_V4, socket.AF_INET) if len(key) == KEY_V4.size else (KEY_V6, socket.AF_INET6)
        low, high, low_port, high_port, protocol, vlan, iface = layout.unpack(key)
        src, sport, dst, dport = (
            (low, low_port, high, high_port) if state & LOW_BEGAN else (high, high_port, low, low_port)
        )
        self.reported[reason] += 1
        return events_pb2.FlowEvent(
            interface=self.interface_name(iface), protocol=protocol, vlan=vlan,
            src_ip=socket.inet_ntop(family, src), src_port=sport, dst_ip=socket.inet_ntop(family, dst), dst_port=dport,
            packets_out=packets_out, bytes_out=bytes_out, packets_in=packets_in, bytes_in=bytes_in,
            tcp_flags_out=flags & 0xFF, tcp_flags_in=flags >> 8, first_ns=first, last_ns=last,
            end_reason=reason,  # type: ignore[arg-type]
        )  # fmt: skip


class FlowAgent(Agent[FlowAgentConfig]):
    kind = "flow"
    config_type = FlowAgentConfig

    def __init__(self, config: FlowAgentConfig, state_dir: Path) -> None:
        super().__init__(config, state_dir)
        settings = config.flow
        self.packets = 0
        self.skipped: collections.Counter[str] = collections.Counter()
        self.kernel_drops = 0
        self.interface_downs = 0
        self.file_problems = 0
        self.captures: list[Capture] = []
        self.handed: collections.deque[events_pb2.FlowEvent] = collections.deque()  # from the capture thread
        self.replayed = asyncio.Event()  # set once a pcap has been read to its end
        self.reader: PcapReader | None = None
        if settings.pcap:
            self.reader = _open_pcap(Path(settings.pcap))
            self.table = FlowTable(settings, self._file_interface)
        else:
            _check_live(settings)
            self.table = FlowTable(settings, settings.interfaces.__getitem__)

    def _file_interface(self, index: int) -> str:
        assert self.reader is not None
        return self.reader.interfaces[index].name

    def reload(self, config: FlowAgentConfig) -> None:
        old, new = self.config.flow, config.flow
        if (old.interfaces, old.bpf, old.promiscuous) != (new.interfaces, new.bpf, new.promiscuous):
            log.warning("flow: interfaces, bpf and promiscuous take effect at the next start")
        self.table.configure(new)
        self.config = config

    def register_metrics(self, registry: CollectorRegistry) -> None:
        registry.register(_FlowMetrics(self))

    async def collect(self) -> AsyncIterator[events_pb2.Event]:
        flows = self._replay() if self.reader is not None else self._capture()
        count = 0
        async for flow in flows:
            yield self.event(flow=flow)
            count += 1
            if count % YIELD_EVERY == 0:
                await asyncio.sleep(0)

    def shutdown_events(self) -> Iterator[events_pb2.Event]:
        """Flows still open when the agent stops: SHUTDOWN (or FIN/RST if they were closing)."""
        self.table.end_all()
        return (self.event(flow=flow) for flow in itertools.chain(_drain(self.handed), self.table.take()))

    async def close(self) -> None:
        if self.reader is not None:
            self.reader.close()

    # ---- pcap replay ----

    async def _replay(self) -> AsyncIterator[events_pb2.FlowEvent]:
        """Count the file's packets into the table, a batch at a time; at its end every flow ends."""
        reader = self.reader
        assert reader is not None
        records = reader.records()
        more = True
        while more:
            more = self._replay_batch(reader, records)
            if not more:
                if reader.problem:
                    self.file_problems += 1
                    log.warning("flow: pcap replay stopped early", extra={"problem": reader.problem})
                self.table.end_all()
            for flow in self.table.take():
                yield flow
            await asyncio.sleep(0)
        log.info("flow: pcap replayed", extra={"records": reader.records_read, "packets": self.packets})
        self.replayed.set()

    def _replay_batch(self, reader: PcapReader, records: Iterator[Record]) -> bool:
        """Count up to REPLAY_BATCH records into the table; False once the file is exhausted."""
        interfaces, add, skipped = reader.interfaces, self.table.add, self.skipped
        counted = 0
        for count, (ts, iface, buf, start, end, wire) in enumerate(records, 1):
            parsed = parse_frame(buf, start, end, wire, interfaces[iface].linktype)
            if isinstance(parsed, str):
                skipped[parsed] += 1
            else:
                counted += 1
                add(ts, iface, parsed)
            if count == REPLAY_BATCH:
                self.packets += counted
                return True
        self.packets += counted
        return False

    # ---- live capture ----

    async def _capture(self) -> AsyncIterator[events_pb2.FlowEvent]:
        """Open the capture sockets; a thread reads them (an outbox fsync on this loop must not stall it)."""
        settings, loop, wake = self.config.flow, asyncio.get_running_loop(), asyncio.Event()
        reader = CaptureThread(self, lambda: loop.call_soon_threadsafe(wake.set))
        try:
            for name in settings.interfaces:
                self.captures.append(_open_capture(name, settings))
            reader.start()
            while True:
                await wake.wait()
                wake.clear()
                for flow in _drain(self.handed):
                    yield flow
                if reader.failure is not None:
                    raise reader.failure
        finally:
            reader.stop()
            for capture in self.captures:
                capture.close()
            self.captures = []


class CaptureThread(threading.Thread):
    """Reads the agent's capture sockets into its table; ended flows go to `agent.handed` (a deque)."""

    def __init__(self, agent: FlowAgent, notify: Callable[[], object]) -> None:
        super().__init__(name="flow-capture", daemon=True)
        self.agent, self.notify = agent, notify
        self.stopping = threading.Event()
        self.failure: Exception | None = None

    def stop(self) -> None:
        if self.is_alive():
            self.stopping.set()
            self.join()

    def run(self) -> None:
        try:
            self._read_until_stopped(self.agent.captures)
        except Exception as exc:  # a capture that failed for good (or a bug): the runtime restarts the collector
            self.failure = exc
            self.notify()

    def _read_until_stopped(self, captures: list[Capture]) -> None:
        with selectors.DefaultSelector() as selector:
            for index, capture in enumerate(captures):
                selector.register(capture.sock, selectors.EVENT_READ, index)
            while not self.stopping.is_set():
                for key, _ in selector.select(POLL_S):
                    self._read(key.data, captures[key.data])
                self._tick(captures)

    def _read(self, index: int, capture: Capture) -> None:
        try:
            frames = capture.read(READ_BUDGET)
        except OSError as exc:
            if exc.errno == errno.ENETDOWN and capture.still_there():
                self.agent.interface_downs += 1
                log.warning(
                    "flow: interface down; capture resumes when it is up", extra={"interface": capture.interface}
                )
                return
            raise OSError(exc.errno, f"flow: capture on {capture.interface} failed: {exc.strerror}") from None
        self._count(index, capture.linktype, frames)

    def _count(self, index: int, linktype: int, frames: list[Frame]) -> None:
        agent, add, skipped = self.agent, self.agent.table.add, self.agent.skipped
        for ts, data, wire, vlan in frames:
            parsed = parse_frame(data, 0, len(data), wire, linktype, vlan)
            if isinstance(parsed, str):
                skipped[parsed] += 1
            else:
                agent.packets += 1
                add(ts, index, parsed)

    def _tick(self, captures: list[Capture]) -> None:
        """Timeouts by the clock (packets may stop coming); hand ended flows over; kernel drops."""
        table, now = self.agent.table, time.time_ns()
        if now >= table.next_tick:
            table.expire(now)
            for capture in captures:
                self.agent.kernel_drops += capture.kernel_drops()
        if table.ended:
            self.agent.handed.extend(table.take())
            self.notify()


def _drain(handed: collections.deque[events_pb2.FlowEvent]) -> Iterator[events_pb2.FlowEvent]:
    while handed:
        yield handed.popleft()


def _open_pcap(path: Path) -> PcapReader:
    try:
        reader = PcapReader(path)
    except FileNotFoundError:
        raise ConfigError(f"flow.pcap: {path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"flow.pcap: {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ConfigError(f"flow.pcap: {exc}") from None
    for interface in reader.interfaces:
        if interface.linktype not in SUPPORTED_LINKTYPES:
            reader.close()
            raise ConfigError(f"flow.pcap: {path}: link type {interface.linktype} is not supported "
                              "(Ethernet, raw IP and Linux cooked captures are)")  # fmt: skip
    return reader


def _check_live(settings: FlowConfig) -> None:
    """Refuse to start without interfaces, with one this host lacks, or with a filter that does not compile."""
    if not settings.interfaces:
        raise ConfigError("flow.interfaces: empty; name the interfaces to capture on (e.g. [eth0]) or replay a pcap")
    for name in settings.interfaces:
        try:
            socket.if_nametoindex(name)
        except OSError:
            raise ConfigError(f"flow.interfaces: no interface {name!r} on this host") from None
    if settings.bpf:
        try:
            compile_bpf(settings.bpf)
        except BpfError as exc:
            raise ConfigError(f"flow.bpf: {exc}") from None


def _open_capture(name: str, settings: FlowConfig) -> Capture:
    try:
        return Capture(name, settings.bpf, settings.promiscuous)
    except BpfError as exc:  # e.g. a filter valid for Ethernet but not for this interface's link type
        raise ConfigError(f"flow.bpf on {name}: {exc}") from None
    except OSError as exc:
        raise OSError(exc.errno, f"flow: cannot capture on {name}: {exc.strerror or exc}") from None


class _FlowMetrics:
    """`amoskys_agent_flow_*`, read from the agent's plain counters at scrape time (nothing per packet)."""

    def __init__(self, agent: FlowAgent) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        agent, table = self.agent, self.agent.table
        yield CounterMetricFamily(
            "amoskys_agent_flow_packets", "IP packets read (counted into flows, or fragments held)", value=agent.packets
        )
        skipped = CounterMetricFamily(
            "amoskys_agent_flow_frames_skipped",
            "Frames not counted, by reason (non_ip, truncated, ...)",
            labels=["reason"],
        )
        for reason, count in sorted(dict(agent.skipped).items()):
            skipped.add_metric([reason], count)
        yield skipped
        reported = CounterMetricFamily("amoskys_agent_flow_reported", "Flows reported, by end", labels=["reason"])
        for end, count in sorted(dict(table.reported).items()):
            reported.add_metric([EndReason.Name(end)], count)  # type: ignore[arg-type]
        yield reported
        for name, text, value in (
            ("evicted", "Flows evicted from a full table (reported as EVICTED)", table.evicted),
            ("kernel_drops", "Frames the kernel dropped (socket buffer full)", agent.kernel_drops),
            (
                "interface_downs",
                "Times a capture interface went down (capture resumes when it is up)",
                agent.interface_downs,
            ),
            ("file_problems", "Pcap files cut short or corrupt", agent.file_problems),
            (
                "fragments_unattributed",
                "Later IP fragments whose datagram's first fragment never came (not counted into a flow)",
                table.fragments.unattributed,
            ),
        ):
            yield CounterMetricFamily(f"amoskys_agent_flow_{name}", text, value=value)
        yield GaugeMetricFamily("amoskys_agent_flow_open", "Flows in the table", value=len(table))
