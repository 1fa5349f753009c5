#!/usr/bin/env python3
"""Fairness under attack: a well-behaved agent's ack latency while others flood and stall.

    python benchmarks/hub_fairness.py                  # 60 s
    python benchmarks/hub_fairness.py --duration 20
    python benchmarks/hub_fairness.py --agent-process  # the well-behaved agent in a process of its own
    python benchmarks/hub_fairness.py --part-events 100  # large commits written in parts of 100 events
    python benchmarks/hub_fairness.py --without floods   # only the 20 stalled consumers
    python benchmarks/hub_fairness.py --busy-pending 20000  # no tighter cap per identity while the hub is busy

The hub runs as its own process (`amoskys eventbus`, default limits and backpressure). Two
enrolled identities flood it: each keeps `--senders` publishes of 1000-event envelopes in flight
and ignores RETRY and its backoff. Twenty configured consumers subscribe and never read (and
subscribe again when cut). Meanwhile a well-behaved agent publishes 1,000 events/s in envelopes
of 10 on one PublishStream, one envelope in flight, honouring RETRY (on the event loop that drives the
floods, so its latency includes that loop's delays; `--agent-process` runs it in a process of its
own, as an agent on another host). Prints one JSON object: the
well-behaved agent's ack latency percentiles (target p99 < 50 ms) and its answers, the floods'
answers and what of them was stored, consumers cut, hub CPU.

The hostile client and the hub process come from tests/hostile/ (written from the proto only).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import json
import multiprocessing
import os
import sqlite3
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/hostile: the client and the hub process

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from tests.hostile.client import Credentials, HostileAgent, next_ack, publish_stream
from tests.hostile.hub import HubProcess, new_pki
from tests.hostile.pressure import Pressure

from amoskys.v1 import envelope_pb2

STALLED = [f"stall{n}" for n in range(20)]
Status = envelope_pb2.PublishAck.Status


def _percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] if ordered else float("nan")


async def well_behaved(agent: HostileAgent, address: str, duration: float, rate: int, batch: int) -> dict[str, Any]:
    """`rate` events/s in envelopes of `batch`, one in flight, for `duration` s (fewer when acks come
    late: the achieved rate is reported); RETRY waits its backoff and resends. Latency: from the first
    send of an envelope to its final ack."""
    latencies: list[float] = []
    answers: collections.Counter[str] = collections.Counter()
    interval = batch / rate
    async with agent.tls.channel(address) as channel:
        stream = publish_stream(channel)
        start = time.monotonic()
        n = 0
        while time.monotonic() < start + duration:
            await asyncio.sleep(max(0.0, start + n * interval - time.monotonic()))  # on schedule, or late
            raw = agent.seal(agent.events(batch, "good")).SerializeToString()
            sent = time.perf_counter()
            while True:
                await stream.write(raw)
                ack = await next_ack(stream)
                answers[Status.Name(ack.status)] += 1
                if ack.status != Status.RETRY:
                    break
                await asyncio.sleep(ack.backoff_ms / 1000)
            latencies.append((time.perf_counter() - sent) * 1000)
            n += 1
        elapsed = time.monotonic() - start
        await stream.done_writing()
    return {
        "achieved_eps": round(n * batch / elapsed),
        "acks": dict(answers),
        "ack_ms": {p: round(_percentile(latencies, float(p[1:])), 2) for p in ("p50", "p95", "p99")}
        | {"max": round(max(latencies), 2)},
    }


def _well_behaved_alone(
    identity: tuple[str, str, str, Credentials], key: bytes, address: str, args: argparse.Namespace
) -> dict[str, Any]:
    """`well_behaved` in this (child) process; `key` is the agent's raw signing key (a key object does not pickle)."""
    agent = HostileAgent(*identity, key=Ed25519PrivateKey.from_private_bytes(key))
    return asyncio.run(well_behaved(agent, address, args.duration, args.rate, args.batch))


async def _measure(agent: HostileAgent, address: str, args: argparse.Namespace) -> dict[str, Any]:
    if not args.agent_process:
        return await well_behaved(agent, address, args.duration, args.rate, args.batch)
    key = agent.key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    identity = (agent.agent_id, agent.host, agent.kind, agent.tls)
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        future = pool.submit(_well_behaved_alone, identity, key, address, args)
        return await asyncio.wrap_future(future)


def _hub_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _counters(port: int) -> dict[str, int]:
    """The hub's Prometheus counters (subscribers cut, retries by reason), by sample name with labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        lines = answer.read().decode().splitlines()
    return {
        name: int(float(value))
        for name, _, value in (line.rpartition(" ") for line in lines if line and not line.startswith("#"))
        if "_total" in name
    }


def _stored(db: Path) -> dict[str, int]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return dict(conn.execute("SELECT agent_id, count(*) FROM events GROUP BY agent_id").fetchall())


async def scenario(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    backpressure = {"commit_part_events": args.part_events, "busy_pending_per_agent": args.busy_pending}
    parts = {"backpressure": {k: v for k, v in backpressure.items() if v}}
    hub = HubProcess(
        root, new_pki(root / "pki"), consumers=["ui", *STALLED], metrics={"listen": "127.0.0.1:0"}, **parts
    )
    attacks = {"floods", "stalls"} - set(args.without) if not args.baseline else set()
    flooders = [hub.enrol(f"flood{n}-proc", f"flood{n}", "proc") for n in (1, 2)] if "floods" in attacks else []
    stalled = STALLED if "stalls" in attacks else []
    good = hub.enrol("good1-proc", "good1", "proc")
    hub.start()
    assert hub.proc is not None
    try:
        async with Pressure(hub, flooders, stalled, senders=args.senders, pool=args.pool) as pressure:
            await asyncio.sleep(args.warmup)
            cpu0, t0 = _hub_cpu_s(hub.proc.pid), time.monotonic()
            result = await _measure(good, hub.address, args)
            cpu = (_hub_cpu_s(hub.proc.pid) - cpu0) / (time.monotonic() - t0)
            floods = dict(pressure.answers)
            counters = _counters(hub.metrics_port)
    finally:
        hub.stop()
    stored = _stored(root / "store" / "events.db")
    flood_stored = sum(v for k, v in stored.items() if k.startswith("flood"))
    return {
        "scenario": "baseline (no attack)" if args.baseline else " without ".join(["fairness", *args.without]),
        "agent_process": args.agent_process,
        "commit_part_events": args.part_events or "default",
        "busy_pending_per_agent": args.busy_pending or "default",
        "well_behaved": {"rate_eps": args.rate, "batch": args.batch, **result, "stored": stored.get("good1-proc", 0)},
        "floods": {
            "identities": len(flooders), "in_flight_each": args.senders, "answers": floods,
            "events_stored": flood_stored, "stored_eps": round(flood_stored / (args.duration + args.warmup)),
        },
        "stalled_consumers": {"count": len(stalled), "cut": counters.get("amoskys_bus_subscribers_cut_total", 0)},
        "hub_retries": {k.split('"')[1]: v for k, v in counters.items() if k.startswith("amoskys_bus_retries_total{")},
        "hub_cpu_cores": round(cpu, 2),
        "load": Path("/proc/loadavg").read_text().split()[:3],
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of flooding before measuring")
    parser.add_argument("--rate", type=int, default=1000, help="the well-behaved agent's events/s")
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--senders", type=int, default=32, help="publishes each flooder keeps in flight")
    parser.add_argument("--pool", type=int, default=100, help="distinct 1000-event envelopes per flooder")
    parser.add_argument("--baseline", action="store_true", help="the well-behaved agent alone, for comparison")
    parser.add_argument(
        "--without",
        action="append",
        choices=["floods", "stalls"],
        default=[],
        help="leave out one attack, to see the other's cost",
    )
    parser.add_argument("--agent-process", action="store_true", help="the well-behaved agent in its own process")
    parser.add_argument("--part-events", type=int, help="the hub's backpressure.commit_part_events (default: its own)")
    parser.add_argument(
        "--busy-pending", type=int, help="the hub's backpressure.busy_pending_per_agent (default: its own)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="amoskys-fairness-") as tmp:
        print(json.dumps(asyncio.run(scenario(Path(tmp), args)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
