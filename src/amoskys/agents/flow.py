"""flow: bidirectional network flows from live capture (AF_PACKET + BPF) or a pcap/pcapng replay.

A flow is keyed by its 5-tuple (plus VLAN and interface) in the direction of its initiator: the
sender of its first packet, or for TCP the sender of the SYN (a SYN-ACK seen first makes its
receiver the initiator). It counts packets, IP bytes and TCP flags each way and ends with a
`flow` event when:

- TCP: both sides sent FIN, or one sent RST, plus `CLOSE_GRACE_NS` for the last ACKs (FIN / RST);
- no packet for `flow.idle_timeout_s` (IDLE_TIMEOUT);
- it has lasted `flow.active_timeout_s`: that slice is reported (ACTIVE_TIMEOUT), counters start
  over and the flow goes on;
- the table holds `flow.max_flows` and a new flow needs room: the least recently seen one goes
  (EVICTED, counted in `amoskys_agent_flow_evicted_total`);
- the agent stops or the pcap ends (SHUTDOWN).

Time is the packets' own: kernel timestamps live, file timestamps in a replay, so a replay gives
the same flows every time.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from amoskys.agents.base import Agent
from amoskys.agents.packets import (
    SUPPORTED_LINKTYPES,
    BpfError,
    Capture,
    Parsed,
    PcapReader,
    Record,
    compile_bpf,
    parse_frame,
)
from amoskys.config import AgentConfig, FlowConfig
from amoskys.errors import ConfigError
from amoskys.v1 import events_pb2

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

__all__ = ["FlowAgent", "FlowTable"]

log = logging.getLogger(__name__)
EndReason = events_pb2.FlowEvent.EndReason
SEC = 1_000_000_000
TICK_NS = SEC  # timeouts are checked once a second (of packet time)
CLOSE_GRACE_NS = 2 * SEC  # after both FINs or a RST: the last ACKs still belong to the flow
FIN, SYN, RST, ACK = 0x01, 0x02, 0x04, 0x10
READ_BUDGET = 512  # frames read per wake-up, so the event loop stays responsive
REPLAY_BATCH = 4096  # records replayed between yields to the event loop
YIELD_EVERY = 1000  # events handed over between yields to the event loop
NEVER = 1 << 62

# (protocol, initiator ip, initiator port, responder ip, responder port, vlan, interface index)
Key = tuple[int, bytes, int, bytes, int, int, int]


class Flow:
    """Counters of the current slice of one flow, and its end state."""

    __slots__ = ("bucket", "bytes_in", "bytes_out", "close_at", "closing", "due", "fins", "first",
                 "flags_in", "flags_out", "last", "packets_in", "packets_out")  # fmt: skip

    def __init__(self, ts: int) -> None:
        self.packets_out = self.bytes_out = self.packets_in = self.bytes_in = 0
        self.flags_out = self.flags_in = self.fins = self.closing = 0
        self.first = self.last = ts
        self.close_at = NEVER
        self.due = NEVER  # the earliest of close_at and first + active timeout: a packet at or after it checks
        self.bucket = -1  # second in which this slice's active timeout falls (-1: not scheduled)

    def slice(self) -> Flow:
        """A copy of the counters, to report while this flow goes on."""
        copy = Flow(self.first)
        copy.last, copy.packets_out, copy.bytes_out, copy.packets_in, copy.bytes_in = (
            self.last,
            self.packets_out,
            self.bytes_out,
            self.packets_in,
            self.bytes_in,
        )
        copy.flags_out, copy.flags_in = self.flags_out, self.flags_in
        return copy


class FlowTable:
    """The bounded flow table; `add` takes parsed packets, ended flows collect in `ended`."""

    def __init__(self, settings: FlowConfig, interface_name: Callable[[int], str]) -> None:
        self.flows: collections.OrderedDict[Key, Flow] = collections.OrderedDict()  # least recently seen first
        self.closing: dict[Key, Flow] = {}
        self.slices: dict[int, dict[Key, Flow]] = {}  # active-timeout second -> flows whose slice ends then
        self.ended: list[tuple[Key, Flow, int]] = []  # turned into events by `take`, one at a time
        self.interface_name = interface_name
        self.evicted = 0
        self.reported: collections.Counter[int] = collections.Counter()
        self.next_tick = 0
        self.configure(settings)

    def configure(self, settings: FlowConfig) -> None:
        self.idle = int(settings.idle_timeout_s * SEC)
        self.active = int(settings.active_timeout_s * SEC)
        self.max_flows = settings.max_flows

    def add(self, ts: int, iface: int, packet: Parsed) -> None:
        """Count one packet (`ts` in ns) into its flow, creating, ending or slicing flows as due."""
        if ts >= self.next_tick:
            self.expire(ts)
        protocol, src, sport, dst, dport, flags, length, vlan = packet
        key: Key = (protocol, src, sport, dst, dport, vlan, iface)
        flows = self.flows
        flow = flows.get(key)
        outbound = flow is not None
        reverse: Key = (protocol, dst, dport, src, sport, vlan, iface)
        if flow is None:
            flow = flows.get(reverse)
            if flow is not None:
                key = reverse
        if flow is not None and (ts >= flow.due or ts - flow.last >= self.idle):
            flow = self._due(key, flow, ts)
        if flow is None:
            # a new flow: its sender began it, unless it is a SYN-ACK (we missed the SYN: its receiver began)
            outbound = not (protocol == 6 and flags & (SYN | ACK) == SYN | ACK)
            key = (protocol, src, sport, dst, dport, vlan, iface) if outbound else reverse
            flow = self._start(key, ts)
        else:
            flows.move_to_end(key)
        flow.last = ts
        if outbound:
            flow.packets_out += 1
            flow.bytes_out += length
            flow.flags_out |= flags
        else:
            flow.packets_in += 1
            flow.bytes_in += length
            flow.flags_in |= flags
        if flags & (FIN | RST) and protocol == 6:
            self._tcp_end(key, flow, flags, outbound, ts)

    def _start(self, key: Key, ts: int) -> Flow:
        if len(self.flows) >= self.max_flows:
            old_key, old = self.flows.popitem(last=False)
            self.evicted += 1
            self._end(old_key, old, EndReason.EVICTED)
        flow = self.flows[key] = Flow(ts)
        self._schedule(key, flow, ts)
        return flow

    def _due(self, key: Key, flow: Flow, ts: int) -> Flow | None:
        """A packet for a flow past a deadline: end it (None), or report its slice and go on."""
        if ts >= flow.close_at:
            self._end(key, flow, flow.closing)
            return None
        if ts - flow.last >= self.idle:
            self._end(key, flow, EndReason.IDLE_TIMEOUT)
            return None
        if flow.bucket >= 0 and ts - flow.first >= self.active:
            self._report_slice(key, flow)
        if flow.bucket < 0:  # a new slice starts with this packet
            flow.first = ts
            self._schedule(key, flow, ts)
        return flow

    def _tcp_end(self, key: Key, flow: Flow, flags: int, outbound: bool, ts: int) -> None:
        if flow.closing:
            return
        if flags & RST:
            flow.closing = EndReason.RST
        else:
            flow.fins |= 1 if outbound else 2
            if flow.fins != 3:
                return
            flow.closing = EndReason.FIN
        flow.close_at = ts + CLOSE_GRACE_NS
        flow.due = min(flow.due, flow.close_at)
        self.closing[key] = flow

    def _schedule(self, key: Key, flow: Flow, ts: int) -> None:
        flow.bucket = (ts + self.active) // SEC
        flow.due = min(ts + self.active, flow.close_at)
        self.slices.setdefault(flow.bucket, {})[key] = flow

    def _unschedule(self, key: Key, flow: Flow) -> None:
        bucket = self.slices.get(flow.bucket)
        if bucket is not None:
            bucket.pop(key, None)
        flow.bucket = -1
        flow.due = flow.close_at

    def _report_slice(self, key: Key, flow: Flow) -> None:
        """ACTIVE_TIMEOUT: report the slice, start the counters over; the next packet opens a slice."""
        self._unschedule(key, flow)
        self.ended.append((key, flow.slice(), EndReason.ACTIVE_TIMEOUT))
        flow.packets_out = flow.bytes_out = flow.packets_in = flow.bytes_in = flow.flags_out = flow.flags_in = 0
        flow.due = 0  # the next packet goes through _due and starts a slice

    def _end(self, key: Key, flow: Flow, reason: int) -> None:
        self.flows.pop(key, None)
        self.closing.pop(key, None)
        self._unschedule(key, flow)
        if flow.packets_out or flow.packets_in:  # empty: its last slice was reported already
            self.ended.append((key, flow, reason))

    def _event(self, key: Key, flow: Flow, reason: int) -> events_pb2.FlowEvent:
        protocol, src, sport, dst, dport, vlan, iface = key
        self.reported[reason] += 1
        return events_pb2.FlowEvent(
            interface=self.interface_name(iface), protocol=protocol, vlan=vlan,
            src_ip=_address(src), src_port=sport, dst_ip=_address(dst), dst_port=dport,
            packets_out=flow.packets_out, bytes_out=flow.bytes_out, packets_in=flow.packets_in, bytes_in=flow.bytes_in,
            tcp_flags_out=flow.flags_out, tcp_flags_in=flow.flags_in, first_ns=flow.first, last_ns=flow.last,
            end_reason=reason,  # type: ignore[arg-type]
        )  # fmt: skip

    def expire(self, now: int) -> None:
        """End or slice every flow whose deadline is at or before `now` (ns)."""
        self.next_tick = now + TICK_NS
        idle = []
        for key, flow in self.flows.items():  # least recently seen first
            if now - flow.last < self.idle:
                break
            idle.append((key, flow))
        for key, flow in idle:
            self._end(key, flow, EndReason.IDLE_TIMEOUT)
        for key, flow in [(k, f) for k, f in self.closing.items() if f.close_at <= now]:
            self._end(key, flow, flow.closing)
        for second in sorted(s for s in self.slices if s * SEC <= now):
            bucket = self.slices[second]
            for key, flow in [(k, f) for k, f in bucket.items() if now - f.first >= self.active]:
                self._report_slice(key, flow)
            if not bucket:
                del self.slices[second]

    def end_all(self) -> None:
        """Report every open flow: SHUTDOWN, or FIN/RST for those already closing."""
        for key, flow in list(self.flows.items()):
            self._end(key, flow, flow.closing or EndReason.SHUTDOWN)
        self.slices.clear()

    def take(self) -> Iterator[events_pb2.FlowEvent]:
        """The flows ended so far as events, built one at a time (an end of capture can end 100,000)."""
        while self.ended:
            ended, self.ended = self.ended, []
            for key, flow, reason in ended:
                yield self._event(key, flow, reason)


def _address(raw: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)


class FlowAgent(Agent):
    kind = "flow"

    def __init__(self, config: AgentConfig, state_dir: Path) -> None:
        super().__init__(config, state_dir)
        settings = config.flow
        self.packets = 0
        self.skipped: collections.Counter[str] = collections.Counter()
        self.kernel_drops = 0
        self.file_problems = 0
        self.captures: list[Capture] = []
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

    def reload(self, config: AgentConfig) -> None:
        old, new = self.config.flow, config.flow
        if (old.interfaces, old.bpf, old.promiscuous) != (new.interfaces, new.bpf, new.promiscuous):
            log.warning("flow: interfaces, bpf and promiscuous take effect at the next start")
        self.table.configure(new)
        self.config = config

    def register_metrics(self, registry: CollectorRegistry) -> None:
        registry.register(_FlowMetrics(self))

    async def collect(self) -> AsyncIterator[events_pb2.Event]:
        steps = self._replay() if self.reader is not None else self._capture()
        async for _ in steps:
            for count, flow in enumerate(self.table.take(), 1):
                yield self.event(flow=flow)
                if count % YIELD_EVERY == 0:
                    await asyncio.sleep(0)
        if self.reader is not None:
            self.replayed.set()

    def shutdown_events(self) -> list[events_pb2.Event]:
        """Flows still open when the agent stops: SHUTDOWN (or FIN/RST if they were closing)."""
        self.table.end_all()
        return [self.event(flow=flow) for flow in self.table.take()]

    async def close(self) -> None:
        if self.reader is not None:
            self.reader.close()

    # ---- pcap replay ----

    async def _replay(self) -> AsyncIterator[None]:
        """Count the file's packets into the table, a batch per step; at its end, every flow ends."""
        reader = self.reader
        assert reader is not None
        records = reader.records()
        while self._replay_batch(reader, records):
            yield None
            await asyncio.sleep(0)
        if reader.problem:
            self.file_problems += 1
            log.warning("flow: pcap replay stopped early", extra={"problem": reader.problem})
        self.table.end_all()
        log.info("flow: pcap replayed", extra={"records": reader.records_read, "packets": self.packets})
        yield None

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

    async def _capture(self) -> AsyncIterator[None]:
        """Open the capture sockets and count what they read; a step whenever flows ended or a second passed."""
        settings = self.config.flow
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        failures: list[OSError] = []
        try:
            for name in settings.interfaces:
                self.captures.append(_open_capture(name, settings))
            for index, capture in enumerate(self.captures):
                loop.add_reader(capture.fileno(), self._readable, index, capture, wake, failures)
            while not failures:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), TICK_NS / SEC)
                wake.clear()
                self._tick()
                yield None
            raise failures[0]
        finally:
            for capture in self.captures:
                loop.remove_reader(capture.fileno())
                capture.close()
            self.captures = []

    def _readable(self, index: int, capture: Capture, wake: asyncio.Event, failures: list[OSError]) -> None:
        try:
            frames = capture.read(READ_BUDGET)
        except OSError as exc:
            asyncio.get_running_loop().remove_reader(capture.fileno())
            failures.append(OSError(exc.errno, f"flow: capture on {capture.interface} failed: {exc.strerror}"))
            wake.set()
            return
        linktype, add, skipped = capture.linktype, self.table.add, self.skipped
        for ts, data, wire, vlan in frames:
            parsed = parse_frame(data, 0, len(data), wire, linktype, vlan)
            if isinstance(parsed, str):
                skipped[parsed] += 1
            else:
                self.packets += 1
                add(ts, index, parsed)
        if self.table.ended:
            wake.set()

    def _tick(self) -> None:
        now = time.time_ns()
        if now >= self.table.next_tick:
            self.table.expire(now)
        for capture in self.captures:
            self.kernel_drops += capture.kernel_drops()


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
    except OSError as exc:
        raise OSError(exc.errno, f"flow: cannot capture on {name}: {exc.strerror or exc}") from None


class _FlowMetrics:
    """`amoskys_agent_flow_*`, read from the agent's plain counters at scrape time (nothing per packet)."""

    def __init__(self, agent: FlowAgent) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        agent, table = self.agent, self.agent.table
        yield CounterMetricFamily("amoskys_agent_flow_packets", "Packets counted into flows", value=agent.packets)
        skipped = CounterMetricFamily(
            "amoskys_agent_flow_frames_skipped",
            "Frames not counted, by reason (non_ip, truncated, ...)",
            labels=["reason"],
        )
        for reason, count in sorted(agent.skipped.items()):
            skipped.add_metric([reason], count)
        yield skipped
        reported = CounterMetricFamily("amoskys_agent_flow_reported", "Flows reported, by end", labels=["reason"])
        for end, count in sorted(table.reported.items()):
            reported.add_metric([EndReason.Name(end)], count)  # type: ignore[arg-type]
        yield reported
        for name, text, value in (
            ("evicted", "Flows evicted from a full table (reported as EVICTED)", table.evicted),
            ("kernel_drops", "Frames the kernel dropped (socket buffer full)", agent.kernel_drops),
            ("file_problems", "Pcap files cut short or corrupt", agent.file_problems),
        ):
            yield CounterMetricFamily(f"amoskys_agent_flow_{name}", text, value=value)
        yield GaugeMetricFamily("amoskys_agent_flow_open", "Flows in the table", value=len(table.flows))
