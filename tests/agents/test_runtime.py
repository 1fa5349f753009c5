"""The runtime end to end on loopback with real certs: hub + proc, host and auth agents."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from amoskys.agents import AGENTS
from amoskys.agents.runtime.runner import AgentRuntime
from amoskys.errors import IdentityError
from amoskys.eventbus.server import create_server
from amoskys.v1 import bus_pb2, envelope_pb2, events_pb2
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


def held_markers(runtime: AgentRuntime) -> list[int]:
    """The `m` labels of the events the outbox holds, oldest first (sealed, then unsealed)."""
    bodies = [body for (body,) in runtime.outbox.db.execute("SELECT body FROM events ORDER BY id")]
    sealed = [
        e.SerializeToString()
        for envelope in runtime.outbox.unacked(limit=10_000)
        for e in events_pb2.EventBatch.FromString(envelope_pb2.Envelope.FromString(envelope.raw).payload).events
    ]
    events = [events_pb2.Event.FromString(body) for body in sealed + bodies]
    return [int(e.labels["m"]) for e in events if "m" in e.labels]


async def test_outage_into_a_full_outbox_seals_nothing_and_keeps_the_newest(live_hub: LiveHub, tmp_path: Path) -> None:
    """Hub down, outbox full: no envelope is sealed while no stream is open, the oldest events go, the
    newest reach the hub once it is back, and every missing event was counted as dropped."""
    quiet = {"interval_s": 3600.0, "ports_interval_s": 3600.0}
    config = agent_config(live_hub, tmp_path, "host", outbox={"max_bytes": 30_000}, host_metrics=quiet)
    runtime = AgentRuntime("host", None, config)
    task = await start(runtime)
    try:
        await wait_until_drained([runtime])
        outage_task = asyncio.create_task(outage(live_hub, 6.0))
        while runtime.publisher.streaming:
            await asyncio.sleep(0.05)
        sealed_at_start = runtime.outbox.sealed_count()
        for chunk in range(40):  # 2,000 events over 2 s: 20 lingers of 100 ms
            runtime.buffer += [
                runtime.agent.event(
                    host_metrics=events_pb2.HostMetrics(), labels={"m": str(chunk * 50 + i)}
                ).SerializeToString()
                for i in range(50)
            ]
            runtime.flush()
            await asyncio.sleep(0.05)
        assert not outage_task.done(), "the outage ended too early for this test"
        assert runtime.outbox.sealed_count() <= sealed_at_start
        held = held_markers(runtime)
        assert held == list(range(held[0], 2000)), "the newest events, none missing"
        assert held[0] > 0
        assert runtime.outbox.used_bytes <= 30_000
        await outage_task
        reported = dropped = -1
        for _ in range(300):  # the agent.dropped alerts go out once the hub acks again
            await wait_until_drained([runtime], timeout=60)
            dropped = runtime.metrics.events_dropped.labels("outbox_full")._value.get()
            stored = await live_hub.query(bus_pb2.EventFilter(agent_ids=["test-host"]))
            alerts = [s.event.alert for s in stored if s.event.WhichOneof("body") == "alert"]
            reported = sum(int(a.details["dropped"]) for a in alerts if a.rule == "agent.dropped")
            if reported == dropped:
                break
            await asyncio.sleep(0.1)
    finally:
        await stop(runtime, task)
    assert reported == dropped > 0
    stored = await live_hub.query(bus_pb2.EventFilter(agent_ids=["test-host"]))
    markers = sorted(int(s.event.labels["m"]) for s in stored if "m" in s.event.labels)
    assert markers == list(range(markers[0], 2000)), "the newest events, none missing, none twice"
    assert held[0] <= markers[0] <= dropped


async def test_a_full_outbox_while_connected_keeps_sending_the_newest(live_hub: LiveHub, tmp_path: Path) -> None:
    """Bursts into a small outbox while the stream is open: the bound drops sealed envelopes too (the
    chain is re-sealed under the publisher), nothing stalls, and what is missing was counted."""
    quiet = {"interval_s": 3600.0, "ports_interval_s": 3600.0}
    config = agent_config(
        live_hub, tmp_path, "host", outbox={"max_bytes": 20_000}, host_metrics=quiet,
        batch={"max_events": 50, "max_linger_ms": 10, "max_inflight": 2},
    )  # fmt: skip
    runtime = AgentRuntime("host", None, config)
    task = await start(runtime)
    try:
        await wait_until_drained([runtime])
        first_chain = runtime.outbox.chain.chain_id
        for chunk in range(100):
            runtime.buffer += [
                runtime.agent.event(
                    host_metrics=events_pb2.HostMetrics(), labels={"m": str(chunk * 100 + i)}
                ).SerializeToString()
                for i in range(100)
            ]
            runtime.flush()
            await asyncio.sleep(0.01)
        await wait_until_drained([runtime], timeout=60)
        assert runtime.outbox.chain.chain_id != first_chain, "no sealed envelope was dropped"
    finally:
        await stop(runtime, task)
    stored = await live_hub.query(bus_pb2.EventFilter(agent_ids=["test-host"]))
    markers = sorted({int(s.event.labels["m"]) for s in stored if "m" in s.event.labels})
    assert markers[-1] == 9999
    dropped = runtime.metrics.events_dropped.labels("outbox_full")._value.get()
    assert 10_000 - len(markers) <= dropped


async def test_an_outbox_locked_by_someone_else_delays_acks_and_loses_nothing(
    live_hub: LiveHub, tmp_path: Path
) -> None:
    """An operator's sqlite3 shell holds the outbox's write lock while the hub acks: the publisher
    and the drop reports keep running, and once the lock is gone every event is stored once."""
    config = agent_config(live_hub, tmp_path, "host", host_metrics={"interval_s": 3600.0, "ports_interval_s": 3600.0})
    runtime = AgentRuntime("host", None, config)
    runtime.outbox.db.execute("PRAGMA busy_timeout = 50")  # fail fast instead of waiting 30 s
    task = await start(runtime)
    shell = sqlite3.connect(runtime.outbox.path, isolation_level=None)
    try:
        await wait_until_drained([runtime])
        runtime.buffer += [
            runtime.agent.event(host_metrics=events_pb2.HostMetrics(), labels={"m": str(i)}).SerializeToString()
            for i in range(50)
        ]
        runtime.flush()
        _, envelope_dropped = runtime.outbox.seal(100)
        shell.execute("BEGIN IMMEDIATE")  # as `sqlite3 outbox.db` then `BEGIN IMMEDIATE;`, before the ack
        runtime.sealed.set()
        for _ in range(100):
            if runtime.metrics.publish_errors.labels("OUTBOX")._value.get():
                break
            await asyncio.sleep(0.1)
        assert runtime.metrics.publish_errors.labels("OUTBOX")._value.get() > 0
        shell.execute("COMMIT")
        running = {getattr(t.get_coro(), "__qualname__", "") for t in asyncio.all_tasks()}
        assert {"Publisher.run", "AgentRuntime._drop_reports"} <= running
        await wait_until_drained([runtime], timeout=60)
    finally:
        shell.close()
        await stop(runtime, task)
    stored = await live_hub.query(bus_pb2.EventFilter(agent_ids=["test-host"]))
    assert sorted(int(s.event.labels["m"]) for s in stored if "m" in s.event.labels) == list(range(50))
    assert envelope_dropped == 0


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
        events = [
            runtime.agent.event(host_metrics=events_pb2.HostMetrics(), labels={"n": str(i)}).SerializeToString()
            for i in range(2000)
        ]
        runtime.buffer = list(events)
        runtime.flush()
        assert len(runtime.buffer) == 2000, "the events must be held, not lost"
        filler.unlink()
        runtime.flush()
        assert runtime.buffer == []
        assert runtime.outbox.pending_events()[0] == 2000
        runtime.outbox.close()


async def test_process_metrics_reload_and_clean_stop(live_hub: LiveHub, tmp_path: Path) -> None:
    import json
    import signal
    import subprocess
    import sys
    import urllib.request

    import msgspec
    import yaml

    config = agent_config(live_hub, tmp_path, "host", metrics={"listen": "127.0.0.1:0"}, logging={"format": "json"})
    path = tmp_path / "agent-host.yml"
    path.write_text(yaml.safe_dump(msgspec.to_builtins(config)))
    log = tmp_path / "agent.log"
    with log.open("wb") as err:
        agent = subprocess.Popen([sys.executable, "-m", "amoskys", "agent", "host", "--config", str(path)], stderr=err)
    try:
        port = 0
        for _ in range(100):
            for line in log.read_text().splitlines():
                entry = json.loads(line) if line.startswith("{") else {}
                port = entry.get("metrics_port", port) if entry.get("msg") == "agent running" else port
            if port:
                break
            await asyncio.sleep(0.1)
        assert port, log.read_text()
        await asyncio.sleep(1.5)
        body = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        )
        assert 'amoskys_agent_info{kind="host"} 1.0' in body
        assert "amoskys_agent_connected 1.0" in body
        assert "amoskys_agent_events_collected_total" in body
        path.write_text(
            yaml.safe_dump({**msgspec.to_builtins(config), "logging": {"level": "debug", "format": "json"}})
        )
        agent.send_signal(signal.SIGHUP)
        for _ in range(50):
            if "config reloaded" in log.read_text():
                break
            await asyncio.sleep(0.1)
        assert "config reloaded" in log.read_text()
        assert agent.poll() is None
        agent.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(agent.wait, 20) == 0
        assert "agent stopped" in log.read_text()
    finally:
        if agent.poll() is None:
            agent.kill()


async def test_dropped_events_are_reported_to_the_hub(live_hub: LiveHub, tmp_path: Path) -> None:
    config = agent_config(live_hub, tmp_path, "host", outbox={"max_bytes": 20_000, "when_full": "drop_oldest"})
    runtime = AgentRuntime("host", None, config)
    runtime.buffer = [
        runtime.agent.event(host_metrics=events_pb2.HostMetrics(), labels={"n": str(i)}).SerializeToString()
        for i in range(1000)
    ]
    runtime.flush()
    assert runtime.outbox.counter("dropped") > 0
    dropped = runtime.outbox.counter("dropped")
    task = await start(runtime)
    try:
        for _ in range(100):
            alerts = await live_hub.query(bus_pb2.EventFilter(agent_ids=["test-host"], kinds=["alert"]))
            if alerts:
                break
            await asyncio.sleep(0.1)
    finally:
        await stop(runtime, task)
    (alert,) = [a for a in alerts if a.event.alert.rule == "agent.dropped"]
    assert int(alert.event.alert.details["dropped"]) >= dropped  # heartbeats keep overflowing the tiny outbox


async def test_idle_publisher_does_not_wait_for_the_linger(live_hub: LiveHub, tmp_path: Path) -> None:
    """Nothing in flight: an event is sealed and sent at once, not after batch.max_linger_ms (here 60 s)."""
    config = agent_config(live_hub, tmp_path, "host", batch={"max_events": 500, "max_linger_ms": 60_000})
    runtime = AgentRuntime("host", None, config)
    task = await start(runtime)
    try:
        stored: list[bus_pb2.StoredEvent] = []
        for _ in range(200):  # 20 s at most, a third of the linger
            stored = await live_hub.query(bus_pb2.EventFilter(agent_ids=["test-host"], kinds=["heartbeat"]))
            if stored:
                break
            await asyncio.sleep(0.1)
        assert stored
        marker = runtime.agent.event(host_metrics=events_pb2.HostMetrics(), labels={"marker": "late-event"})
        runtime.buffer.append(marker.SerializeToString())
        found: list[str] = []
        for _ in range(200):
            everything = await live_hub.query(bus_pb2.EventFilter(agent_ids=["test-host"]))
            found = [s.event.event_id for s in everything if s.event.labels.get("marker") == "late-event"]
            if found:
                break
            await asyncio.sleep(0.1)
        assert found == [marker.event_id]
    finally:
        await stop(runtime, task)


# pysnmp encrypts SNMPv3 (AES/DES) with cryptography: only the snmp agent carries it.
HEAVY_ALLOWED = {"snmp": {"cryptography"}}


@pytest.mark.parametrize("kind", sorted(AGENTS))
def test_agents_do_not_load_grpcio_or_cryptography(kind: str) -> None:
    """Agents publish through grpclib and sign with PyNaCl: grpcio (~23 MB resident) and cryptography
    (~13 MB) stay out of agent processes."""
    probe = (
        "import sys\n"
        "from amoskys.cli import build_parser\n"
        "from amoskys.agents import load_agent_class\n"
        "import amoskys.agents.runtime.runner\n"
        "build_parser('agent')\n"
        f"load_agent_class({kind!r})\n"
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules} & {'grpc', 'cryptography'})))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert set(result.stdout.split()) <= HEAVY_ALLOWED.get(kind, set())


async def test_a_runtime_task_that_dies_stops_the_agent(live_hub: LiveHub, tmp_path: Path) -> None:
    """The publisher dying (as it once did on a journald socket) must end the agent, not leave it collecting."""
    config = agent_config(live_hub, tmp_path, "host")
    runtime = AgentRuntime("host", None, config)

    async def broken_publisher() -> None:
        raise OSError("the publisher's own bug")

    runtime.publisher.run = broken_publisher  # type: ignore[method-assign]
    await asyncio.wait_for(runtime.run(), 30)
    assert isinstance(runtime.failure, OSError)


KEEP_PROBE = """
import os, subprocess, threading
from amoskys.agents.runtime.realtime import keep_for_helpers, runs_realtime, start_helper
keep_for_helpers()
later = []
thread = threading.Thread(target=lambda: later.append(runs_realtime()))
thread.start()
thread.join()
helper = start_helper(lambda: subprocess.Popen(["sleep", "0.2"]))
threads = map(int, os.listdir("/proc/self/task"))
print(runs_realtime(), later[0], runs_realtime(helper.pid), sum(map(runs_realtime, threads)))
helper.wait()
"""


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        pytest.param(["chrt", "--fifo", "1"], "False False True 1", id="started-real-time"),
        pytest.param([], "False False False 0", id="started-normal"),
    ],
)
def test_real_time_priority_from_the_unit_is_kept_for_helpers_only(
    policy: list[str], expected: str, tmp_path: Path
) -> None:
    """The main thread and every thread made later are normal tasks; a helper started through `start_helper`
    inherits the unit's real-time priority from the one thread that kept it. Started as a normal task, nothing
    changes, and sched_setscheduler (denied by a unit without the real-time drop-in: SIGSYS) is never called."""
    import os
    import shutil

    if policy and os.geteuid() != 0:
        pytest.skip("needs root (SCHED_FIFO)")
    trace = tmp_path / "syscalls"
    tracer = ["strace", "--follow-forks", "--quiet=all", "--trace=sched_setscheduler", f"--output={trace}"]
    traced = not policy and shutil.which("strace") is not None
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    result = subprocess.run(
        [*(tracer if traced else []), *policy, sys.executable, "-c", KEEP_PROBE],
        capture_output=True, text=True, check=False, timeout=60, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected, result.stdout
    if traced:
        assert "sched_setscheduler" not in trace.read_text()
