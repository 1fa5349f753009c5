"""The runtime end to end on loopback with real certs: hub + proc, host and auth agents."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from amoskys.agents.runtime import AgentRuntime
from amoskys.errors import IdentityError
from amoskys.eventbus.server import create_server
from amoskys.v1 import bus_pb2
from tests.agents.conftest import agent_config
from tests.conftest import small_tmpfs
from tests.hubfixture import LiveHub


async def start(runtime: AgentRuntime) -> asyncio.Task[None]:
    task = asyncio.create_task(runtime.run())
    await asyncio.sleep(0)
    return task


async def stop(runtime: AgentRuntime, task: asyncio.Task[None]) -> None:
    runtime._stopping.set()
    await asyncio.wait_for(task, 30)


async def wait_until_drained(runtimes: list[AgentRuntime], timeout: float = 30) -> None:
    for _ in range(int(timeout * 10)):
        if all(r.outbox.sizes()[0] == 0 and not r.buffer for r in runtimes):
            return
        await asyncio.sleep(0.1)
    raise AssertionError([r.outbox.sizes() for r in runtimes])


async def outage(live_hub: LiveHub, seconds: float) -> None:
    """Stop the hub, wait, start a new one on the same port and store (agents keep collecting)."""
    port = live_hub.hub.port
    await live_hub.hub.stop()
    await asyncio.sleep(seconds)
    config = live_hub.config.__class__(**{**{f: getattr(live_hub.config, f) for f in live_hub.config.__struct_fields__},
                                          "listen": f"127.0.0.1:{port}"})  # fmt: skip
    live_hub.hub = create_server(config)
    await live_hub.hub.start()


@pytest.mark.parametrize("outage_s", [pytest.param(5.0, id="5s"), pytest.param(60.0, id="60s", marks=pytest.mark.slow)])
async def test_outage_then_every_collected_event_stored_exactly_once(
    live_hub: LiveHub, tmp_path: Path, outage_s: float
) -> None:
    log = tmp_path / "auth.log"
    log.write_text("")
    configs = {
        "proc": agent_config(live_hub, tmp_path, "proc", proc={"interval_s": 0.5}),
        "host": agent_config(live_hub, tmp_path, "host", host_metrics={"interval_s": 1.0, "ports_interval_s": 0.5}),
        "auth": agent_config(live_hub, tmp_path, "auth", auth={"source": "file", "log_path": str(log)}),
    }
    runtimes = [AgentRuntime(kind, None, config) for kind, config in configs.items()]
    tasks = [await start(r) for r in runtimes]
    try:
        await asyncio.sleep(2)
        outage_task = asyncio.create_task(outage(live_hub, outage_s))
        for i in range(20):  # auth lines written during the outage are collected all the same
            with log.open("a") as handle:
                handle.write(
                    f"Nov 22 10:00:{i:02d} t sshd[{i}]: Failed password for root from 192.0.2.9 port {i} ssh2\n"
                )
            await asyncio.sleep(outage_s / 25)
        await outage_task
        await wait_until_drained(runtimes, timeout=60)
    finally:
        for runtime, task in zip(runtimes, tasks, strict=True):
            await stop(runtime, task)
    for runtime in runtimes:
        stored = await live_hub.query(bus_pb2.EventFilter(agent_ids=[runtime.agent_id]))
        ids = [s.event.event_id for s in stored]
        assert len(ids) == len(set(ids)), f"{runtime.kind}: duplicates"
        assert len(ids) == runtime.metrics.events_collected._value.get(), runtime.kind
        kinds = {s.event.WhichOneof("body") for s in stored}
        assert "heartbeat" in kinds
    auth = await live_hub.query(bus_pb2.EventFilter(agent_ids=["test-auth"], kinds=["auth"]))
    assert len(auth) == 20
    alerts = await live_hub.query(bus_pb2.EventFilter(agent_ids=["test-auth"], kinds=["alert"]))
    assert [a.event.alert.rule for a in alerts] == ["auth.brute_force"] * 4


async def test_refuses_to_start_without_a_valid_identity(live_hub: LiveHub, tmp_path: Path) -> None:
    config = agent_config(live_hub, tmp_path, "host")
    Path(config.tls.key).chmod(0o644)
    with pytest.raises(IdentityError, match="chmod 600"):
        AgentRuntime("host", None, config)
    Path(config.tls.key).unlink()
    with pytest.raises(IdentityError, match="private key not found"):
        AgentRuntime("host", None, config)


@pytest.mark.root
async def test_outbox_on_a_full_disk_holds_events_then_stores_them(live_hub: LiveHub, tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "small", "2m") as mount:
        config = agent_config(live_hub, tmp_path, "host", state_dir=str(mount / "state"))
        runtime = AgentRuntime("host", None, config)
        filler = mount / "filler"
        with filler.open("wb") as handle:  # fill the filesystem to the last block
            while True:
                try:
                    handle.write(b"\0" * 65536)
                    handle.flush()
                except OSError:
                    break
        events = [runtime.agent.event(labels={"n": str(i)}).SerializeToString() for i in range(2000)]
        runtime.buffer = list(events)
        runtime.flush()
        assert len(runtime.buffer) == 2000, "the events must be held, not lost"
        filler.unlink()
        runtime.flush()
        assert runtime.buffer == []
        assert runtime.outbox.pending_events()[0] == 2000
        runtime.outbox.close()
