#!/usr/bin/env python3
"""Agent memory with each gRPC stack: RSS and PSS of agent-like processes publishing through grpclib or grpcio.

    python benchmarks/agent_memory.py                # 1 and 4 processes per stack, 10 s of publishing
    python benchmarks/agent_memory.py --counts 1 6

Each child is what an agent process holds apart from its collector: the SQLite outbox, the Ed25519
signer, the agent metrics and one PublishStream to a real hub (`amoskys eventbus`, loopback mTLS),
sealing 10 events every 0.5 s and acking them. `grpclib` publishes through the agents' `Publisher`;
`grpcio` through a grpc.aio stream with the same outbox (no `cryptography`, as an agent would).
PSS (from /proc/PID/smaps_rollup) divides each shared page among the processes mapping it, so with
several agents on one host it is what each one really costs; it is read after the hub has exited,
so that no page is shared with the hub's own grpcio. A child imports only what it needs (this
file's top imports are the standard library's).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROLLUP_FIELDS = ("Rss", "Pss", "Pss_Anon", "Pss_File", "Shared_Clean", "Private_Dirty")


def smaps_rollup(pid: int) -> dict[str, float]:
    """The rollup's sizes in MB."""
    sizes = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":", 1)
        if name in ROLLUP_FIELDS:
            sizes[name] = int(value.split()[0]) / 1024
    return sizes


# ---- the child: one agent-like process ---------------------------------------------------------


def child(stack: str, hub: str, identities: Path, agent_id: str, state: Path) -> None:
    from amoskys.agents.runtime.identity import load_signer
    from amoskys.agents.runtime.outbox import Outbox
    from amoskys.config import OutboxConfig

    outbox = Outbox(state / "outbox.db", OutboxConfig(), agent_id, load_signer(identities / f"{agent_id}.sign"))
    files = {name: identities / f"{agent_id}.{name}" for name in ("crt", "key")} | {"ca": identities / "ca.crt"}
    run = grpclib_child if stack == "grpclib" else grpcio_child
    asyncio.run(run(outbox, hub, files, agent_id.rsplit("-", 1)[0]))


def collect(outbox: Any, host: str, start: int) -> None:
    """Store and seal 10 small process events, as the runtime does every batch."""
    from amoskys.v1 import events_pb2

    bodies = [
        events_pb2.Event(
            event_id=f"{outbox.agent_id}:{start + n}", ts_ns=time.time_ns(), host=host, agent="proc",
            process=events_pb2.ProcessEvent(action=events_pb2.ProcessEvent.START, pid=1000 + n, name="bash"),
        ).SerializeToString()
        for n in range(10)
    ]  # fmt: skip
    outbox.add(bodies)
    outbox.seal(10)


def announce(outbox: Any) -> bool:
    """Tell the parent once the hub has acked something."""
    if outbox.counter("acked"):
        print("acked", flush=True)
        return True
    return False


async def grpclib_child(outbox: Any, hub: str, files: dict[str, Path], host: str) -> None:
    from amoskys.agents.runtime.metrics import AgentMetrics
    from amoskys.agents.runtime.publisher import Publisher
    from amoskys.config import AgentConfig, TlsConfig

    tls = TlsConfig(ca=str(files["ca"]), cert=str(files["crt"]), key=str(files["key"]))
    config = AgentConfig(agent_id=outbox.agent_id, hub=hub, hub_server_name="localhost", tls=tls)
    wake = asyncio.Event()
    publisher = Publisher(outbox, config, AgentMetrics("proc"), wake)
    task = asyncio.create_task(publisher.run())
    announced = False
    for start in range(0, 1_000_000, 10):
        collect(outbox, host, start)
        wake.set()
        await asyncio.sleep(0.5)
        announced = announced or announce(outbox)
    task.cancel()


async def grpcio_child(outbox: Any, hub: str, files: dict[str, Path], host: str) -> None:
    import grpc

    from amoskys.v1 import bus_pb2_grpc, envelope_pb2

    key, cert = files["key"].read_bytes(), files["crt"].read_bytes()
    credentials = grpc.ssl_channel_credentials(files["ca"].read_bytes(), key, cert)
    queue: asyncio.Queue[envelope_pb2.Envelope] = asyncio.Queue()

    async def requests() -> Any:
        while True:
            yield await queue.get()

    options = [("grpc.ssl_target_name_override", "localhost"), ("grpc.keepalive_time_ms", 30_000)]
    announced = False
    async with grpc.aio.secure_channel(hub, credentials, options=options) as channel:
        call = bus_pb2_grpc.EventBusStub(channel).PublishStream(requests())
        try:
            for start in range(0, 1_000_000, 10):
                collect(outbox, host, start)
                for sealed in outbox.unacked():
                    await queue.put(envelope_pb2.Envelope.FromString(sealed.raw))
                    ack = await call.read()
                    if isinstance(ack, envelope_pb2.PublishAck) and ack.status == envelope_pb2.PublishAck.OK:
                        outbox.ack(sealed.seq, sealed.chain_id)
                announced = announced or announce(outbox)
                await asyncio.sleep(0.5)
        except grpc.aio.AioRpcError:  # the hub has gone (the parent stops it before reading): stay as we are
            await asyncio.sleep(3600)


# ---- the parent ------------------------------------------------------------------------------------


def phase(work: Path, stack: str, count: int, seconds: float) -> dict[str, Any]:
    from hub import start_hub

    from amoskys.loadgen import agent_name

    identities = work / "ids"
    hub, port, _ = start_hub(work, identities)
    children = []
    try:
        for index in range(count):
            state = work / f"state-{stack}-{count}-{index}"
            command = [
                sys.executable,
                __file__,
                "--child",
                stack,
                f"127.0.0.1:{port}",
                str(identities),
                agent_name(index),
            ]
            children.append(subprocess.Popen([*command, str(state)], stdout=subprocess.PIPE, text=True))
        for proc in children:
            if proc.stdout is None or proc.stdout.readline().strip() != "acked":
                raise SystemExit(f"{stack} child did not publish")
        time.sleep(seconds)
        hub.terminate()
        hub.wait(30)
        time.sleep(1)
        sizes = [smaps_rollup(proc.pid) for proc in children]
    finally:
        for proc in children:
            proc.kill()
            proc.wait()
        if hub.poll() is None:
            hub.kill()
    return {
        "stack": stack,
        "processes": count,
        "per_process_mb": {field: round(sum(s[field] for s in sizes) / count, 1) for field in ROLLUP_FIELDS},
    }


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        stack, hub, identities, agent_id, state = sys.argv[2:7]
        child(stack, hub, Path(identities), agent_id, Path(state))
        return 0
    from amoskys import pki
    from amoskys.loadgen import ensure_identities

    sys.path.insert(0, str(Path(__file__).parent))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 4], help="processes per stack")
    parser.add_argument("--seconds", type=float, default=10.0, help="publishing before the reading")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="amoskys-memory-bench-") as tmp:
        work = Path(tmp)
        pki.init_ca(work / "ca")
        ensure_identities(work / "ca", work / "ids", max(args.counts))
        (work / "ids" / "ca.crt").write_bytes((work / "ca" / "ca.crt").read_bytes())
        for count in args.counts:
            for stack in ("grpclib", "grpcio"):
                print(json.dumps(phase(work, stack, count, args.seconds)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
