#!/usr/bin/env python3
"""Flow agent benchmarks: pcap replay speed per core, and the agent process's RSS. Prints JSON lines.

    python benchmarks/flow.py                         # everything below
    python benchmarks/flow.py --part replay           # packets/s through reader + parser + flow table, one core
    python benchmarks/flow.py --part rss              # `amoskys agent flow --pcap` against a real hub, RSS from /proc
    python benchmarks/flow.py --part live --rate 100000   # root: live capture of frames sent onto a veth pair

The pcap is synthetic but shaped like real traffic: TCP connections (handshake, data both ways,
FIN), UDP request/response pairs and ICMP echo, 15 % IPv6, 10 % behind an 802.1Q tag, `--flows`
of them open at any time, new ones replacing those that end. Frames are written with snaplen
128 (headers; wire lengths kept), like `tcpdump -s 128`; `--full-frames` writes whole frames.
For comparison the same frames are dissected with scapy (`Ether(frame)`), which the agent does not do.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import secrets
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec

from amoskys import pki
from amoskys.agents.flow.agent import FlowAgent
from amoskys.agents.flow.config import FlowAgentConfig, FlowConfig
from amoskys.agents.flow.packets import PcapReader, parse_frame

sys.path.insert(0, str(Path(__file__).parent))
from hub import proc_stats, start_hub

from agents import write_agent_config

SNAPLEN = 128
TCP, UDP, ICMP, ICMP6 = 6, 17, 1, 58


class SyntheticFlow:
    """One conversation's frames, generated on demand: headers built once, lengths varied."""

    def __init__(self, n: int, rng: random.Random) -> None:
        self.rng = rng
        self.ipv6 = rng.random() < 0.15
        self.vlan = rng.randrange(1, 4095) if rng.random() < 0.10 else 0
        kind = rng.random()
        self.protocol = TCP if kind < 0.7 else UDP if kind < 0.92 else (ICMP6 if self.ipv6 else ICMP)
        if self.ipv6:
            self.client, self.server = b"\xfd" + n.to_bytes(15, "big"), b"\xfd" + b"\x01" * 15
        else:
            self.client = bytes([10, 1]) + (n % 65536).to_bytes(2, "big")
            self.server = bytes([10, 200, rng.randrange(256), rng.randrange(1, 255)])
        self.cport, self.sport = 1024 + n % 60000, rng.choice((53, 80, 443, 8080, 5432))
        self.script = self._script(rng)

    def _script(self, rng: random.Random) -> list[tuple[bool, int, int]]:
        """(from client, tcp flags, payload bytes) for each frame of the conversation."""
        if self.protocol == TCP:
            data = [(i % 3 != 2, 0x18, rng.choice((0, 100, 536, 1448))) for i in range(rng.randrange(2, 40))]
            return [(True, 0x02, 0), (False, 0x12, 0), (True, 0x10, 0), *data,
                    (True, 0x11, 0), (False, 0x11, 0), (True, 0x10, 0)]  # fmt: skip
        pairs = rng.randrange(1, 6)
        return [(i % 2 == 0, 0, rng.choice((32, 64, 200, 512))) for i in range(2 * pairs)]

    def frame(self, step: int) -> tuple[bytes, int]:
        """(captured bytes, wire length) of frame `step`."""
        from_client, flags, payload = self.script[step]
        src, dst = (self.client, self.server) if from_client else (self.server, self.client)
        sport, dport = (self.cport, self.sport) if from_client else (self.sport, self.cport)
        if self.protocol == TCP:
            l4 = struct.pack(">HHIIBBHHH", sport, dport, step, step, 0x50, flags, 65535, 0, 0)
        elif self.protocol == UDP:
            l4 = struct.pack(">HHHH", sport, dport, 8 + payload, 0)
        else:
            echo = (8 if from_client else 0) if self.protocol == ICMP else (128 if from_client else 129)
            l4 = struct.pack(">BBHHH", echo, 0, 0, self.cport, step)
        l4_length = len(l4) + payload
        if self.ipv6:
            ip = struct.pack(">IHBB", 0x60000000, l4_length, self.protocol, 64) + src + dst
            ethertype = 0x86DD
        else:
            ip = struct.pack(">BBHHHBBH", 0x45, 0, 20 + l4_length, step, 0, 64, self.protocol, 0) + src + dst
            ethertype = 0x0800
        link = b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01"
        link += struct.pack(">HHH", 0x8100, self.vlan, ethertype) if self.vlan else struct.pack(">H", ethertype)
        frame = link + ip + l4
        return frame + b"\0" * payload, len(frame) + payload


def write_pcap(path: Path, packets: int, concurrent: int, full_frames: bool, seed: int = 7) -> dict[str, int]:
    """A synthetic capture: `concurrent` conversations open at once, 10 us apart, new ones replacing ended ones."""
    rng = random.Random(seed)
    flows = [SyntheticFlow(n, rng) for n in range(concurrent)]
    steps = [0] * concurrent
    started = concurrent
    ts_us = 1_700_000_000 * 1_000_000
    record = struct.Struct("<IIII").pack
    written = 0
    with path.open("wb") as out:
        out.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535 if full_frames else SNAPLEN, 1))
        for n in range(packets):
            slot = rng.randrange(concurrent)
            frame, wire = flows[slot].frame(steps[slot])
            data = frame if full_frames else frame[:SNAPLEN]
            ts_us += 10
            out.write(record(ts_us // 1_000_000, ts_us % 1_000_000, len(data), wire))
            out.write(data)
            written += len(data) + 16
            steps[slot] += 1
            if steps[slot] == len(flows[slot].script):
                flows[slot], steps[slot] = SyntheticFlow(started, rng), 0
                started += 1
            if n % 500_000 == 499_999:
                print(f"  ... {n + 1} packets written", file=sys.stderr)
    return {"packets": packets, "conversations_started": started, "file_bytes": written + 24}


def replay_in_process(pcap: Path) -> dict[str, Any]:
    """The agent's own replay path (reader, parser, table, FlowEvent and Event objects), timed on one core."""
    config = msgspec.convert({"host": "bench", "flow": {"pcap": str(pcap)}}, FlowAgentConfig)

    async def run() -> tuple[int, int, int]:
        agent = FlowAgent(config, Path(tempfile.gettempdir()))
        flows = [event.flow async for event in agent.collect()]
        return len(flows), sum(f.packets_out + f.packets_in for f in flows), agent.packets

    cpu, wall = time.process_time(), time.perf_counter()
    flows, in_flows, counted = asyncio.run(run())
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    records = sum(1 for _ in PcapReader(pcap).records())
    return {"records": records, "packets_counted": counted, "packets_in_reported_flows": in_flows,
            "flows_reported": flows, "cpu_s": round(cpu, 2), "wall_s": round(wall, 2),
            "packets_per_s_per_core": round(records / cpu)}  # fmt: skip


def stage_costs(pcap: Path, limit: int = 300_000) -> dict[str, Any]:
    """Where the time goes: reading records alone, reading + parsing, and scapy's dissection for contrast."""
    reader = PcapReader(pcap)
    linktype = reader.interfaces[0].linktype
    started = time.process_time()
    frames = []
    for n, (_ts, _iface, buf, start, end, _wire) in enumerate(reader.records()):
        if n < 20_000:
            frames.append(buf[start:end])
        if n == limit:
            break
    read_s = time.process_time() - started
    reader = PcapReader(pcap)
    started = time.process_time()
    for n, (_ts, _iface, buf, start, end, wire) in enumerate(reader.records()):
        parse_frame(buf, start, end, wire, linktype)
        if n == limit:
            break
    parse_s = time.process_time() - started
    from scapy.layers.l2 import Ether

    started = time.process_time()
    for frame in frames:
        Ether(frame)
    scapy_s = time.process_time() - started
    return {"read_only_packets_per_s": round(limit / read_s), "read_and_parse_packets_per_s": round(limit / parse_s),
            "scapy_dissect_packets_per_s": round(len(frames) / scapy_s)}  # fmt: skip


@contextlib.contextmanager
def bench_hub(work: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """`amoskys eventbus` with a temporary PKI; yields the process and its port."""
    pki.init_ca(work / "ca")
    (work / "ids" / "trust").mkdir(parents=True)
    hub, port, _ = start_hub(work, work / "ids")
    try:
        yield hub, port
    finally:
        hub.terminate()
        hub.wait(30)


def trust_agent(work: Path, hub: subprocess.Popen[bytes], port: int, **sections: Any) -> Path:
    """The flow agent's config, its key in the hub's trust map (SIGHUP: the hub reloads it)."""
    config = write_agent_config(work, "flow", port, **sections)
    hub.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    return config


def agent_process_rss(work: Path, pcap: Path, max_flows: int) -> dict[str, Any]:
    """`amoskys agent flow --pcap` as its own process, delivering to `amoskys eventbus`; RSS sampled from /proc."""
    with bench_hub(work) as (hub, port):
        config = trust_agent(work, hub, port, flow={"max_flows": max_flows})
        command = [sys.executable, "-m", "amoskys", "agent", "flow", "--config", str(config), "--pcap", str(pcap)]
        started = time.monotonic()
        agent = subprocess.Popen(command, stderr=(work / "agent.log").open("wb"))
        peak, samples, cpu = 0.0, [], 0.0
        while agent.poll() is None:
            try:
                stats = proc_stats(agent.pid)
            except (FileNotFoundError, ProcessLookupError, KeyError, IndexError):
                break
            samples.append(stats["rss_mb"])
            peak, cpu = max(peak, stats["peak_rss_mb"]), stats["cpu_s"]
            time.sleep(0.1)
        elapsed = time.monotonic() - started
        agent.wait(60)
        stored = stored_flows(work)
    return {"max_flows": max_flows, "exit_code": agent.returncode, "run_s": round(elapsed, 1),
            "agent_cpu_s": round(cpu, 1), "flows_stored_at_hub": stored,
            "rss_mb_max_sampled": round(max(samples, default=0), 1), "peak_rss_mb": round(peak, 1)}  # fmt: skip


def stored_flows(work: Path) -> int:
    with sqlite3.connect(f"file:{work / 'store' / 'events.db'}?mode=ro", uri=True) as conn:
        return int(conn.execute("SELECT count(*) FROM events WHERE kind = 'flow'").fetchone()[0])


# ---- live capture: frames sent onto a veth pair (no addresses, IPv6 off: nothing else on it) ----


def send_frames(pcap: Path, interface: str, rate: int, seconds: float) -> None:
    """Send the pcap's frames (cycling) out of `interface` at `rate` frames/s for `seconds` (its own process)."""
    reader = PcapReader(pcap)
    frames = [buf[start:end] for _, _, buf, start, end, _ in itertools.islice(reader.records(), 200_000)]
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    sock.bind((interface, 0))
    sent, started, batch = 0, time.monotonic(), max(1, rate // 1000)
    for frame in itertools.cycle(frames):
        sock.send(frame)
        sent += 1
        if sent % batch == 0:
            ahead = sent / rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
            if time.monotonic() - started >= seconds:
                break
    print(json.dumps({"sent": sent, "send_s": round(time.monotonic() - started, 2)}))


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        lines = reply.read().decode().splitlines()
    return {name: float(value) for name, _, value in (line.rpartition(" ") for line in lines)
            if name.startswith("amoskys_agent_flow")}  # fmt: skip


def live_capture(work: Path, pcap: Path, rate: int, seconds: float) -> dict[str, Any]:
    tag = secrets.token_hex(3)
    sender_if, capture_if = f"amxs{tag}", f"amxc{tag}"
    subprocess.run(["ip", "link", "add", sender_if, "type", "veth", "peer", "name", capture_if], check=True)
    try:
        for name in (sender_if, capture_if):
            subprocess.run(["sysctl", "-qw", f"net.ipv6.conf.{name}.disable_ipv6=1"], check=True)
            subprocess.run(["ip", "link", "set", name, "up"], check=True)
        with bench_hub(work) as (hub, port):
            config = trust_agent(work, hub, port, flow={"interfaces": [capture_if]},
                                 metrics={"listen": "127.0.0.1:0"}, logging={"format": "json"})  # fmt: skip
            return _measure_live(work, config, pcap, sender_if, rate, seconds)
    finally:
        subprocess.run(["ip", "link", "del", sender_if], check=False)


def _measure_live(work: Path, config: Path, pcap: Path, sender_if: str, rate: int, seconds: float) -> dict[str, Any]:
    """Start the agent, send for `seconds`, read its CPU and RSS from /proc and its counters from /metrics."""
    log = work / "agent.log"
    agent = subprocess.Popen([sys.executable, "-m", "amoskys", "agent", "flow", "--config", str(config)],
                             stderr=log.open("wb"))  # fmt: skip
    try:
        metrics_port = 0
        while not metrics_port:
            time.sleep(0.2)
            for line in log.read_text().splitlines():
                entry = json.loads(line) if line.startswith("{") else {}
                metrics_port = entry.get("metrics_port", 0) if entry.get("msg") == "agent running" else metrics_port
        time.sleep(1)
        idle_rss = proc_stats(agent.pid)["rss_mb"]
        before = proc_stats(agent.pid)
        sender = subprocess.run([sys.executable, __file__, "--send", str(pcap), "--interface", sender_if,
                                 "--rate", str(rate), "--seconds", str(seconds)],
                                capture_output=True, text=True, check=True)  # fmt: skip
        time.sleep(1)
        after = proc_stats(agent.pid)
        counters = scrape(metrics_port)
    finally:
        agent.terminate()
        agent.wait(60)
    sent = json.loads(sender.stdout)
    return {"target_rate": rate, **sent, "agent_exit_code": agent.returncode,
            "packets_counted": int(counters.get("amoskys_agent_flow_packets_total", 0)),
            "kernel_drops": int(counters.get("amoskys_agent_flow_kernel_drops_total", 0)),
            "open_flows_at_end": int(counters.get("amoskys_agent_flow_open", 0)),
            "agent_cpu_percent_of_one_core": round(100 * (after["cpu_s"] - before["cpu_s"]) / sent["send_s"], 1),
            "idle_rss_mb": round(idle_rss, 1), "rss_mb": round(after["rss_mb"], 1),
            "peak_rss_mb": round(after["peak_rss_mb"], 1), "flows_stored_at_hub": stored_flows(work)}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["replay", "rss", "live", "all"], default="all")
    parser.add_argument("--packets", type=int, default=2_000_000)
    parser.add_argument("--flows", type=int, default=20_000, help="conversations open at once")
    parser.add_argument("--full-frames", action="store_true")
    parser.add_argument("--rate", type=int, default=100_000, help="live: frames/s sent")
    parser.add_argument("--seconds", type=float, default=10.0, help="live: how long")
    parser.add_argument("--send", type=Path, help=argparse.SUPPRESS)  # the live part's sender process
    parser.add_argument("--interface", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.send:
        send_frames(args.send, args.interface, args.rate, args.seconds)
        return 0
    with tempfile.TemporaryDirectory(prefix="amoskys-flow-bench-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        pcap = work / "synthetic.pcap"
        shape = write_pcap(pcap, args.packets, args.flows, args.full_frames)
        print(json.dumps({"pcap": {**shape, "concurrent_flows": args.flows, "full_frames": args.full_frames}}))
        if args.part in ("replay", "all"):
            print(json.dumps({"replay": replay_in_process(pcap)}), flush=True)
            print(json.dumps({"stages": stage_costs(pcap)}), flush=True)
        if args.part in ("rss", "all"):
            print(json.dumps({"rss": agent_process_rss(work / "rss", pcap, FlowConfig().max_flows)}), flush=True)
            full = work / "full-table.pcap"
            shape = write_pcap(full, 2_000_000, 100_000, False, seed=11)
            print(json.dumps({"full_table_pcap": {**shape, "concurrent_flows": 100_000}}), flush=True)
            rss_full = agent_process_rss(work / "rss-full", full, FlowConfig().max_flows)
            print(json.dumps({"rss_full_table": rss_full}), flush=True)
        if args.part in ("live", "all"):
            if os.geteuid() != 0 or not shutil.which("ip"):
                print(json.dumps({"live": "skipped: needs root and iproute2"}))
            else:
                print(json.dumps({"live": live_capture(work / "live", pcap, args.rate, args.seconds)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
