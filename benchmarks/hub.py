#!/usr/bin/env python3
"""Hub benchmarks: throughput, ack latency, many connections. One JSON object per run, then the medians.

    python benchmarks/hub.py --scenario throughput   # 8 agents, batches of 500, 60 s, streaming
    python benchmarks/hub.py --scenario latency      # 1,000 events/s in batches of 10, one in flight
    python benchmarks/hub.py --scenario connections  # 5,000 agents at 1 event/s each
    python benchmarks/hub.py --scenario throughput --runs 3 --duration 30 --processes 2

The hub runs as its own process (`amoskys eventbus`) and the load generator as another
(`amoskys loadgen`: the agents' own publisher), both on this machine over loopback mTLS, a fresh
hub and store for every run. Every figure is measured: events acked per second by the load
generator, ack latency percentiles, hub CPU seconds and peak RSS from /proc, the count of events
in the store after the run, and the machine's load average before and after (the figures depend
on it: the hub and the load generator share the machine's cores with whatever else runs).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from amoskys import pki
from amoskys.loadgen import ensure_identities

SCENARIOS: dict[str, dict[str, Any]] = {
    "throughput": {"agents": 8, "batch": 500, "rate": 0, "duration": 60, "inflight": 8},
    "latency": {"agents": 8, "batch": 10, "rate": 1000, "duration": 60, "inflight": 1},
    "connections": {
        "agents": 5000,
        "batch": 5,  # 1 event/s per agent, sent every 5 s (the agent runtime's linger)
        "rate": 5000,
        "duration": 60,
        "inflight": 4,
        "processes": 2,
    },
}


def proc_stats(pid: int) -> dict[str, float]:
    """CPU seconds (user+system) and peak/current RSS (MB) of a live process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {
        "cpu_s": cpu,
        "rss_mb": int(status["VmRSS"].split()[0]) / 1024,
        "peak_rss_mb": int(status["VmHWM"].split()[0]) / 1024,
    }


def open_streams(metrics_port: int) -> int:
    """The hub's amoskys_bus_streams gauge (publish streams open now)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith("amoskys_bus_streams "):
                return int(float(line.split()[1]))
    return 0


def hub_config(work: Path, identities: Path, metrics_listen: str) -> dict[str, Any]:
    """A benchmark hub's config: the CA in work/ca, its server certificate (issued once), a fresh store."""
    key, cert = work / "tls" / "hub.key", work / "tls" / "hub.crt"
    if not cert.exists():
        pki.issue(pki.load_ca(work / "ca"), work / "tls", "hub", "server", ["localhost"])
    return {
        "listen": "127.0.0.1:0",
        "tls": {"ca": str(work / "ca" / "ca.crt"), "cert": str(cert), "key": str(key)},
        "trust_map": str(identities / "trust"),
        "crl": str(work / "crl.pem"),
        "store": {"path": str(work / "store" / "events.db")},
        "metrics": {"listen": metrics_listen},
    }


def start_hub(work: Path, identities: Path) -> tuple[subprocess.Popen[bytes], int, int]:
    config = hub_config(work, identities, "127.0.0.1:0")
    (work / "eventbus.yml").write_text(yaml.safe_dump(config))
    log = (work / "hub.log").open("wb")
    hub = subprocess.Popen(
        [sys.executable, "-m", "amoskys", "eventbus", "--config", str(work / "eventbus.yml")], stderr=log
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for line in (work / "hub.log").read_text().splitlines():
            if '"eventbus serving"' in line:
                entry = json.loads(line)
                return hub, int(entry["port"]), int(entry["metrics_port"])
        time.sleep(0.1)
    hub.kill()
    raise SystemExit(f"hub did not start: {(work / 'hub.log').read_text()}")


LOADGEN = [sys.executable, "-m", "amoskys", "loadgen"]


def run_scenario(name: str, params: dict[str, Any], loadgen_command: list[str] = LOADGEN) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="amoskys-bench-") as tmp:
        work = Path(tmp)
        pki.init_ca(work / "ca")
        identities = work / "ids"
        ensure_identities(work / "ca", identities, params["agents"])
        hub, port, metrics_port = start_hub(work, identities)
        load_before = os.getloadavg()
        try:
            before = proc_stats(hub.pid)
            started = time.monotonic()
            command = [
                *loadgen_command, "--hub", f"127.0.0.1:{port}", "--server-name", "localhost",
                "--ca", str(work / "ca" / "ca.crt"), "--identities", str(identities),
                *(f"--{key}={value}" for key, value in params.items()),
            ]  # fmt: skip
            children_cpu = _children_cpu_s()
            loadgen = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
            peak_streams = 0
            while loadgen.poll() is None:
                peak_streams = max(peak_streams, open_streams(metrics_port))
                time.sleep(1)
            stdout = loadgen.stdout.read() if loadgen.stdout else ""
            if loadgen.returncode != 0:
                raise SystemExit(f"loadgen failed: {loadgen.returncode}")
            elapsed = time.monotonic() - started
            after = proc_stats(hub.pid)
            loadgen_cpu = _children_cpu_s() - children_cpu
        finally:
            hub.terminate()
            hub.wait(60)
        summary = json.loads(stdout)
        with sqlite3.connect(work / "store" / "events.db") as conn:
            stored = conn.execute("SELECT count(*) FROM events WHERE agent_id != 'eventbus'").fetchone()[0]
    return {
        "scenario": name,
        "params": params,
        "loadgen": summary,
        "stored_events": stored,
        "lost_acked_events": max(0, summary["acked_events"] - stored),
        "hub_peak_open_streams": peak_streams,
        "hub_cpu_percent_of_one_core": round(100 * (after["cpu_s"] - before["cpu_s"]) / elapsed, 1),
        "hub_peak_rss_mb": round(after["peak_rss_mb"], 1),
        "loadgen_cpu_percent_of_one_core": round(100 * loadgen_cpu / elapsed, 1),
        "hub_rss_mb_at_end": round(after["rss_mb"], 1),
        "hub_exit_code": hub.returncode,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }


def _children_cpu_s() -> float:
    """CPU seconds of the children waited for so far (the hub is waited for only after the load generator)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of each headline figure over the runs."""

    def median(pick: Any) -> float:
        return round(float(statistics.median(pick(run) for run in runs)), 3)

    return {
        "scenario": runs[0]["scenario"],
        "runs": len(runs),
        "median_events_per_s": median(lambda r: r["loadgen"]["events_per_s"]),
        "median_ack_latency_ms": {
            q: median(lambda r, q=q: r["loadgen"]["ack_latency_ms"][q]) for q in ("p50", "p95", "p99")
        },
        "median_hub_cpu_percent_of_one_core": median(lambda r: r["hub_cpu_percent_of_one_core"]),
        "median_hub_peak_rss_mb": median(lambda r: r["hub_peak_rss_mb"]),
        "median_loadgen_cpu_percent_of_one_core": median(lambda r: r["loadgen_cpu_percent_of_one_core"]),
        "lost_acked_events": sum(r["lost_acked_events"] for r in runs),
        "load_average_1min": [r["load_average_after"][0] for r in runs],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", choices=[*SCENARIOS, "all"], default="all")
    parser.add_argument("--duration", type=float, help="override every scenario's duration (s)")
    parser.add_argument("--processes", type=int, help="override every scenario's load-generator processes")
    parser.add_argument("--runs", type=int, default=3, help="runs per scenario (the medians follow them)")
    args = parser.parse_args()
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    for name in names:
        params = dict(SCENARIOS[name])
        if args.duration:
            params["duration"] = args.duration
        if args.processes:
            params["processes"] = args.processes
        runs = []
        for _ in range(args.runs):
            runs.append(run_scenario(name, params))
            print(json.dumps(runs[-1], indent=2), flush=True)
        print(json.dumps(medians(runs), indent=2), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
