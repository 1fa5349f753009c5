#!/usr/bin/env python3
"""snmp agent benchmark: RSS of the agent process polling a few targets, poll latency, concurrency.

    python benchmarks/snmp.py                     # all parts
    python benchmarks/snmp.py --part process      # `amoskys agent snmp` against snmpd, through a hub:
                                                  # one v2c target; then five targets and the trap receiver
    python benchmarks/snmp.py --part latency      # in-process poll latency (v2c, v3 SHA/AES)
    python benchmarks/snmp.py --part timeouts     # a dead target's timeout beside 12 busy ones
    python benchmarks/snmp.py --part imports      # resident memory of what the agent imports

Everything runs for real: Debian's snmpd on loopback (tests/snmpd.py), `amoskys eventbus` and
`amoskys agent snmp` as separate processes over mTLS, net-snmp's snmptrap for traps. RSS comes
from /proc (VmRSS now, VmHWM peak); poll latency is wall time of a whole poll (system group + the
interface table walk) as the agent does it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT)]

from hub import proc_stats, start_hub  # noqa: E402
from tests.snmpd import COMMUNITY, V3_USERS, Snmpd, run_snmpd  # noqa: E402

from agents import write_agent_config  # noqa: E402
from amoskys import pki  # noqa: E402
from amoskys.v1 import events_pb2  # noqa: E402

TRAP_COMMUNITY = "bench-trap-c0mm"


def targets(snmpd: Snmpd, silent_port: int) -> list[dict[str, Any]]:
    """v2c, v3 SHA/AES, v3 SHA256/AES256, a wrong v3 password and a device that never answers."""
    base = {"address": "127.0.0.1", "port": snmpd.port, "timeout_s": 1.0, "retries": 1}
    _, auth, _, priv = V3_USERS["amxuser"]
    _, auth256, _, priv256 = V3_USERS["amx256"]
    v3 = {"version": 3, "user": "amxuser", "auth_key": auth, "priv_key": priv}
    return [
        base | {"name": "v2c", "community": COMMUNITY},
        base | {"name": "v3-sha-aes"} | v3,
        base | {"name": "v3-sha256-aes256", "version": 3, "user": "amx256", "auth_protocol": "SHA256",
                "auth_key": auth256, "priv_protocol": "AES256", "priv_key": priv256},
        base | {"name": "v3-wrong-password"} | v3 | {"auth_key": "not-the-password"},
        base | {"name": "dead", "community": COMMUNITY, "port": silent_port},
    ]  # fmt: skip


def stored_kinds(work: Path, agent_id: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    with sqlite3.connect(f"file:{work / 'store' / 'events.db'}?mode=ro", uri=True, timeout=30) as conn:
        for (body,) in conn.execute("SELECT body FROM events WHERE agent_id = ? AND kind = 'snmp'", (agent_id,)):
            kind = events_pb2.SnmpEvent.Kind.Name(events_pb2.Event.FromString(body).snmp.kind)
            counts[kind] = counts.get(kind, 0) + 1
    return counts


def metrics_port(log: Path) -> int:
    for line in log.read_text().splitlines():
        if line.startswith("{") and json.loads(line).get("msg") == "agent running":
            return int(json.loads(line)["metrics_port"])
    return 0


def trap_port(log: Path) -> int:
    for line in log.read_text().splitlines():
        if line.startswith("{") and json.loads(line).get("msg") == "snmp agent running":
            return int(json.loads(line)["trap_port"])
    return 0


def poll_seconds(port: int) -> dict[str, dict[str, float]]:
    """Per target, from the agent's own histogram: polls, mean, and the buckets holding the median and the slowest."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    (family,) = [f for f in text_string_to_metric_families(text) if f.name == "amoskys_agent_snmp_poll_seconds"]
    found: dict[str, dict[str, Any]] = {}
    for sample in family.samples:
        entry = found.setdefault(sample.labels["target"], {"buckets": []})
        if sample.name.endswith("_bucket"):
            entry["buckets"].append((float(sample.labels["le"]), sample.value))
        else:
            entry[sample.name.rsplit("_", 1)[1]] = sample.value
    report = {}
    for target, entry in found.items():
        count = entry["count"]
        median = next(le for le, n in entry["buckets"] if n >= count / 2)
        slowest = next(le for le, n in entry["buckets"] if n >= count)
        report[target] = {"polls": count, "mean_ms": round(1000 * entry["sum"] / count, 1),
                          "p50_le_ms": 1000 * median, "max_le_ms": 1000 * slowest}  # fmt: skip
    return report


def send_traps(snmpd: Snmpd, port: int, count: int) -> float:
    started = time.monotonic()
    for i in range(count):
        subprocess.run(
            ["snmptrap", "-v2c", "-c", TRAP_COMMUNITY, f"127.0.0.1:{port}", "", "1.3.6.1.6.3.1.1.5.3",
             "1.3.6.1.2.1.2.2.1.1.1", "i", str(i)],
            env=snmpd.env(), check=True,
        )  # fmt: skip
    return time.monotonic() - started


def wait_for_log(log: Path, find: Any, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value: int = find(log)
        if value:
            return value
        time.sleep(0.1)
    raise SystemExit(f"agent did not start: {log.read_text()[-2000:]}")


def process_part(root: Path, snmpd: Snmpd, scenario: str, args: argparse.Namespace) -> dict[str, Any]:
    """`lab`: five targets and the trap receiver; `single`: one v2c target, no receiver."""
    work = root / scenario
    pki.init_ca(work / "ca")
    (work / "ids" / "trust").mkdir(parents=True)
    hub, port, _ = start_hub(work, work / "ids")
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    try:
        every = targets(snmpd, silent.getsockname()[1])
        snmp: dict[str, Any] = {"targets": every, "interval_s": args.interval}
        if scenario == "lab":
            snmp |= {"trap_listen": "127.0.0.1:0", "trap_communities": [TRAP_COMMUNITY]}
        else:
            snmp["targets"] = every[:1]
        config = write_agent_config(work, "snmp", port, snmp=snmp, metrics={"listen": "127.0.0.1:0"})
        hub.send_signal(1)  # SIGHUP: the hub learns the agent's key
        time.sleep(0.5)
        log = work / "agent-snmp.log"
        with log.open("wb") as err:
            agent = subprocess.Popen([sys.executable, "-m", "amoskys", "agent", "snmp", "--config", str(config)],
                                     stderr=err)  # fmt: skip
        try:
            traps = args.traps if scenario == "lab" else 0
            return {"scenario": scenario, "targets": len(snmp["targets"])} | run_agent(
                work, snmpd, agent, log, args.seconds, traps
            )
        finally:
            agent.terminate()
            agent.wait(30)
    finally:
        silent.close()
        hub.terminate()
        hub.wait(30)


def run_agent(
    work: Path, snmpd: Snmpd, agent: subprocess.Popen[bytes], log: Path, seconds: float, traps: int
) -> dict[str, Any]:
    metrics = wait_for_log(log, metrics_port)
    trap_seconds = send_traps(snmpd, wait_for_log(log, trap_port), traps) if traps else 0.0
    before = proc_stats(agent.pid)
    time.sleep(seconds)
    after = proc_stats(agent.pid)
    latency = poll_seconds(metrics)
    time.sleep(1.0)  # the last batch reaches the hub
    return {
        "part": "process",
        "seconds": seconds,
        "rss_mb": round(after["rss_mb"], 1),
        "peak_rss_mb": round(after["peak_rss_mb"], 1),
        "cpu_percent_of_one_core": round(100 * (after["cpu_s"] - before["cpu_s"]) / seconds, 2),
        "poll_ms_by_target": latency,
        "traps_sent": traps,
        "trap_send_s": round(trap_seconds, 1),
        "stored_by_kind": stored_kinds(work, "bench-snmp"),
    }


async def poll_latency(snmpd: Snmpd, polls: int) -> dict[str, Any]:
    import msgspec
    from pysnmp.hlapi.v3arch.asyncio import SnmpEngine

    from amoskys.agents.snmp.agent import TargetPoller
    from amoskys.agents.snmp.config import SnmpTarget

    result: dict[str, Any] = {"part": "latency", "polls": polls}
    for spec in targets(snmpd, 9)[:2]:
        poller = TargetPoller(msgspec.convert(spec, SnmpTarget), SnmpEngine(), [])
        started = time.perf_counter()
        await poller.poll()  # the first poll also loads pysnmp's MIB modules (and discovers the v3 engine)
        first_ms = 1000 * (time.perf_counter() - started)
        times = []
        for _ in range(polls):
            started = time.perf_counter()
            await poller.poll()
            times.append(1000 * (time.perf_counter() - started))
        times.sort()
        result[spec["name"]] = {
            "interfaces": len((await poller.poll()).interfaces),
            "first_poll_ms": round(first_ms, 1),
            "p50_ms": round(statistics.median(times), 2),
            "p95_ms": round(times[int(len(times) * 0.95)], 2),
            "p99_ms": round(times[int(len(times) * 0.99)], 2),
        }
    # 20 targets at once on one engine (the agent shares an engine per credential set)
    engine = SnmpEngine()
    many = [TargetPoller(msgspec.convert(targets(snmpd, 9)[0] | {"name": f"t{i}"}, SnmpTarget), engine, [])
            for i in range(20)]  # fmt: skip
    started = time.perf_counter()
    await asyncio.gather(*(p.poll() for p in many))
    result["20_targets_concurrently_ms"] = round(1000 * (time.perf_counter() - started), 1)
    return result


async def timeout_beside_busy_targets(snmpd: Snmpd, rounds: int = 5) -> dict[str, Any]:
    """A dead target (2 attempts of 1 s) polled at once with 12 live ones, on one engine: how long its
    timeout takes by the clock (2 s ideally), and how late the event loop ran timers meanwhile."""
    import msgspec
    from pysnmp.hlapi.v3arch.asyncio import SnmpEngine

    from amoskys.agents.snmp.agent import PollError, TargetPoller
    from amoskys.agents.snmp.config import SnmpTarget

    lags: list[float] = []

    async def probe() -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(0.01)
            lags.append(time.perf_counter() - before - 0.01)

    async def dead_poll(poller: TargetPoller) -> float:
        started = time.perf_counter()
        with contextlib.suppress(PollError):
            await poller.poll()
        return time.perf_counter() - started

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        engine = SnmpEngine()
        spec = targets(snmpd, silent.getsockname()[1])
        live = [TargetPoller(msgspec.convert(spec[0] | {"name": f"t{i}"}, SnmpTarget), engine, []) for i in range(12)]
        dead = TargetPoller(msgspec.convert(spec[-1], SnmpTarget), engine, [])
        prober = asyncio.create_task(probe())
        took = []
        for _ in range(rounds):
            took.append((await asyncio.gather(dead_poll(dead), *(p.poll() for p in live)))[0])
        prober.cancel()
    return {"part": "timeouts", "rounds": rounds, "dead_timeout_configured_s": 2.0,
            "dead_timeout_took_s": [round(t, 2) for t in took], "loop_lag_max_s": round(max(lags), 3)}  # fmt: skip


def import_cost() -> dict[str, Any]:
    """Peak RSS of a fresh interpreter after each import (what the agent process pays for them)."""
    agent = "import amoskys.agents.runtime.runner, amoskys.agents.snmp.agent as s"
    probes = {
        "python": "pass",
        "runtime": "import amoskys.agents.runtime.runner",
        "pysnmp_hlapi": "import pysnmp.hlapi.v3arch.asyncio",
        "runtime_and_snmp_agent": "import amoskys.agents.runtime.runner, amoskys.agents.snmp.agent",
        "plus_one_snmp_engine": f"{agent}; s.SnmpEngine()",
        "plus_two_snmp_engines": f"{agent}; s.SnmpEngine(), s.SnmpEngine()",
    }
    result: dict[str, Any] = {"part": "imports"}
    for name, statement in probes.items():
        code = f"{statement}\nimport os; print(dict(l.split(':', 1) for l in open('/proc/self/status'))['VmHWM'])"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        result[f"{name}_mb"] = round(int(out.split()[0]) / 1024, 1)  # VmHWM: ru_maxrss survives fork+exec
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["process", "latency", "timeouts", "imports", "all"], default="all")
    parser.add_argument("--seconds", type=float, default=30.0, help="how long the agent process is watched")
    parser.add_argument("--interval", type=float, default=5.0, help="snmp.interval_s of the agent process")
    parser.add_argument("--traps", type=int, default=100)
    parser.add_argument("--polls", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="amoskys-snmp-bench-") as tmp:
        work = Path(tmp)
        with run_snmpd(work / "snmpd") as snmpd:
            if args.part in ("imports", "all"):
                print(json.dumps(import_cost()), flush=True)
            if args.part in ("latency", "all"):
                print(json.dumps(asyncio.run(poll_latency(snmpd, args.polls))), flush=True)
            if args.part in ("timeouts", "all"):
                print(json.dumps(asyncio.run(timeout_beside_busy_targets(snmpd))), flush=True)
            if args.part in ("process", "all"):
                for scenario in ("single", "lab"):
                    print(json.dumps(process_part(work, snmpd, scenario, args)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
