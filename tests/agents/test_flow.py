"""flow: parsing, the flow table and its endings, bad inputs; live capture on namespaces; a live hub.

Pcap-built cases (scapy writes the frames, at chosen times) pin the table's rules: initiators,
FIN/RST endings, idle and active timeouts, eviction, VLANs, IPv6, fragments, link types and
broken files. The root tests capture real traffic: inside a namespace joined to another by a
veth pair (compared with the interface's own counters and with an independent capture written
to a pcap and replayed), and on a lab uplink through the runtime into a live hub.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml
from prometheus_client import CollectorRegistry
from scapy.layers.inet import ICMP, IP, TCP, UDP, fragment
from scapy.layers.inet6 import ICMPv6EchoReply, ICMPv6EchoRequest, IPv6, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop
from scapy.layers.l2 import ARP, CookedLinux, Dot1AD, Dot1Q, Ether
from scapy.packet import Packet, Raw
from scapy.utils import PcapNgWriter, PcapWriter, RawPcapReader, RawPcapWriter, wrpcap

from amoskys.agents.flow.agent import FlowAgent
from amoskys.agents.flow.config import FlowAgentConfig
from amoskys.agents.flow.packets import (
    LINKTYPE_ETHERNET,
    LINKTYPE_RAW,
    MALFORMED,
    NON_IP,
    TRUNCATED,
    BpfError,
    compile_bpf,
    parse_frame,
)
from amoskys.agents.runtime.runner import AgentRuntime
from amoskys.cli import main
from amoskys.errors import ConfigError
from amoskys.v1 import bus_pb2, events_pb2
from tests.agents.conftest import agent_config, section_error
from tests.hubfixture import LiveHub
from tests.netlab import NetLab, ip, net_lab

End = events_pb2.FlowEvent.EndReason
T0 = 1_700_000_000
SEC = 1_000_000_000
A, B, C = "10.0.0.1", "10.0.0.2", "10.0.0.3"
ETHER = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10


def at(offset: float, packet: Packet) -> Packet:
    packet.time = T0 + offset
    return packet


def tcp(src: str, dst: str, sport: int, dport: int, flags: str, payload: bytes = b"") -> Packet:
    return ETHER / IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags=flags) / payload


def udp(src: str, dst: str, sport: int, dport: int, payload: bytes = b"x") -> Packet:
    return ETHER / IP(src=src, dst=dst) / UDP(sport=sport, dport=dport) / payload


def flow_config(tmp_path: Path, **flow: Any) -> FlowAgentConfig:
    return msgspec.convert({"host": "testhost", "state_dir": str(tmp_path / "state"), "flow": flow}, FlowAgentConfig)


async def replay_file(path: Path, tmp_path: Path, **flow: Any) -> tuple[FlowAgent, list[events_pb2.FlowEvent]]:
    agent = FlowAgent(flow_config(tmp_path, pcap=str(path), **flow), tmp_path)
    flows = [event.flow async for event in agent.collect()]
    assert agent.replayed.is_set()
    await agent.close()
    return agent, flows


async def replay(packets: list[Packet], tmp_path: Path, **flow: Any) -> tuple[FlowAgent, list[events_pb2.FlowEvent]]:
    path = tmp_path / f"case-{secrets.token_hex(4)}.pcap"
    wrpcap(str(path), packets)
    return await replay_file(path, tmp_path, **flow)


def summary(flow: events_pb2.FlowEvent) -> tuple[Any, ...]:
    """Everything but the times and the interface name."""
    return (flow.protocol, flow.src_ip, flow.src_port, flow.dst_ip, flow.dst_port, flow.packets_out,
            flow.bytes_out, flow.packets_in, flow.bytes_in, flow.tcp_flags_out, flow.tcp_flags_in, flow.vlan,
            flow.end_reason)  # fmt: skip


# ---- the table's rules, from pcaps built here ----------------------------------------------------------


def handshake_data_close(sport: int, start: float = 0) -> list[Packet]:
    """A TCP connection A -> B:80: handshake, 100 bytes each way, FIN both ways, the last ACK."""
    steps = [(A, "S", b""), (B, "SA", b""), (A, "A", b""), (A, "PA", b"q" * 100), (B, "PA", b"r" * 100),
             (A, "FA", b""), (B, "FA", b""), (A, "A", b"")]  # fmt: skip
    return [
        at(start + i * 0.01, tcp(src, B if src == A else A, sport if src == A else 80, 80 if src == A else sport,
                                 flags, payload))
        for i, (src, flags, payload) in enumerate(steps)
    ]  # fmt: skip


async def test_tcp_flow_ends_after_both_fins_with_the_last_ack(tmp_path: Path) -> None:
    late_ack = at(5, tcp(A, B, 40000, 80, "A"))  # after the grace: a flow of its own
    _, flows = await replay([*handshake_data_close(40000), late_ack], tmp_path)
    first, straggler = flows
    assert summary(first) == (6, A, 40000, B, 80, 5, 40 + 40 + 140 + 40 + 40, 3, 40 + 140 + 40,
                              SYN | ACK | PSH | FIN, SYN | ACK | PSH | FIN, 0, End.FIN)  # fmt: skip
    assert first.first_ns == T0 * SEC and first.last_ns == T0 * SEC + 70_000_000
    assert (straggler.packets_out, straggler.end_reason) == (1, End.SHUTDOWN)  # the pcap ended with it open


async def test_rst_ends_a_flow_and_a_syn_ack_seen_first_makes_its_receiver_the_initiator(tmp_path: Path) -> None:
    refused = [at(0, tcp(A, B, 40001, 81, "S")), at(0.01, tcp(B, A, 81, 40001, "RA"))]
    missed_syn = [at(0.1, tcp(B, A, 443, 40002, "SA")), at(0.11, tcp(A, B, 40002, 443, "A"))]
    _, flows = await replay(refused + missed_syn, tmp_path)
    by_port = {f.dst_port: f for f in flows}
    assert summary(by_port[81]) == (6, A, 40001, B, 81, 1, 40, 1, 40, SYN, RST | ACK, 0, End.RST)
    assert summary(by_port[443]) == (6, A, 40002, B, 443, 1, 40, 1, 40, ACK, SYN | ACK, 0, End.SHUTDOWN)


async def test_idle_timeout_ends_a_flow_by_packet_time(tmp_path: Path) -> None:
    quiet = [at(t, udp(A, B, 5000, 53)) for t in (0, 1, 2)] + [at(20, udp(A, B, 5000, 53))]  # 18 s gap
    ticker = [at(t + 0.5, udp(C, B, 6000, 123)) for t in range(30)]  # keeps packet time moving
    agent, flows = await replay(sorted(quiet + ticker, key=lambda p: p.time), tmp_path, idle_timeout_s=15)
    dns = [f for f in flows if f.src_port == 5000]
    assert [(f.packets_out, f.end_reason) for f in dns] == [(3, End.IDLE_TIMEOUT), (1, End.SHUTDOWN)]
    assert dns[0].last_ns == (T0 + 2) * SEC and dns[1].first_ns == (T0 + 20) * SEC
    assert flows.index(dns[0]) < flows.index(dns[1])
    assert agent.table.reported[End.IDLE_TIMEOUT] == 1


async def test_active_timeout_reports_slices_and_the_flow_goes_on(tmp_path: Path) -> None:
    steady = [at(t, udp(A, B, 7000, 514)) for t in range(150)]  # one packet a second for 150 s
    _, flows = await replay(steady, tmp_path, active_timeout_s=60)
    assert [(f.packets_out, f.bytes_out, f.end_reason) for f in flows] == [
        (60, 60 * 29, End.ACTIVE_TIMEOUT), (60, 60 * 29, End.ACTIVE_TIMEOUT), (30, 30 * 29, End.SHUTDOWN)
    ]  # fmt: skip
    assert [(f.first_ns - T0 * SEC) // SEC for f in flows] == [0, 60, 120]
    assert [(f.last_ns - T0 * SEC) // SEC for f in flows] == [59, 119, 149]


async def test_a_slice_is_reported_when_due_even_without_another_packet(tmp_path: Path) -> None:
    burst = [at(t, udp(A, B, 7001, 514)) for t in range(31)]
    ticker = [at(t + 0.5, udp(C, B, 6000, 123)) for t in range(100)]
    _, flows = await replay(sorted(burst + ticker, key=lambda p: p.time), tmp_path, active_timeout_s=60,
                            idle_timeout_s=300)  # fmt: skip
    (burst_flow,) = [f for f in flows if f.src_port == 7001]
    assert (burst_flow.packets_out, burst_flow.end_reason) == (31, End.ACTIVE_TIMEOUT)
    ticker_flows = [f for f in flows if f.src_port == 6000]
    assert flows.index(burst_flow) < flows.index(ticker_flows[-1])  # reported at 60 s, before the end


async def test_a_full_table_evicts_and_reports_every_flow(tmp_path: Path) -> None:
    packets = [at(i * 0.01, udp(A, B, 8000 + i % 5, 9)) for i in range(20)]  # 5 flows, 4 packets each
    agent, flows = await replay(packets, tmp_path, max_flows=3)
    evicted = [f for f in flows if f.end_reason == End.EVICTED]
    assert evicted and agent.table.evicted == len(evicted)
    assert sum(f.packets_out for f in flows) == 20
    assert sum(f.bytes_out for f in flows) == 20 * 29
    registry = CollectorRegistry()
    agent.register_metrics(registry)
    assert registry.get_sample_value("amoskys_agent_flow_evicted_total") == len(evicted)
    assert registry.get_sample_value("amoskys_agent_flow_packets_total") == 20
    assert registry.get_sample_value("amoskys_agent_flow_reported_total", {"reason": "EVICTED"}) == len(evicted)
    assert registry.get_sample_value("amoskys_agent_flow_open") == 0


async def test_vlans_ipv6_extension_headers_fragments_and_icmp(tmp_path: Path) -> None:
    v6a, v6b = "fd00::1", "fd00::2"
    big = ETHER / IP(src=A, dst=B, id=7) / UDP(sport=4000, dport=4001) / (b"z" * 3000)
    pieces = fragment(big[IP], fragsize=1480)
    packets = [
        ETHER / Dot1Q(vlan=42) / IP(src=A, dst=B) / UDP(sport=1, dport=2) / b"v",
        ETHER / Dot1Q(vlan=42) / IP(src=B, dst=A) / UDP(sport=2, dport=1) / b"v",
        ETHER / Dot1AD(vlan=100) / Dot1Q(vlan=42) / IP(src=A, dst=B) / UDP(sport=1, dport=2) / b"v",
        ETHER / IPv6(src=v6a, dst=v6b) / IPv6ExtHdrHopByHop() / TCP(sport=3, dport=22, flags="S"),
        ETHER / IPv6(src=v6b, dst=v6a) / TCP(sport=22, dport=3, flags="SA"),
        ETHER / IPv6(src=v6a, dst=v6b) / IPv6ExtHdrFragment(offset=0, m=1, id=5) / UDP(sport=9, dport=10) / b"a",
        ETHER / IPv6(src=v6a, dst=v6b) / IPv6ExtHdrFragment(offset=1, m=0, id=5, nh=17) / Raw(b"b" * 8),
        ETHER / IP(src=A, dst=B) / ICMP(type=8, id=77) / (b"p" * 56),
        ETHER / IP(src=B, dst=A) / ICMP(type=0, id=77) / (b"p" * 56),
        ETHER / IP(src=B, dst=A) / ICMP(type=3, code=3) / IP(src=A, dst=B) / UDP(sport=1, dport=2),
        ETHER / IPv6(src=v6a, dst=v6b) / ICMPv6EchoRequest(id=5),
        ETHER / IPv6(src=v6b, dst=v6a) / ICMPv6EchoReply(id=5),
        *[ETHER / piece for piece in pieces],
    ]
    _, flows = await replay([at(i * 0.01, p) for i, p in enumerate(packets)], tmp_path)
    got = {(*summary(f)[:5], f.vlan): (f.packets_out, f.bytes_out, f.packets_in, f.bytes_in) for f in flows}
    assert got == {
        (17, A, 1, B, 2, 42): (1, 29, 1, 29),  # 802.1Q
        (17, A, 1, B, 2, 100): (1, 29, 0, 0),  # 802.1ad outside 802.1Q: the outer tag counts (as live)
        (6, v6a, 3, v6b, 22, 0): (1, 40 + 8 + 20, 1, 40 + 20),
        (17, v6a, 9, v6b, 10, 0): (2, 40 + 8 + 9 + 40 + 8 + 8, 0, 0),  # the later fragment takes the first's ports
        (1, A, 77, B, 77, 0): (1, 84, 1, 84),  # echo: the identifier as both ports, one flow
        (1, B, 0, A, 3 << 8 | 3, 0): (1, 20 + 8 + 28, 0, 0),  # unreachable: type<<8|code
        (58, v6a, 5, v6b, 5, 0): (1, 48, 1, 48),
        (17, A, 4000, B, 4001, 0): (len(pieces), sum(len(p) for p in pieces), 0, 0),
    }  # fmt: skip


def v4_fragments(src: str, ident: int, sport: int, size: int = 3000) -> list[Packet]:
    whole = IP(src=src, dst=B, id=ident) / UDP(sport=sport, dport=53) / (b"f" * size)
    return [ETHER / piece for piece in fragment(whole, fragsize=1000)]


def v6_fragments(ident: int, size: int = 2500) -> list[Packet]:
    from scapy.layers.inet6 import fragment6

    whole = IPv6(src="fd00::1", dst="fd00::2") / IPv6ExtHdrFragment(id=ident) / UDP(sport=7, dport=8) / (b"g" * size)
    return [ETHER / piece for piece in fragment6(whole, 1280)]


async def test_fragments_count_into_their_datagrams_flow_in_any_order_and_the_lost_are_counted(
    tmp_path: Path,
) -> None:
    reordered = v4_fragments(A, 100, 5000)  # the first fragment last
    same_id_other_source = v4_fragments(C, 100, 6000)
    first_lost = v4_fragments(A, 101, 5000)[1:]
    six = v6_fragments(0x12345678)
    packets = [*reordered[1:], reordered[0], *same_id_other_source, *first_lost, six[2], six[0], six[1]]
    late = at(30, v4_fragments(A, 100, 5000)[2])  # its datagram was forgotten (5 s): its first never comes
    agent, flows = await replay([*(at(i * 0.001, p) for i, p in enumerate(packets)), late], tmp_path)
    got = {summary(f)[:5]: (f.packets_out, f.bytes_out) for f in flows}
    assert got == {
        (17, A, 5000, B, 53): (len(reordered), sum(len(p[IP]) for p in reordered)),
        (17, C, 6000, B, 53): (len(same_id_other_source), sum(len(p[IP]) for p in same_id_other_source)),
        (17, "fd00::1", 7, "fd00::2", 8): (3, sum(len(p[IPv6]) for p in six)),
    }
    assert agent.table.fragments.unattributed == len(first_lost) + 1
    registry = CollectorRegistry()
    agent.register_metrics(registry)
    assert registry.get_sample_value("amoskys_agent_flow_fragments_unattributed_total") == len(first_lost) + 1


async def test_frames_that_are_not_ip_or_are_cut_short_are_counted_not_fatal(tmp_path: Path) -> None:
    whole = bytes(udp(A, B, 1, 2))
    arp = ETHER / ARP(psrc=A, pdst=B, hwsrc=ETHER.src, hwdst="00:00:00:00:00:00")
    mpls = whole[:12] + b"\x88\x47"
    pseudowire = mpls + mpls_stack([100]) + bytes(4) + whole  # a control word (RFC 4385), then Ethernet
    bad = {
        NON_IP: [bytes(arp), bytes(Ether(type=0x88CC) / b"lldp"), pseudowire],
        TRUNCATED: [whole[:10], whole[:14 + 12], whole[:14 + 20 + 2], bytes(ETHER / Dot1Q(vlan=3))[:16],
                    bytes(ETHER / IPv6(src="fd00::1", dst="fd00::2"))[:14 + 30], mpls + mpls_stack([16, 17])[:6],
                    mpls + mpls_stack([16])],
        MALFORMED: [whole[:14] + bytes([0x43]) + whole[15:], whole[:14] + bytes([0x65]) + whole[15:],
                    mpls + mpls_stack([16] * 18)[:-4] + whole[14:]],  # 17 labels, none the bottom
    }  # fmt: skip
    frames = [frame for group in bad.values() for frame in group] + [whole]
    path = tmp_path / "bad-frames.pcap"
    with RawPcapWriter(str(path), linktype=1) as writer:
        writer.write_header(None)
        for i, frame in enumerate(frames):
            writer.write_packet(frame, sec=T0, usec=i)
    agent, flows = await replay_file(path, tmp_path)
    assert dict(agent.skipped) == {reason: len(group) for reason, group in bad.items()}
    assert [summary(f)[:6] for f in flows] == [(17, A, 1, B, 2, 1)]
    for frame in frames[:-1]:  # every prefix of a frame parses to a reason, never an exception
        for cut in range(len(frame)):
            parse_frame(frame, 0, cut, cut, 1)


async def test_pcapng_nanosecond_cooked_and_raw_ip_files_give_the_same_flows(tmp_path: Path) -> None:
    packets = [*handshake_data_close(41000), at(0.5, udp(A, B, 5353, 5353)), at(0.6, udp(B, A, 5353, 5353))]
    _, expected = await replay(packets, tmp_path)
    writers: dict[str, Callable[[Path], Any]] = {
        "pcapng": lambda p: PcapNgWriter(str(p)),
        "nano": lambda p: PcapWriter(str(p), nano=True),
        "big-endian": lambda p: PcapWriter(str(p), endianness=">"),
    }
    for name, make in writers.items():
        path = tmp_path / f"same.{name}"
        writer = make(path)
        for packet in packets:
            writer.write(packet)
        writer.close()
        _, flows = await replay_file(path, tmp_path)
        assert [summary(f) for f in flows] == [summary(f) for f in expected], name
        assert all(abs(f.first_ns - e.first_ns) <= 1000 for f, e in zip(flows, expected, strict=True)), name
    cooked = [at(p.time - T0, CookedLinux(pkttype=0, proto=0x0800) / p[IP]) for p in packets]
    raw = [at(p.time - T0, p[IP]) for p in packets]
    for name, frames in (("cooked", cooked), ("raw-ip", raw)):
        _, flows = await replay(frames, tmp_path)
        assert [summary(f) for f in flows] == [summary(f) for f in expected], name


async def test_broken_pcap_files_are_refused_or_replayed_as_far_as_they_go(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        FlowAgent(flow_config(tmp_path, pcap=str(tmp_path / "missing.pcap")), tmp_path)
    for name, content, message in [
        ("text.pcap", b"hello, this is not a capture\n", "not a pcap or pcapng file"),
        ("empty.pcap", b"", "not a pcap or pcapng file"),
        ("short.pcap", struct.pack("<IHH", 0xA1B2C3D4, 2, 4), "header cut short"),
        ("wifi.pcap", struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 105), "link type 105 is not supported"),
    ]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ConfigError, match=message):
            FlowAgent(flow_config(tmp_path, pcap=str(tmp_path / name)), tmp_path)
    (tmp_path / "dir.pcap").mkdir()
    with pytest.raises(ConfigError, match=r"dir\.pcap"):
        FlowAgent(flow_config(tmp_path, pcap=str(tmp_path / "dir.pcap")), tmp_path)

    whole = tmp_path / "whole.pcap"
    wrpcap(str(whole), handshake_data_close(42000))
    data = whole.read_bytes()
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(data[:-30])  # the last record is cut short
    agent, flows = await replay_file(cut, tmp_path)
    assert agent.file_problems == 1 and "cut short" in (agent.reader.problem if agent.reader else "")
    assert sum(f.packets_out + f.packets_in for f in flows) == 7
    corrupt = tmp_path / "corrupt.pcap"  # the third record claims a 2 GB frame
    third = 24 + 2 * 16 + len(bytes(handshake_data_close(42000)[0])) * 2
    corrupt.write_bytes(data[: third + 8] + struct.pack("<I", 2**31) + data[third + 12 :])
    agent, flows = await replay_file(corrupt, tmp_path)
    assert "corrupt record 3" in (agent.reader.problem if agent.reader else "")
    assert sum(f.packets_out + f.packets_in for f in flows) == 2


async def test_pcapng_blocks_too_short_for_their_kind_end_the_replay_as_a_problem(tmp_path: Path) -> None:
    whole = tmp_path / "whole.pcapng"
    packets = handshake_data_close(42000)
    writer = PcapNgWriter(str(whole))
    writer.write(packets)
    writer.close()
    data = whole.read_bytes()
    for name, block in [
        ("epb.pcapng", struct.pack("<III", 6, 12, 12)),  # an enhanced packet block with no body
        ("spb.pcapng", struct.pack("<III", 3, 12, 12)),  # a simple packet block with no length
    ]:
        (tmp_path / name).write_bytes(data + block)
        agent, flows = await replay_file(tmp_path / name, tmp_path)
        assert "too short" in (agent.reader.problem if agent.reader else ""), name
        assert sum(f.packets_out + f.packets_in for f in flows) == len(packets), name


def libpcap_missing() -> bool:
    try:
        compile_bpf("ip")
    except BpfError:
        return True
    return False


needs_libpcap = pytest.mark.skipif(libpcap_missing(), reason="BPF filters need libpcap (apt install libpcap0.8)")


@needs_libpcap
def test_bad_live_settings_are_refused_at_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"flow\.interfaces: empty"):
        FlowAgent(flow_config(tmp_path), tmp_path)
    with pytest.raises(ConfigError, match="no interface 'nosuch0' on this host"):
        FlowAgent(flow_config(tmp_path, interfaces=["lo", "nosuch0"]), tmp_path)
    with pytest.raises(ConfigError, match=r"flow\.bpf: 'tcp port' does not compile: .*syntax error"):
        FlowAgent(flow_config(tmp_path, interfaces=["lo"], bpf="tcp port"), tmp_path)
    with pytest.raises(ConfigError, match=r"flow\.bpf: 'ether proto wibble' does not compile"):
        FlowAgent(flow_config(tmp_path, interfaces=["lo"], bpf="ether proto wibble"), tmp_path)
    FlowAgent(flow_config(tmp_path, interfaces=["lo"], bpf="tcp port 22 or udp"), tmp_path)


@needs_libpcap
def test_filters_compile_for_raw_ip_interfaces() -> None:
    """tun, WireGuard and PPP interfaces carry raw IP: libpcap names that link type 12 (DLT_RAW), not 101."""
    assert compile_bpf("ip or ip6", LINKTYPE_RAW) != compile_bpf("ip or ip6", LINKTYPE_ETHERNET)


def test_reload_takes_new_timeouts_and_warns_about_what_needs_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    wrpcap(str(tmp_path / "one.pcap"), [at(0, udp(A, B, 1, 2))])
    agent = FlowAgent(flow_config(tmp_path, pcap=str(tmp_path / "one.pcap")), tmp_path)
    agent.reload(flow_config(tmp_path, pcap=str(tmp_path / "one.pcap"), idle_timeout_s=5, max_flows=10))
    assert (agent.table.idle, agent.table.max_flows) == (5 * SEC, 10) and not caplog.records
    agent.reload(flow_config(tmp_path, interfaces=["eth9"], bpf="udp"))
    assert "take effect at the next start" in caplog.text


def test_pcap_option_is_for_the_flow_agent_only(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["agent", "proc", "--pcap", "x.pcap"]) == 2
    assert "--pcap is an option of the flow agent, not of proc" in capsys.readouterr().err


# ---- live capture inside a namespace (root) ------------------------------------------------------------

CLONE_NEWNET = 0x40000000
LIBC = ctypes.CDLL(None, use_errno=True)


@dataclass
class VethLink:
    """Namespaces a and b joined by a veth pair, neighbours static: only our traffic on it. IPv6 is off
    unless `ipv6` (then fd00:88::1 and ::2, no duplicate detection); `mtu` 0 keeps the veth's 1500."""

    tag: str
    ipv6: bool = False
    mtu: int = 0
    ip_a: str = "10.88.0.1"
    ip_b: str = "10.88.0.2"
    ip6_a: str = "fd00:88::1"
    ip6_b: str = "fd00:88::2"

    @property
    def ns_a(self) -> str:
        return f"amxflow-{self.tag}-a"

    @property
    def ns_b(self) -> str:
        return f"amxflow-{self.tag}-b"

    @property
    def if_a(self) -> str:
        return f"fa{self.tag}"

    @property
    def if_b(self) -> str:
        return f"fb{self.tag}"

    def build(self) -> None:
        for namespace in (self.ns_a, self.ns_b):
            ip("netns", "add", namespace)
            sysctl = ["ip", "netns", "exec", namespace, "sysctl", "-qw"]
            off = int(not self.ipv6)
            subprocess.run([*sysctl, f"net.ipv6.conf.all.disable_ipv6={off}",
                            f"net.ipv6.conf.default.disable_ipv6={off}"], check=True)  # fmt: skip
        ip("link", "add", self.if_a, "netns", self.ns_a, "type", "veth", "peer", "name", self.if_b, "netns", self.ns_b)
        sides = ((self.ns_a, self.if_a, self.ip_a, self.ip6_a), (self.ns_b, self.if_b, self.ip_b, self.ip6_b))
        macs = {}
        for namespace, interface, address, address6 in sides:
            ip("addr", "add", f"{address}/30", "dev", interface, namespace=namespace)
            if self.ipv6:
                ip("addr", "add", f"{address6}/64", "dev", interface, "nodad", namespace=namespace)
            if self.mtu:
                ip("link", "set", interface, "mtu", str(self.mtu), namespace=namespace)
            ip("link", "set", interface, "up", namespace=namespace)
            macs[namespace] = json.loads(ip("-j", "link", "show", interface, namespace=namespace))[0]["address"]
        for (namespace, interface, _, _), (peer, _, address, address6) in (sides, sides[::-1]):
            for neighbour in (address, address6) if self.ipv6 else (address,):
                ip("neigh", "replace", neighbour, "lladdr", macs[peer], "nud", "permanent", "dev", interface,
                   namespace=namespace)  # fmt: skip

    def counters(self) -> tuple[int, int]:
        """(frames, bytes) through interface a, both ways, as the kernel counts them."""
        stats = json.loads(ip("-j", "-s", "link", "show", self.if_a, namespace=self.ns_a))[0]["stats64"]
        return stats["rx"]["packets"] + stats["tx"]["packets"], stats["rx"]["bytes"] + stats["tx"]["bytes"]

    def promiscuity(self) -> int:
        return int(json.loads(ip("-j", "-d", "link", "show", self.if_a, namespace=self.ns_a))[0]["promiscuity"])

    def ping(self, count: int = 1, size: int = 56, ipv6: bool = False) -> None:
        to = self.ip6_b if ipv6 else self.ip_b
        subprocess.run(["ip", "netns", "exec", self.ns_a, "ping", "-c", str(count), "-i", "0.05", "-W", "2", "-q",
                        "-s", str(size), to], check=True, capture_output=True)  # fmt: skip

    def run(self, namespace: str, code: str, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(["ip", "netns", "exec", namespace, sys.executable, "-c", code, *args],
                                stdout=subprocess.PIPE, text=True)  # fmt: skip

    def close(self) -> None:
        for namespace in (self.ns_a, self.ns_b):
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, check=False)


@contextlib.contextmanager
def veth_link(**options: Any) -> Iterator[VethLink]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2")
    link = VethLink(secrets.token_hex(3), **options)
    try:
        link.build()
        yield link
    finally:
        link.close()


@pytest.fixture
def veth() -> Iterator[VethLink]:
    with veth_link() as link:
        yield link


@pytest.fixture
def veth6() -> Iterator[VethLink]:
    """IPv4 and IPv6, MTU 1280 (IPv6's minimum): large datagrams go in fragments."""
    with veth_link(ipv6=True, mtu=1280) as link:
        yield link


def in_namespace(namespace: str, work: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Start `work` in a thread that joined `namespace` (its sockets live there); the list gets its outcome."""
    outcome: list[Any] = []

    def target() -> None:
        fd = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
        try:
            if LIBC.setns(fd, CLONE_NEWNET):
                raise OSError(ctypes.get_errno(), "setns")
            outcome.append(work())
        except BaseException as exc:
            outcome.append(exc)
        finally:
            os.close(fd)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


class PcapRecorder:
    """A second, independent capture: a plain AF_PACKET socket, frames written with scapy's pcap writer."""

    def __init__(self, interface: str, path: Path) -> None:
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        self.sock.bind((interface, 0x0003))
        self.sock.setsockopt(socket.SOL_SOCKET, 35, 1)  # SO_TIMESTAMPNS
        self.sock.setsockopt(socket.SOL_SOCKET, 33, 32 << 20)  # SO_RCVBUFFORCE: room for a burst of 64 KiB frames
        self.sock.setblocking(False)
        self.writer = RawPcapWriter(str(path), linktype=1, nano=True, snaplen=262144)
        self.writer.write_header(None)
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self._read)

    def _read(self) -> None:
        while True:
            try:
                frame, ancillary, _, _ = self.sock.recvmsg(262144, 64)
            except BlockingIOError:
                return
            seconds, nanoseconds = struct.unpack("qq", ancillary[0][2])
            self.writer.write_packet(frame, sec=seconds, usec=nanoseconds, caplen=len(frame), wirelen=len(frame))

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()
        self.writer.close()


SERVER = """
import socket, sys
tcp = socket.create_server((sys.argv[1], 0)); udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind((sys.argv[1], 0)); print(tcp.getsockname()[1], udp.getsockname()[1], flush=True)
conn, _ = tcp.accept(); received = 0
while chunk := conn.recv(65536): received += len(chunk)
conn.sendall(b"done"); conn.close()
datagrams = 0
udp.settimeout(5)
while datagrams < int(sys.argv[2]): udp.recv(65536); datagrams += 1
print(received, datagrams, flush=True)
"""
CLIENT = """
import socket, sys
host, tcp_port, udp_port, size, count, datagram = sys.argv[1], *map(int, sys.argv[2:])
with socket.create_connection((host, tcp_port)) as conn:
    conn.sendall(b"t" * size); conn.shutdown(socket.SHUT_WR)
    while conn.recv(65536): pass
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(count): udp.sendto(b"u" * datagram, (host, udp_port))
"""
TCP_BYTES, DATAGRAMS, DATAGRAM_BYTES, PINGS = 1_000_000, 25, 300, 3


def generate_traffic(
    link: VethLink, tcp_bytes: int = TCP_BYTES, datagrams: int = DATAGRAMS, datagram_bytes: int = DATAGRAM_BYTES
) -> tuple[int, int]:
    """Ping b from a, a TCP transfer and UDP datagrams a -> b; returns the server's (TCP, UDP) ports."""
    server = link.run(link.ns_b, SERVER, link.ip_b, str(datagrams))
    assert server.stdout is not None
    tcp_port, udp_port = map(int, server.stdout.readline().split())
    link.ping(PINGS)
    client = link.run(link.ns_a, CLIENT, link.ip_b, str(tcp_port), str(udp_port), str(tcp_bytes), str(datagrams),
                      str(datagram_bytes))  # fmt: skip
    assert client.wait(30) == 0
    assert server.stdout.readline().split() == [str(tcp_bytes), str(datagrams)]
    assert server.wait(10) == 0
    return tcp_port, udp_port


async def capture_until(agents: list[FlowAgent], recording: Path, interface: str, ready: threading.Event,
                        done: threading.Event) -> list[list[events_pb2.FlowEvent]]:  # fmt: skip
    """Run the agents' collect loops and a recorder until `done`; then stop them: their flows, stop included."""
    results: list[list[events_pb2.FlowEvent]] = [[] for _ in agents]

    async def drain(agent: FlowAgent, out: list[events_pb2.FlowEvent]) -> None:
        async for event in agent.collect():
            out.append(event.flow)

    tasks = [asyncio.create_task(drain(agent, out)) for agent, out in zip(agents, results, strict=True)]
    recorder = PcapRecorder(interface, recording)
    try:
        while not all(agent.captures for agent in agents):
            for task in tasks:
                if task.done():
                    task.result()
            await asyncio.sleep(0.01)
        ready.set()
        while not done.is_set():
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # the last frames
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        recorder.close()
    for agent, out in zip(agents, results, strict=True):
        out.extend(event.flow for event in agent.shutdown_events())
    return results


@pytest.mark.root
@needs_libpcap
def test_live_capture_in_a_namespace_matches_the_interface_counters_and_its_pcap(
    veth: VethLink, tmp_path: Path
) -> None:
    recording = tmp_path / "recorded.pcap"
    ready, done = threading.Event(), threading.Event()

    def session() -> list[list[events_pb2.FlowEvent]]:
        everything = FlowAgent(flow_config(tmp_path, interfaces=[veth.if_a]), tmp_path)
        udp_only = FlowAgent(flow_config(tmp_path, interfaces=[veth.if_a], bpf="udp", promiscuous=True), tmp_path)
        result = asyncio.run(capture_until([everything, udp_only], recording, veth.if_a, ready, done))
        assert not everything.skipped and not udp_only.skipped and everything.kernel_drops == 0
        return result

    thread, outcome = in_namespace(veth.ns_a, session)
    try:
        assert ready.wait(10), outcome
        assert veth.promiscuity() == 1
        frames_before, bytes_before = veth.counters()
        tcp_port, udp_port = generate_traffic(veth)
        time.sleep(0.3)
        frames_after, bytes_after = veth.counters()
    finally:
        done.set()
        thread.join(30)
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    flows, udp_flows = outcome[0]
    assert veth.promiscuity() == 0  # closing the socket dropped it

    frames, frame_bytes = frames_after - frames_before, bytes_after - bytes_before
    assert sum(f.packets_out + f.packets_in for f in flows) == frames
    assert sum(f.bytes_out + f.bytes_in for f in flows) == frame_bytes - 14 * frames  # IP bytes: no Ethernet header
    by_protocol = {f.protocol: f for f in flows}
    assert len(flows) == 3 == len(by_protocol)
    ping = by_protocol[1]
    assert summary(ping)[:5] == (1, veth.ip_a, ping.src_port, veth.ip_b, ping.src_port)
    assert summary(ping)[5:9] == (PINGS, PINGS * 84, PINGS, PINGS * 84)
    transfer = by_protocol[6]
    assert summary(transfer)[:5] == (6, veth.ip_a, transfer.src_port, veth.ip_b, tcp_port)
    assert transfer.bytes_out > TCP_BYTES and transfer.end_reason == End.FIN
    assert transfer.tcp_flags_out & (SYN | FIN | ACK) == SYN | FIN | ACK
    assert transfer.tcp_flags_in & (SYN | FIN | ACK) == SYN | FIN | ACK
    datagrams = by_protocol[17]
    assert summary(datagrams)[3:9] == (veth.ip_b, udp_port, DATAGRAMS, DATAGRAMS * (28 + DATAGRAM_BYTES), 0, 0)
    assert [summary(f) for f in udp_flows] == [summary(datagrams)]  # the BPF filter ran in the kernel

    replayed = asyncio.run(replay_file(recording, tmp_path))[1]  # the recorder's pcap: the same flows
    assert sorted(summary(f) for f in replayed) == sorted(summary(f) for f in flows)


async def until(condition: Callable[[], object], what: str, timeout: float = 5) -> None:
    for _ in range(int(timeout / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.root
@needs_libpcap
def test_an_interface_going_down_is_counted_and_one_deleted_fails_the_capture_clearly(
    veth: VethLink, tmp_path: Path
) -> None:
    async def scenario() -> tuple[FlowAgent, list[events_pb2.FlowEvent], BaseException | None]:
        agent = FlowAgent(flow_config(tmp_path, interfaces=[veth.if_a], bpf="icmp"), tmp_path)
        flows: list[events_pb2.FlowEvent] = []

        async def drain() -> None:
            async for event in agent.collect():
                flows.append(event.flow)

        task = asyncio.create_task(drain())
        await until(lambda: agent.captures, "the capture")
        veth.ping()
        ip("link", "set", veth.if_a, "down", namespace=veth.ns_a)
        await until(lambda: agent.interface_downs == 1, "the interface down")
        ip("link", "set", veth.if_a, "up", namespace=veth.ns_a)
        veth.ping()
        ip("link", "del", veth.if_a, namespace=veth.ns_a)
        failure = (await asyncio.gather(asyncio.wait_for(task, 5), return_exceptions=True))[0]
        flows.extend(event.flow for event in agent.shutdown_events())
        return agent, flows, failure

    thread, outcome = in_namespace(veth.ns_a, lambda: asyncio.run(scenario()))
    thread.join(30)
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    agent, flows, failure = outcome[0]
    assert isinstance(failure, OSError) and f"capture on {veth.if_a} failed" in str(failure)
    assert not agent.captures  # closed on the way out
    assert [(f.protocol, f.packets_out, f.packets_in) for f in flows] == [(1, 1, 1), (1, 1, 1)]  # before, after


# ---- MPLS, from real traffic ------------------------------------------------------------------------

needs_tcpdump = pytest.mark.skipif(shutil.which("tcpdump") is None, reason="needs tcpdump (apt install tcpdump)")


@contextlib.contextmanager
def tcpdump(link: VethLink, path: Path) -> Iterator[None]:
    """tcpdump on interface a, writing every frame to `path` from when it listens until the block ends."""
    command = [
        "ip",
        "netns",
        "exec",
        link.ns_a,
        "tcpdump",
        "-i",
        link.if_a,
        "-n",
        "--immediate-mode",
        "-U",
        "-w",
        str(path),
    ]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stderr is not None
        while "listening on" not in (line := process.stderr.readline()):
            assert line, "tcpdump exited before listening"
        yield
        time.sleep(0.3)  # the last frames
    finally:
        process.terminate()
        process.wait(10)


def mpls_stack(labels: list[int]) -> bytes:
    """Label stack entries (RFC 3032): label 20 bits, traffic class 3, bottom-of-stack 1, TTL 8."""
    return b"".join(struct.pack(">I", label << 12 | (i == len(labels) - 1) << 8 | 64) for i, label in enumerate(labels))


def push_mpls(frame: bytes, index: int, vlan: int = 0) -> bytes:
    """`frame` with a label stack after its Ethernet header (and a 802.1Q tag before it if `vlan`): one
    label, two, or multicast, by `index`; IPv4 and IPv6 explicit-null labels (0, 2; RFC 4182) included."""
    ipv6 = frame[12:14] == b"\x86\xdd"
    stacks = [[16], [1000, 2 if ipv6 else 0], [300 + index]]
    ethertype = 0x8848 if index % 3 == 2 else 0x8847
    tag = struct.pack(">HH", 0x8100, vlan) if vlan else b""
    return frame[:12] + tag + struct.pack(">H", ethertype) + mpls_stack(stacks[index % 3]) + frame[14:]


def relabel(source: Path, target: Path, vlan: int = 0) -> list[bytes]:
    """Every frame of `source` with a label stack pushed (`push_mpls`), written to `target` as well."""
    frames = []
    with RawPcapWriter(str(target), linktype=1, nano=True) as writer:
        writer.write_header(None)
        for index, (frame, meta) in enumerate(RawPcapReader(str(source))):
            frames.append(push_mpls(frame, index, vlan))
            writer.write_packet(frames[-1], sec=meta.sec, usec=meta.usec)
    return frames


def ours(flows: list[events_pb2.FlowEvent], link: VethLink, vlan: int = 0) -> list[tuple[Any, ...]]:
    """The flows between the two ends (not the IPv6 multicast the kernel sends), vlan set aside."""
    addresses = {link.ip_a, link.ip_b, link.ip6_a, link.ip6_b}
    assert all(f.vlan == vlan for f in flows)
    return sorted(summary(f)[:-2] + summary(f)[-1:] for f in flows if {f.src_ip, f.dst_ip} <= addresses)


def tshark_mpls_totals(path: Path) -> tuple[int, int]:
    """(frames, IP bytes) of the MPLS frames in `path` as Wireshark dissects them: each must have a label
    and an IPv4 or IPv6 header under it."""
    fields = ["-e", "mpls.label", "-e", "ip.len", "-e", "ipv6.plen"]
    out = subprocess.run(["tshark", "-r", str(path), "-T", "fields", *fields], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    frames = total = 0
    for line in out.splitlines():
        label, ip_len, ipv6_plen = line.split("\t")
        assert label and (ip_len or ipv6_plen), line
        frames += 1
        total += int(ip_len.split(",")[0]) if ip_len else 40 + int(ipv6_plen.split(",")[0])
    return frames, total


@pytest.mark.root
@needs_libpcap
@needs_tcpdump
def test_mpls_labelled_traffic_gives_the_flows_of_the_plain_traffic(veth6: VethLink, tmp_path: Path) -> None:
    """Real traffic (TCP, UDP, ping, ping6) recorded by tcpdump, then labelled as an MPLS router would:
    replayed and captured live (sent into the veth from the other end), it gives the same flows.
    (This kernel has no MPLS forwarding (CONFIG_MPLS_ROUTING) nor tc's mpls action: the label stacks
    are pushed here, by the RFC.)"""
    plain, labelled, tagged = tmp_path / "plain.pcap", tmp_path / "labelled.pcap", tmp_path / "tagged.pcap"
    with tcpdump(veth6, plain):
        generate_traffic(veth6, tcp_bytes=1000, datagrams=3)  # frames below the MTU: they can be sent again
        veth6.ping(3, ipv6=True)
    frames = relabel(plain, labelled)
    relabel(plain, tagged, vlan=7)
    expected = ours(asyncio.run(replay_file(plain, tmp_path))[1], veth6)
    assert {flow[0] for flow in expected} == {1, 6, 17, 58}
    agent, flows = asyncio.run(replay_file(labelled, tmp_path))
    assert ours(flows, veth6) == expected and not agent.skipped
    assert ours(asyncio.run(replay_file(tagged, tmp_path))[1], veth6, vlan=7) == expected
    if shutil.which("tshark"):
        assert tshark_mpls_totals(labelled) == (agent.packets, sum(f.bytes_out + f.bytes_in for f in flows))

    ready, done = threading.Event(), threading.Event()

    def session() -> list[list[events_pb2.FlowEvent]]:
        live = FlowAgent(flow_config(tmp_path, interfaces=[veth6.if_a]), tmp_path)  # the default filter
        return asyncio.run(capture_until([live], tmp_path / "live.pcap", veth6.if_a, ready, done))

    def send() -> None:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sender:
            sender.bind((veth6.if_b, 0))
            for frame in frames:
                sender.send(frame)

    thread, outcome = in_namespace(veth6.ns_a, session)
    try:
        assert ready.wait(10), outcome
        sender, sent = in_namespace(veth6.ns_b, send)
        sender.join(10)
        assert sent == [None], sent
    finally:
        done.set()
        thread.join(30)
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    assert ours(outcome[0][0], veth6) == expected


# ---- fragments, from real traffic ----------------------------------------------------------------

TSHARK_FIELDS = ["frame.number", "ip.src", "ip.dst", "ipv6.src", "ipv6.dst", "ip.len", "ipv6.plen", "ip.fragment",
                 "ipv6.fragment", "icmp.ident", "icmpv6.echo.identifier", "udp.srcport", "udp.dstport", "tcp.srcport",
                 "tcp.dstport"]  # fmt: skip


def tshark_directions(path: Path) -> dict[tuple[Any, ...], tuple[int, int]]:
    """(protocol, src, src port, dst, dst port) -> (frames, IP bytes), one way, as tshark reassembles the
    datagrams: every fragment goes to the conversation of the datagram it was reassembled into."""
    args = ["tshark", "-r", str(path), "-T", "fields", *(x for f in TSHARK_FIELDS for x in ("-e", f))]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    rows = [dict(zip(TSHARK_FIELDS, line.split("\t"), strict=True)) for line in out.splitlines()]
    owner: dict[str, tuple[Any, ...]] = {}
    for row in rows:
        src, dst = row["ip.src"] or row["ipv6.src"], row["ip.dst"] or row["ipv6.dst"]
        if row["icmp.ident"] or row["icmpv6.echo.identifier"]:
            ident = int(row["icmp.ident"] or row["icmpv6.echo.identifier"], 0)
            key: tuple[Any, ...] = (1 if row["icmp.ident"] else 58, src, ident, dst, ident)
        elif row["udp.srcport"] or row["tcp.srcport"]:
            transport = "udp" if row["udp.srcport"] else "tcp"
            key = (17 if row["udp.srcport"] else 6, src, int(row[f"{transport}.srcport"]), dst,
                   int(row[f"{transport}.dstport"]))  # fmt: skip
        else:
            continue
        for number in (row["ip.fragment"] or row["ipv6.fragment"] or row["frame.number"]).split(","):
            owner[number] = key
    totals: dict[tuple[Any, ...], tuple[int, int]] = {}
    for row in rows:
        if row["frame.number"] in owner:
            size = int(row["ip.len"]) if row["ip.len"] else 40 + int(row["ipv6.plen"])
            frames, total = totals.get(owner[row["frame.number"]], (0, 0))
            totals[owner[row["frame.number"]]] = (frames + 1, total + size)
    return totals


def directions(flows: list[events_pb2.FlowEvent], link: VethLink) -> dict[tuple[Any, ...], tuple[int, int]]:
    """The counts of the flows between the link's ends one way at a time, as `tshark_directions` has them."""
    found = {}
    addresses = {link.ip_a, link.ip_b, link.ip6_a, link.ip6_b}
    for f in (f for f in flows if {f.src_ip, f.dst_ip} <= addresses):
        found[(f.protocol, f.src_ip, f.src_port, f.dst_ip, f.dst_port)] = (f.packets_out, f.bytes_out)
        if f.packets_in:
            found[(f.protocol, f.dst_ip, f.dst_port, f.src_ip, f.src_port)] = (f.packets_in, f.bytes_in)
    return found


@pytest.mark.root
@needs_libpcap
@needs_tcpdump
def test_fragmented_pings_and_datagrams_count_into_their_flows(veth6: VethLink, tmp_path: Path) -> None:
    """ping -s 4000 (IPv4 and IPv6), 3000-byte UDP datagrams and a TCP exchange over a 1280-byte MTU,
    captured live: no fragment makes a flow of its own or goes unattributed, and each direction's
    frames and bytes are those tshark finds in tcpdump's recording (it reassembles the datagrams).
    (The interface's counters also count the IPv6 multicast the kernel sends at any time.)"""
    recording = tmp_path / "fragments.pcap"
    ready, done = threading.Event(), threading.Event()

    def session() -> tuple[FlowAgent, list[list[events_pb2.FlowEvent]]]:
        agent = FlowAgent(flow_config(tmp_path, interfaces=[veth6.if_a]), tmp_path)
        return agent, asyncio.run(capture_until([agent], tmp_path / "recorder.pcap", veth6.if_a, ready, done))

    thread, outcome = in_namespace(veth6.ns_a, session)
    try:
        assert ready.wait(10), outcome
        with tcpdump(veth6, recording):
            veth6.ping(PINGS, size=4000)
            veth6.ping(PINGS, size=4000, ipv6=True)
            generate_traffic(veth6, tcp_bytes=1000, datagrams=5, datagram_bytes=3000)
    finally:
        done.set()
        thread.join(30)
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    agent, (flows,) = outcome[0]
    assert agent.table.fragments.unattributed == 0
    assert not [f for f in flows if f.protocol in (1, 17, 58) and f.src_port == f.dst_port == 0]
    counted = directions(flows, veth6)
    fragmented = [k for k, (frames, _) in counted.items() if k[0] != 6 and frames > PINGS]
    assert len(fragmented) == 5, counted  # ping and its replies, both families; the datagrams
    if shutil.which("tshark"):
        assert tshark_directions(recording) == counted


# ---- through a live hub ---------------------------------------------------------------------------------


async def stored_flows(live_hub: LiveHub, agent_id: str) -> list[events_pb2.FlowEvent]:
    stored = await live_hub.query(bus_pb2.EventFilter(agent_ids=[agent_id], kinds=["flow"]))
    return [s.event.flow for s in stored]


async def test_pcap_replay_through_the_runtime_reaches_the_hub(live_hub: LiveHub, tmp_path: Path) -> None:
    packets = [p for n in range(40) for p in handshake_data_close(30000 + n, start=n * 0.1)]
    path = tmp_path / "many.pcap"
    wrpcap(str(path), packets)
    _, expected = await replay_file(path, tmp_path)
    runtime = AgentRuntime("flow", None, agent_config(live_hub, tmp_path, "flow", flow={"pcap": str(path)}))
    task = asyncio.create_task(runtime.run())
    try:
        await asyncio.wait_for(runtime.agent.replayed.wait(), 30)  # type: ignore[attr-defined]
        for _ in range(300):
            if not runtime.buffer and runtime.outbox.sizes()[0] == 0:
                break
            await asyncio.sleep(0.05)
    finally:
        runtime._stopping.set()
        await asyncio.wait_for(task, 30)
    stored = await stored_flows(live_hub, runtime.agent_id)
    assert sorted(summary(f) for f in stored) == sorted(summary(f) for f in expected)
    assert len(stored) == 40 and {f.end_reason for f in stored} == {End.FIN}


@pytest.fixture
def lab() -> Iterator[NetLab]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2")
    with net_lab(prefix=28) as built:
        yield built


@pytest.mark.root
@needs_libpcap
async def test_live_capture_through_the_runtime_reports_open_flows_on_stop(
    live_hub: LiveHub, tmp_path: Path, lab: NetLab
) -> None:
    lab.device("d1", "02:00:00:00:00:11", lab.host(2))
    config = agent_config(live_hub, tmp_path, "flow", flow={"interfaces": [lab.uplink], "bpf": "icmp"})
    runtime = AgentRuntime("flow", None, config)
    task = asyncio.create_task(runtime.run())
    try:
        agent: FlowAgent = runtime.agent  # type: ignore[assignment]
        for _ in range(100):
            if agent.captures:
                break
            await asyncio.sleep(0.05)
        ping = await asyncio.create_subprocess_exec("ping", "-c", "4", "-i", "0.05", "-q", lab.host(2))
        assert await ping.wait() == 0
        await asyncio.sleep(0.2)
    finally:
        runtime._stopping.set()
        await asyncio.wait_for(task, 30)
    (flow,) = await stored_flows(live_hub, runtime.agent_id)
    assert summary(flow)[:9] == (1, lab.host(1), flow.src_port, lab.host(2), flow.src_port, 4, 4 * 84, 4, 4 * 84)
    assert (flow.interface, flow.end_reason) == (lab.uplink, End.SHUTDOWN)


async def test_cli_replay_delivers_every_flow_then_exits(live_hub: LiveHub, tmp_path: Path) -> None:
    path = tmp_path / "cli.pcap"
    wrpcap(str(path), [*handshake_data_close(31000), at(1, udp(A, B, 5000, 53))])
    config = agent_config(live_hub, tmp_path, "flow")
    config_path = tmp_path / "agent-flow.yml"
    config_path.write_text(yaml.safe_dump(msgspec.to_builtins(config)))
    command = [sys.executable, "-m", "amoskys", "agent", "flow", "--config", str(config_path)]
    missing = await asyncio.create_subprocess_exec(*command, "--pcap", str(tmp_path / "nope.pcap"),
                                                   stderr=asyncio.subprocess.PIPE)  # fmt: skip
    _, err = await missing.communicate()
    assert missing.returncode == 2 and b"flow.pcap:" in err and b"no such file" in err
    agent = await asyncio.create_subprocess_exec(*command, "--pcap", str(path), stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(agent.communicate(), 60)
    assert agent.returncode == 0, err.decode()
    stored = await stored_flows(live_hub, config.agent_id)
    assert sorted((f.protocol, f.end_reason) for f in stored) == [(6, End.FIN), (17, End.SHUTDOWN)]


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ("{idle_timeout_s: 0}", "key 'flow.idle_timeout_s': expected float > 0.0"),
        ("{max_flows: 0}", "key 'flow.max_flows': expected int >= 1"),
        ("{interfaces: eth0}", "key 'flow.interfaces': expected array, got str"),
        ("{interface: [eth0]}", "key 'flow.interface': unknown key; did you mean 'interfaces'?"),
    ],
)
def test_bad_flow_section_is_explained_at_load(tmp_path: Path, section: str, expected: str) -> None:
    assert section_error(tmp_path, "flow", f"flow: {section}\n").startswith(expected)
