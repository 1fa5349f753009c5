#!/usr/bin/env python3
"""The hub's CPU per one-event envelope, and the floor under it. One JSON object per run.

    python benchmarks/hub_floor.py                        # every server, 200 agents, 1,000 envelopes/s, 20 s
    python benchmarks/hub_floor.py --server grpc --runs 3 --duration 30

Each server runs as its own process on loopback mTLS, with a fresh PKI and `amoskys loadgen` (the agents'
own publisher, one event per envelope, 4 in flight per stream) as another process:
- `grpc`: the hub's transport alone: a grpc.aio PublishStream that parses each envelope and acks it OK,
  no checks and no store (TLS, HTTP/2 and grpcio's asyncio glue, the ack's protobuf);
- `verify`: the same plus the Ed25519 signature check with the agent's enrolled key;
- `hub`: `amoskys eventbus` with its default config (SQLite store, every check).
Server CPU comes from /proc (all its threads). First it prints Ed25519 verification timed alone
(libsodium through PyNaCl, and `cryptography`), in microseconds per signature.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import yaml
from hub import hub_config, proc_stats, start_hub

from amoskys import keys, pki
from amoskys.config import EventBusConfig, load_config
from amoskys.envelope import signing_message, verify_signature
from amoskys.eventbus.auth import TrustState
from amoskys.loadgen import ensure_identities
from amoskys.v1 import envelope_pb2

SERVERS = ("grpc", "verify", "hub")
OK = envelope_pb2.PublishAck.OK


def verify_alone(rounds: int = 5000) -> dict[str, float]:
    """Microseconds per Ed25519 verification of a 300-byte message, best of 3, this process's CPU."""
    signing = keys.generate_signing_key()
    public = signing.public_key()
    payload = os.urandom(300)
    envelope = envelope_pb2.Envelope(header=b"h", payload=payload, sig=signing.sign(signing_message(b"h", payload)))
    nacl_key = keys.Enrolment(public, "h", "proc").verify_key
    message = signing_message(b"h", payload)

    def best(check: Any) -> float:
        times = []
        for _ in range(3):
            started = time.process_time()
            for _ in range(rounds):
                check()
            times.append((time.process_time() - started) / rounds)
        return round(min(times) * 1e6, 1)

    return {
        "libsodium_us": best(lambda: verify_signature(envelope, nacl_key)),
        "cryptography_us": best(lambda: public.verify(envelope.sig, message)),
    }


async def serve(config_path: Path, verify: bool) -> None:
    """The floor server: print the port, then ack every envelope OK (after its signature, with `verify`)."""
    trust = TrustState(load_config(config_path, EventBusConfig))

    async def publish_stream(requests: AsyncIterator[bytes], context: object) -> AsyncIterator[bytes]:
        async for raw in requests:
            envelope = envelope_pb2.Envelope.FromString(raw)
            header = envelope_pb2.EnvelopeHeader.FromString(envelope.header)
            if verify:
                verify_signature(envelope, trust.agents[header.agent_id].verify_key)
            yield envelope_pb2.PublishAck(status=OK, acked_seq=header.seq, chain_id=header.chain_id).SerializeToString()

    options = [("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.min_ping_interval_without_data_ms", 10_000)]
    server = grpc.aio.server(options=options)
    handler = grpc.stream_stream_rpc_method_handler(publish_stream)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("amoskys.v1.EventBus", {"PublishStream": handler}),)
    )
    port = server.add_secure_port("127.0.0.1:0", trust.server_credentials())
    await server.start()
    print(json.dumps({"port": port}), flush=True)
    await server.wait_for_termination()


def start_floor(work: Path, identities: Path, verify: bool) -> tuple[subprocess.Popen[str], int]:
    (work / "eventbus.yml").write_text(yaml.safe_dump(hub_config(work, identities, "")))
    mode = "--serve-verify" if verify else "--serve"
    server = subprocess.Popen(
        [sys.executable, __file__, mode, str(work / "eventbus.yml")], stdout=subprocess.PIPE, text=True
    )
    assert server.stdout is not None
    return server, int(json.loads(server.stdout.readline())["port"])


def run(server_kind: str, agents: int, rate: float, duration: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="amoskys-floor-") as tmp:
        work = Path(tmp)
        pki.init_ca(work / "ca")
        identities = work / "ids"
        ensure_identities(work / "ca", identities, agents)
        if server_kind == "hub":
            server, port, _ = start_hub(work, identities)
        else:
            server, port = start_floor(work, identities, server_kind == "verify")
        try:
            load_before, cpu_before = os.getloadavg()[0], proc_stats(server.pid)["cpu_s"]
            command = [
                sys.executable, "-m", "amoskys", "loadgen", "--hub", f"127.0.0.1:{port}", "--server-name", "localhost",
                "--ca", str(work / "ca" / "ca.crt"), "--identities", str(identities), f"--agents={agents}",
                "--batch=1", f"--rate={rate}", f"--duration={duration}", "--inflight=4",
            ]  # fmt: skip
            summary = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
            cpu = proc_stats(server.pid)["cpu_s"] - cpu_before
        finally:
            server.terminate()
            server.wait(60)
    envelopes = max(summary["acked_events"], 1)
    return {
        "server": server_kind,
        "agents": agents,
        "offered_envelopes_per_s": rate,
        "acked_envelopes_per_s": summary["events_per_s"],
        "ack_latency_ms": {q: summary["ack_latency_ms"][q] for q in ("p50", "p99")},
        "server_cpu_ms_per_envelope": round(1000 * cpu / envelopes, 3),
        "errors": summary.get("errors"),
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", choices=[*SERVERS, "all"], default="all")
    parser.add_argument("--agents", type=int, default=200)
    parser.add_argument("--rate", type=float, default=1000.0, help="one-event envelopes/s offered, in all")
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--runs", type=int, default=1, help="rounds over the servers")
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--serve-verify", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve or args.serve_verify:
        asyncio.run(serve(args.serve or args.serve_verify, verify=bool(args.serve_verify)))
        return 0
    print(json.dumps({"ed25519_verify_alone": verify_alone()}), flush=True)
    for _ in range(args.runs):
        for kind in SERVERS if args.server == "all" else (args.server,):
            print(json.dumps(run(kind, args.agents, args.rate, args.duration)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
