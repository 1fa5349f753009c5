#!/usr/bin/env python3
"""The hub cluster against the SQLite hub: events/s, ack latency, CPU per envelope. One JSON object per run.

    python benchmarks/cluster.py                          # every setup, the "agents" workload
    python benchmarks/cluster.py --setup jetstream-2 --workload batch10 --duration 20
    python benchmarks/cluster.py --commit-path 20000      # the store side alone, in this process

Setups: `sqlite` (one hub, its own store), `jetstream-1` and `jetstream-2` (one or two hub processes
on a 3-node JetStream cluster, R3, with `amoskys indexer` writing the index). Everything runs on this
machine over loopback: hubs, nats-server nodes, the indexer and the load generator share its cores,
so the figures to compare are CPU seconds per envelope (hub processes, NATS nodes, indexer, each
measured from /proc) more than events/s. Workloads: `agents` (agents at 1 event/s each, one event
per envelope: the fleet's shape) and `batch10` (as fast as acks allow, 10 events per envelope).
After the load, the index is awaited until it holds every acked event (lost = acked - indexed).

`--commit-path N` measures what the backend alone costs a hub: N one-event envelopes of 200 agents,
already checked, handed to the writer (`Ingest` on SQLite, `ClusterIngest` on a 3-node R3 JetStream)
one envelope per agent at a time, awaiting each round's acks; CPU of this process (all its threads)
per envelope, and envelopes/s.
"""

from __future__ import annotations

import argparse
import asyncio
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/natscluster: the nats-server nodes
sys.path.insert(0, str(Path(__file__).parent))
from hub import hub_config, proc_stats
from tests.natscluster import nats_cluster

from amoskys import keys, pki
from amoskys.config import BackpressureConfig, EventBusConfig, NatsConfig, StoreConfig
from amoskys.envelope import ChainState, envelope_digest, seal
from amoskys.eventbus.ingest import Ingest
from amoskys.eventbus.metrics import BusMetrics
from amoskys.eventbus.rows import to_row
from amoskys.eventbus.store import AgentUpdate, SqliteStore
from amoskys.loadgen import agent_name, ensure_identities, simulated_host, synthetic_events
from amoskys.v1 import envelope_pb2

WORKLOADS: dict[str, dict[str, Any]] = {
    "agents": {"agents": 500, "batch": 1, "rate": 500, "duration": 20, "inflight": 4},
    "batch10": {"agents": 16, "batch": 10, "rate": 0, "duration": 20, "inflight": 8},
}
SETUPS = ("sqlite", "jetstream-1", "jetstream-2")
LOADGEN = [sys.executable, "-m", "amoskys", "loadgen"]


def start(command: str, config: Path, log: Path, ready: str) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    """`amoskys COMMAND --config FILE`, once its log says `ready` (the log entry is returned)."""
    with log.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "amoskys", command, "--config", str(config)], stderr=err)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            if f'"{ready}"' in line:
                return proc, json.loads(line)
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"{command} did not start: {log.read_text()}")


def indexed_events(db: Path) -> int:
    if not db.exists():
        return 0
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return int(conn.execute("SELECT count(*) FROM events WHERE agent_id != 'eventbus'").fetchone()[0])


def cpu(pids: list[int]) -> float:
    return sum(proc_stats(pid)["cpu_s"] for pid in pids)


def run(setup: str, params: dict[str, Any]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="amoskys-cluster-bench-") as tmp:
        work = Path(tmp)
        pki.init_ca(work / "ca")
        identities = work / "ids"
        ensure_identities(work / "ca", identities, params["agents"])
        config = hub_config(work, identities, "")
        if setup == "sqlite":
            return measure(setup, params, work, config, [], None)
        with nats_cluster(work / "nats", size=3) as nats:
            section = {"servers": nats.servers, "tls": False, "replicas": 3}
            config["store"]["backend"] = "jetstream"
            config["nats"] = section
            indexer = {"nats": section, "store": config["store"], "metrics": {"listen": ""}}
            (work / "indexer.yml").write_text(yaml.safe_dump(indexer))
            nats_pids = [node.proc.pid for node in nats.nodes if node.proc is not None]
            return measure(setup, params, work, config, nats_pids, work / "indexer.yml")


def measure(
    setup: str, params: dict[str, Any], work: Path, hub_config: dict[str, Any], nats_pids: list[int],
    indexer_config: Path | None,
) -> dict[str, Any]:  # fmt: skip
    (work / "eventbus.yml").write_text(yaml.safe_dump(hub_config))
    hubs_wanted = int(setup.rsplit("-", 1)[1]) if "-" in setup else 1
    children: list[subprocess.Popen[bytes]] = []
    try:
        indexer_pid = None
        if indexer_config is not None:
            indexer, _ = start("indexer", indexer_config, work / "indexer.log", "indexer running")
            children.append(indexer)
            indexer_pid = indexer.pid
        ports = []
        for i in range(hubs_wanted):
            hub, entry = start("eventbus", work / "eventbus.yml", work / f"hub{i}.log", "eventbus serving")
            children.append(hub)
            ports.append(entry["port"])
        hub_pids = [child.pid for child in children if child.pid != indexer_pid]
        load_before = os.getloadavg()
        before = {"hub": cpu(hub_pids), "nats": cpu(nats_pids), "indexer": cpu([indexer_pid] if indexer_pid else [])}
        started = time.monotonic()
        command = [
            *LOADGEN, "--hub", ",".join(f"127.0.0.1:{port}" for port in ports), "--server-name", "localhost",
            "--ca", str(work / "ca" / "ca.crt"), "--identities", str(work / "ids"),
            *(f"--{key}={value}" for key, value in params.items()),
        ]  # fmt: skip
        summary = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
        elapsed = time.monotonic() - started
        deadline = time.monotonic() + 60
        store = Path(hub_config["store"]["path"])
        while indexed_events(store) < summary["acked_events"] and time.monotonic() < deadline:
            time.sleep(0.5)
        index_wait = time.monotonic() - started - elapsed
        after = {"hub": cpu(hub_pids), "nats": cpu(nats_pids), "indexer": cpu([indexer_pid] if indexer_pid else [])}
    finally:
        for child in children:
            child.terminate()
        for child in children:
            child.wait(60)
    envelopes = max(summary["acked_events"] // params["batch"], 1)
    per_envelope = {name: round(1000 * (after[name] - before[name]) / envelopes, 3) for name in after}
    return {
        "setup": setup,
        "params": params,
        "acked_events": summary["acked_events"],
        "events_per_s": summary["events_per_s"],
        "ack_latency_ms": summary["ack_latency_ms"],
        "errors": summary.get("errors"),
        "lost_acked_events": max(0, summary["acked_events"] - indexed_events(store)),
        "index_caught_up_after_s": round(index_wait, 1),
        "cpu_ms_per_envelope": per_envelope,
        "hub_cpu_percent_of_one_core": round(100 * (after["hub"] - before["hub"]) / elapsed, 1),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }


COMMIT_AGENTS = 200


def sealed_rounds(envelopes: int) -> list[list[tuple[envelope_pb2.EnvelopeHeader, bytes, list[Any], bytes]]]:
    """Rounds of one sealed one-event envelope per agent: (header, digest, rows, raw)."""
    signer = keys.generate_signing_key()
    chains = [ChainState.fresh() for _ in range(COMMIT_AGENTS)]
    rounds = []
    for r in range(max(envelopes // COMMIT_AGENTS, 1)):
        wave = []
        for i in range(COMMIT_AGENTS):
            batch = synthetic_events(f"{agent_name(i)}:{r}", simulated_host(i), r, 1)
            envelope, chains[i] = seal(agent_name(i), batch, chains[i], signer)
            header = envelope_pb2.EnvelopeHeader.FromString(envelope.header)
            rows = [to_row(event) for event in batch.events]
            wave.append(
                (header, envelope_digest(envelope.header, envelope.payload), rows, envelope.SerializeToString())
            )
        rounds.append(wave)
    return rounds


async def drive(ingest: Ingest, rounds: list[list[Any]]) -> dict[str, float]:
    ingest.start(asyncio.get_running_loop())
    cpu0, wall0 = time.process_time(), time.monotonic()
    for wave in rounds:
        futures = [
            ingest.submit(h, d, rows, AgentUpdate(host="h", kind="proc", events=1), raw) for h, d, rows, raw in wave
        ]
        acks = await asyncio.gather(*futures)
        assert all(ack.status == envelope_pb2.PublishAck.OK for ack in acks), acks[:3]
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    await asyncio.to_thread(ingest.stop)
    count = sum(len(wave) for wave in rounds)
    return {
        "envelopes": count,
        "envelopes_per_s": round(count / wall, 1),
        "cpu_ms_per_envelope": round(1000 * cpu / count, 3),
    }


def commit_path(envelopes: int) -> list[dict[str, Any]]:
    from amoskys.eventbus.cluster import ClusterIngest, JetStreamStore
    from amoskys.eventbus.jetstream import JetStreamLog

    results = []
    with tempfile.TemporaryDirectory(prefix="amoskys-commit-bench-") as tmp:
        work = Path(tmp)
        store = SqliteStore(work / "sqlite" / "events.db")
        load = os.getloadavg()[0]
        figures = asyncio.run(drive(Ingest(store, BackpressureConfig(), BusMetrics()), sealed_rounds(envelopes)))
        store.close()
        results.append({"backend": "sqlite", **figures, "load_average": [load, round(os.getloadavg()[0], 2)]})
        with nats_cluster(work / "nats", size=3) as nats:
            config = EventBusConfig(
                store=StoreConfig(backend="jetstream", path=str(work / "index" / "events.db")),
                nats=NatsConfig(servers=nats.servers, tls=False, replicas=3),
            )
            log = JetStreamLog(config.nats, "bench")
            log.start()
            cluster_store = JetStreamStore(config)
            ingest = ClusterIngest(cluster_store, log, config, BusMetrics())
            load = os.getloadavg()[0]
            figures = asyncio.run(drive(ingest, sealed_rounds(envelopes)))
            log.close()
            cluster_store.close()
            results.append({"backend": "jetstream-r3", **figures, "load_average": [load, round(os.getloadavg()[0], 2)]})
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setup", choices=[*SETUPS, "all"], default="all")
    parser.add_argument("--workload", choices=list(WORKLOADS), default="agents")
    parser.add_argument("--duration", type=float, help="override the workload's duration (s)")
    parser.add_argument("--agents", type=int, help="override the workload's agents (and rate, for `agents`)")
    parser.add_argument("--rate", type=float, help="override the workload's total events/s (0: as fast as acks allow)")
    parser.add_argument("--commit-path", type=int, metavar="N", help="only the store side: N envelopes in-process")
    args = parser.parse_args()
    if args.commit_path:
        for result in commit_path(args.commit_path):
            print(json.dumps(result), flush=True)
        return 0
    params = dict(WORKLOADS[args.workload])
    if args.duration:
        params["duration"] = args.duration
    if args.agents:
        params["agents"] = args.agents
        if params["rate"]:
            params["rate"] = args.agents
    if args.rate is not None:
        params["rate"] = args.rate
    for setup in SETUPS if args.setup == "all" else (args.setup,):
        print(json.dumps(run(setup, params), indent=2), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
