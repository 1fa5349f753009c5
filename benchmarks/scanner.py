#!/usr/bin/env python3
"""Scanner benchmark: sweep time of a /22 and the agent's RSS, on a network of namespaces (root).

    sudo python benchmarks/scanner.py                       # /22, 20 devices, 100 pps, 2 sweeps
    sudo python benchmarks/scanner.py --rate 1000 --devices 50

Everything is real: a bridge with `--devices` network namespaces (tests/netlab.py), `amoskys
eventbus` and `amoskys agent scanner` as separate processes over loopback mTLS. Sweep times come
from the agent's own log, RSS and CPU from /proc, the devices from the hub's store. For scale it
also prints what importing scapy would have cost on top of the agent's own imports.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))
from hub import proc_stats, start_hub
from tests.netlab import NetLab, free_subnets

from agents import write_agent_config
from amoskys import pki
from amoskys.v1 import events_pb2

IMPORTS = {
    "agent (runtime + scanner)": "import amoskys.agents.runtime.runner, amoskys.agents.scanner.agent",
    "agent + scapy l2/inet/sendrecv": "import amoskys.agents.runtime.runner, scapy.layers.l2, scapy.layers.inet, "
    "scapy.sendrecv",
    "agent + scapy.all": "import amoskys.agents.runtime.runner, scapy.all",
}


def import_rss_mb(statement: str) -> float | None:
    """Resident memory (MB) of a fresh interpreter after `statement` (None: it failed)."""
    code = f"{statement}\nprint(open('/proc/self/status').read().split('VmRSS:')[1].split()[0])"
    subprocess.run([sys.executable, "-c", statement], capture_output=True, check=False)  # write .pyc files first
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    return round(int(result.stdout) / 1024, 1) if result.returncode == 0 else None


def build_network(prefix: int, devices: int) -> NetLab:
    lab = NetLab(free_subnets(1, prefix)[0])
    try:
        lab.build()
        step = max(1, (lab.network.num_addresses - 4) // devices)
        for n in range(devices):
            lab.device(f"d{n}", f"02:be:00:00:{n // 256:02x}:{n % 256:02x}", lab.host(2 + n * step))
    except BaseException:
        lab.close()
        raise
    return lab


def device_macs(work: Path) -> set[str]:
    with sqlite3.connect(f"file:{work / 'store' / 'events.db'}?mode=ro", uri=True, timeout=30) as conn:
        rows = conn.execute("SELECT body FROM events WHERE agent_id = 'bench-scanner' AND kind = 'device'").fetchall()
    macs = set()
    for (body,) in rows:
        event = events_pb2.Event.FromString(body)
        if event.device.action == events_pb2.DeviceEvent.NEW:
            macs.add(event.device.mac)
    return macs


def sweeps_logged(log: Path) -> list[dict[str, Any]]:
    entries = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    return [e for e in entries if e.get("msg") == "swept"]


def run(work: Path, lab: NetLab, rate: int, sweeps: int, expected: int) -> dict[str, Any]:
    hub, port, _ = start_hub(work, work / "ids")
    scanner = {
        "targets": [{"interface": lab.uplink, "cidr": str(lab.network)}],
        "rate_pps": rate, "interval_s": 1.0, "gone_after_sweeps": 3,
    }  # fmt: skip
    config = write_agent_config(work, "scanner", port, scanner=scanner, logging={"level": "debug", "format": "json"})
    hub.send_signal(1)
    time.sleep(0.5)
    log = work / "scanner.log"
    started = time.monotonic()
    with log.open("wb") as err:
        agent = subprocess.Popen(
            [sys.executable, "-m", "amoskys", "agent", "scanner", "--config", str(config)], stderr=err
        )
    try:
        cpu_before = proc_stats(agent.pid)["cpu_s"]
        all_stored_s = None
        while len(sweeps_logged(log)) < sweeps and agent.poll() is None:
            if all_stored_s is None and len(device_macs(work)) >= expected:
                all_stored_s = time.monotonic() - started
            time.sleep(0.05)
        if agent.poll() is not None:
            raise SystemExit(f"the scanner exited ({agent.returncode}):\n{log.read_text()[-3000:]}")
        elapsed = time.monotonic() - started
        stats = proc_stats(agent.pid)
        while all_stored_s is None and time.monotonic() - started < elapsed + 10:
            if len(device_macs(work)) >= expected:
                all_stored_s = time.monotonic() - started
            time.sleep(0.05)
    finally:
        agent.terminate()
        code = agent.wait(30)
        hub.terminate()
        hub.wait(30)
    swept = sweeps_logged(log)
    return {
        "subnet": str(lab.network),
        "addresses_probed": lab.network.num_addresses - 3,  # all but network, broadcast and our own
        "devices": expected,
        "devices_found": len(device_macs(work)),
        "rate_pps": rate,
        "sweep_s": [e["seconds"] for e in swept[:sweeps]],
        "start_to_all_devices_stored_s": round(all_stored_s, 2) if all_stored_s else None,
        "cpu_percent_of_one_core_while_sweeping": round(100 * (stats["cpu_s"] - cpu_before) / elapsed, 1),
        "rss_mb": round(stats["rss_mb"], 1),
        "peak_rss_mb": round(stats["peak_rss_mb"], 1),
        "exit_code": code,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefix", type=int, default=22)
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--rate", type=int, default=100)
    parser.add_argument("--sweeps", type=int, default=2)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("the scanner benchmark builds network namespaces: run it as root")
    print(json.dumps({"import_rss_mb": {name: import_rss_mb(code) for name, code in IMPORTS.items()}}), flush=True)
    lab = build_network(args.prefix, args.devices)
    try:
        with tempfile.TemporaryDirectory(prefix="amoskys-scanner-bench-") as tmp:
            work = Path(tmp)
            pki.init_ca(work / "ca")
            (work / "ids" / "trust").mkdir(parents=True)
            print(json.dumps(run(work, lab, args.rate, args.sweeps, args.devices)), flush=True)
    finally:
        lab.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
