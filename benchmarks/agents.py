#!/usr/bin/env python3
"""Agent benchmarks: RSS, idle CPU and start-to-first-event per agent; a 1,000,000-event outbox drain.

    python benchmarks/agents.py                 # both parts
    python benchmarks/agents.py --part agents   # proc, host, auth: 30 s each at default intervals
    python benchmarks/agents.py --part drain    # 1,000,000 events backlogged while the hub was down

Everything runs for real: `amoskys eventbus` and `amoskys agent KIND` as separate processes with
a temporary PKI, over loopback mTLS. Figures come from /proc and from the hub's store.
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

import yaml

from amoskys import keys, pki
from amoskys.agents.runtime.outbox import Outbox
from amoskys.config import OutboxConfig
from amoskys.loadgen import restamp, synthetic_events

sys.path.insert(0, str(Path(__file__).parent))
from hub import proc_stats, start_hub


def write_agent_config(work: Path, kind: str, hub_port: int, **extra: Any) -> Path:
    """An agent config (identity issued once per kind) whose key is in the hub's trust map."""
    ca = pki.load_ca(work / "ca")
    agent_id = f"bench-{kind}"
    key, cert = work / "tls" / f"{agent_id}.key", work / "tls" / f"{agent_id}.crt"
    if not cert.exists():
        pki.issue(ca, work / "tls", agent_id, "client", [])
    signing = work / f"{agent_id}.sign"
    if not signing.exists():
        keys.write_private_key(signing, keys.generate_signing_key())
    pub = keys.public_key_text(keys.load_signing_key(signing).public_key())
    (work / "ids" / "trust" / f"{agent_id}.pub").write_text(pub + "\n")
    config = {
        "agent_id": agent_id,
        "host": "bench",  # the host `bench-KIND` is enrolled for (the hub refuses events of any other)
        "hub": f"127.0.0.1:{hub_port}",
        "hub_server_name": "localhost",
        "tls": {"ca": str(work / "ca" / "ca.crt"), "cert": str(cert), "key": str(key)},
        "signing_key": str(signing),
        "state_dir": str(work / f"state-{kind}"),
        **extra,
    }
    path = work / f"agent-{kind}.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def stored_for(work: Path, agent_id: str) -> int:
    with sqlite3.connect(f"file:{work / 'store' / 'events.db'}?mode=ro", uri=True, timeout=30) as conn:
        return int(conn.execute("SELECT count(*) FROM events WHERE agent_id = ?", (agent_id,)).fetchone()[0])


def measure_agent(work: Path, hub: subprocess.Popen[bytes], kind: str, port: int, seconds: float) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    if kind == "auth":
        log = work / "auth.log"
        log.write_text("")
        extra["auth"] = {"source": "file", "log_path": str(log)}
    config = write_agent_config(work, kind, port, **extra)
    hub.send_signal(1)  # SIGHUP: the hub learns the new agent's key
    time.sleep(0.5)
    started = time.monotonic()
    agent = subprocess.Popen(
        [sys.executable, "-m", "amoskys", "agent", kind, "--config", str(config)], stderr=subprocess.DEVNULL
    )
    first_event_s = None
    while time.monotonic() - started < 30 and first_event_s is None:
        if stored_for(work, f"bench-{kind}"):
            first_event_s = time.monotonic() - started
        time.sleep(0.01)
    time.sleep(5)  # let start-up work (snapshot, first scans) settle before the idle measurement
    before = proc_stats(agent.pid)
    time.sleep(seconds)
    after = proc_stats(agent.pid)
    agent.terminate()
    agent.wait(30)
    return {
        "agent": kind,
        "start_to_first_event_stored_s": round(first_event_s, 3) if first_event_s is not None else None,
        "idle_cpu_percent_of_one_core": round(100 * (after["cpu_s"] - before["cpu_s"]) / seconds, 2),
        "rss_mb": round(after["rss_mb"], 1),
        "peak_rss_mb": round(after["peak_rss_mb"], 1),
        "exit_code": agent.returncode,
    }


def backlog(config_path: Path, count: int) -> None:
    """Put `count` events in the agent's outbox, as if collected while the hub was down."""
    config = yaml.safe_load(config_path.read_text())
    signing = keys.load_signing_key(Path(config["signing_key"]))
    outbox = Outbox(Path(config["state_dir"]) / "outbox.db", OutboxConfig(max_bytes=2**31), config["agent_id"], signing)
    template = synthetic_events("backlog", "drainhost", 0, 1000)
    for start in range(0, count, 1000):
        outbox.add([e.SerializeToString() for e in restamp(template, "backlog", start).events])
    outbox.close()


def drain(work: Path, count: int) -> dict[str, Any]:
    hub, port, _ = start_hub(work, work / "ids")
    config = write_agent_config(work, "host", port, outbox={"max_bytes": 2**31})
    hub.terminate()
    hub.wait(30)  # the hub is down while the backlog builds
    backlog(config, count)
    hub, port, _ = start_hub(work, work / "ids")
    config = write_agent_config(work, "host", port, outbox={"max_bytes": 2**31})
    before = proc_stats(hub.pid)
    started = time.monotonic()
    agent = subprocess.Popen(
        [sys.executable, "-m", "amoskys", "agent", "host", "--config", str(config)], stderr=subprocess.DEVNULL
    )
    while stored_for(work, "bench-host") < count and time.monotonic() - started < 600:
        time.sleep(0.5)
    elapsed = time.monotonic() - started
    after = proc_stats(hub.pid)
    agent.terminate()
    agent.wait(30)
    hub.terminate()
    hub.wait(30)
    return {
        "backlog_events": count,
        "stored": stored_for(work, "bench-host"),
        "drain_s": round(elapsed, 1),
        "events_per_s": round(count / elapsed),
        "hub_cpu_percent_of_one_core": round(100 * (after["cpu_s"] - before["cpu_s"]) / elapsed, 1),
        "hub_peak_rss_mb": round(after["peak_rss_mb"], 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["agents", "drain", "all"], default="all")
    parser.add_argument("--idle-seconds", type=float, default=30.0)
    parser.add_argument("--events", type=int, default=1_000_000)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("note: not root: proc and host see fewer processes and sockets", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="amoskys-agents-bench-") as tmp:
        work = Path(tmp)
        pki.init_ca(work / "ca")
        (work / "ids" / "trust").mkdir(parents=True)
        if args.part in ("agents", "all"):
            hub, port, _ = start_hub(work, work / "ids")
            try:
                for kind in ("proc", "host", "auth"):
                    print(json.dumps(measure_agent(work, hub, kind, port, args.idle_seconds)), flush=True)
            finally:
                hub.terminate()
                hub.wait(30)
        if args.part in ("drain", "all"):
            print(json.dumps(drain(work, args.events)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
