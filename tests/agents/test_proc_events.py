"""proc on kernel process events: every short-lived process reported, the kernel's time, losses rescanned."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.request import urlopen

import msgspec
import pytest
import yaml

from amoskys.agents.proc.connector import (
    Exec,
    Exit,
    ExitRecords,
    Fork,
    KernelEvent,
    ProcConnector,
    ProcRead,
    read_procfs,
)
from amoskys.agents.proc.reader import Reader
from amoskys.v1 import events_pb2
from tests.agents.conftest import agent_config
from tests.agents.proc_running import Running, new_agent, running_agent
from tests.hubfixture import LiveHub

Action = events_pb2.ProcessEvent.Action
SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Running]:
    async with running_agent(tmp_path) as state:
        yield state


def run_each(argv: list[str], count: int) -> list[int]:
    pids = []
    for _ in range(count):
        child = subprocess.Popen(argv)
        child.wait()
        pids.append(child.pid)
    return pids


async def test_a_thousand_short_lived_processes_are_all_reported(running: Running) -> None:
    pids = await asyncio.to_thread(run_each, ["/bin/true"], 1000)
    await running.wait_for(lambda: all(running.processes(pid, Action.EXIT) for pid in pids), timeout=120)
    for pid in pids:
        (start,) = running.processes(pid, Action.START)
        assert start.ppid == os.getpid(), start
        assert start.name == "true", start  # read from /proc, or from the exit record once reaped
        assert start.gone or (start.exe.endswith("/true") and start.cmdline == ["/bin/true"])
        assert start.gone == bool(start.missing)
        assert start.exe or "exe" in start.missing
    complete = sum(not p.gone for pid in pids for p in running.processes(pid, Action.START))
    print(f"{complete} of 1000 with exe and command line")  # the rate is a benchmark figure, not asserted
    assert running.agent.counts["execs"] >= 1000


async def test_a_start_has_the_kernels_time_and_everything_proc_knows(running: Running, tmp_path: Path) -> None:
    before = time.time_ns()
    child = subprocess.Popen(["sleep", "30"], cwd=tmp_path)
    try:
        await running.wait_for(lambda: bool(running.processes(child.pid, Action.START)))
        (start,) = running.processes(child.pid, Action.START)
        assert before <= start.start_time_ns <= time.time_ns()
        event = next(e for e in running.events if e.WhichOneof("body") == "process" and e.process.pid == child.pid)
        assert event.ts_ns == start.start_time_ns
        assert (start.name, start.cmdline, start.cwd) == ("sleep", ["sleep", "30"], str(tmp_path))
        assert start.exe.endswith("/sleep") and len(start.exe_sha256) == 64
        assert start.user == "root" and start.uid == start.euid == 0
        assert start.ppid == os.getpid() and start.parent_name
        assert not start.gone
    finally:
        child.kill()
        child.wait()
    await running.wait_for(lambda: bool(running.processes(child.pid, Action.EXIT)))


async def test_exec_in_place_ends_one_program_and_starts_the_next(running: Running) -> None:
    child = subprocess.Popen(["sh", "-c", "sleep 0.2; exec sleep 30"])
    try:
        await running.wait_for(lambda: len(running.processes(child.pid)) >= 3)
        names = [(p.action, p.name) for p in running.processes(child.pid)]
        assert names == [(Action.START, "sh"), (Action.EXIT, "sh"), (Action.START, "sleep")]
    finally:
        child.kill()
        child.wait()


async def test_two_execs_in_quick_succession_are_two_starts(running: Running) -> None:
    child = subprocess.Popen(["sh", "-c", "exec sleep 30"])
    try:
        await running.wait_for(lambda: len(running.processes(child.pid, Action.START)) >= 2)
        *_, last = running.processes(child.pid, Action.START)
        assert (last.name, last.cmdline) == ("sleep", ["sleep", "30"])
        assert len(running.processes(child.pid, Action.START)) == 2
    finally:
        child.kill()
        child.wait()


async def test_a_uid_change_is_reported(running: Running) -> None:
    code = "import os, time; time.sleep(0.2); os.setgid(65534); os.setuid(65534); time.sleep(0.2)"
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        await running.wait_for(lambda: len(running.processes(child.pid, Action.SETID)) >= 2)
        gid_change, uid_change = running.processes(child.pid, Action.SETID)[:2]
        assert (gid_change.gid, gid_change.egid, gid_change.uid) == (65534, 65534, 0)
        assert (uid_change.uid, uid_change.euid, uid_change.user) == (65534, 65534, "nobody")
    finally:
        child.wait()


def of_pid(kernel: KernelEvent, pid: int) -> bool:
    """The kernel event is about process `pid` (its fork, exec or exit); others' are left out: the
    machine runs more than this test."""
    return (kernel.child_pid if isinstance(kernel, Fork) else getattr(kernel, "pid", 0)) == pid


@pytest.mark.parametrize("exit_records", [False, True])
def test_a_process_gone_before_proc_was_read_is_reported_with_what_the_kernel_gave(
    tmp_path: Path, exit_records: bool
) -> None:
    """Reaped before /proc was read: pid, ppid and time from the connector; its name and real ids from the
    kernel's exit record where taskstats is heard; the rest named as missing, never guessed."""
    agent = new_agent(tmp_path)
    connector = ProcConnector()
    exits = ExitRecords() if exit_records else None
    try:
        child = subprocess.Popen(["/bin/true"])
        child.wait()  # reaped: /proc has nothing left to read
        batch: list[tuple[KernelEvent, ProcRead | None]] = []
        while not any(isinstance(k, Exit) and k.pid == child.pid for k, _ in batch):
            batch += [(k, read_procfs(k.pid) if isinstance(k, Exec) else None) for k in connector.read(5)]
        batch = [(k, read) for k, read in batch if of_pid(k, child.pid)]
        if exits is not None:
            exits.drain()
            batch = [(k, read and read._replace(exited=exits.kept.get(read.pid))) for k, read in batch]
    finally:
        connector.close()
        if exits is not None:
            exits.close()
    start, exit_ = [e.process for e in agent.on_kernel_events(batch) if e.process.pid == child.pid]
    assert (start.action, start.gone, start.ppid, start.exe) == (Action.START, True, os.getpid(), "")
    if exit_records:
        assert (start.name, start.uid, start.gid, start.user) == ("true", os.getuid(), os.getgid(), "root")
        assert start.missing == ["cmdline", "exe", "cwd", "euid", "cgroup"]
    else:
        assert (start.name, start.uid) == ("", -1)
        assert start.missing == ["cmdline", "exe", "cwd", "name", "uid", "cgroup"]
    assert exit_.action == Action.EXIT and exit_.gone
    assert agent.counts["gone"] == 1 and agent.missing["exe"] == 1


def test_lost_events_are_counted_and_rescanned(tmp_path: Path) -> None:
    """A socket too small for a burst overflows (ENOBUFS); the agent counts it and rescans /proc."""
    agent = new_agent(tmp_path)
    agent.scan(Action.SNAPSHOT)
    connector = ProcConnector(receive_buffer_bytes=4096)
    survivor = subprocess.Popen(["sleep", "30"])
    try:
        run_each(["/bin/true"], 200)  # nobody reads meanwhile: the kernel drops what does not fit
        delivered: list[events_pb2.Event] = []
        stop = threading.Event()

        def deliver(events: list[events_pb2.Event]) -> None:
            delivered.extend(events)
            stop.set()

        reader = Reader(connector, 0.25)
        try:
            agent.follow(reader, deliver, stop)
        finally:
            reader.close()
        assert agent.counts["lost"] >= 1  # more than once when the host's own execs overflow it again meanwhile
        (start,) = [e.process for e in delivered if e.process.pid == survivor.pid]
        assert start.action == Action.START and start.name == "sleep"
    finally:
        connector.close()
        survivor.kill()
        survivor.wait()


def subscribe_until(stop: threading.Event) -> None:
    """Listen and stop listening, over and over (each listen is acked to every listener)."""
    while not stop.wait(0.05):
        ProcConnector().close()


def test_without_the_connector_it_polls_and_says_so_once(tmp_path: Path) -> None:
    """In a new PID namespace the kernel does not answer: the agent polls, logs once, says it in a metric.
    Meanwhile another process here keeps subscribing: the kernel's acks to it reach every listener's socket
    (the namespaced one's too), and none of them is taken for an answer."""
    probe = f"""
import asyncio, logging, msgspec
from pathlib import Path
from prometheus_client import CollectorRegistry, generate_latest
from amoskys.agents.proc.agent import ProcAgent
from amoskys.agents.proc.config import ProcAgentConfig
logging.basicConfig(level=logging.WARNING, format="LOG %(message)s")
agent = ProcAgent(msgspec.convert({{"proc": {{"interval_s": 0.1}}}}, ProcAgentConfig), Path({str(tmp_path)!r}))
registry = CollectorRegistry()
agent.register_metrics(registry)
async def main():
    count = 0
    async def consume():
        nonlocal count
        async for _ in agent.collect():
            count += 1
    task = asyncio.create_task(consume())
    await asyncio.sleep(3.5)
    task.cancel()
    print("events", count)
asyncio.run(main())
print(generate_latest(registry).decode())
"""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    stop = threading.Event()
    subscriber = threading.Thread(target=subscribe_until, args=(stop,))
    subscriber.start()
    try:
        result = subprocess.run(
            ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", probe], capture_output=True, text=True,
            env=env, check=False, timeout=60,
        )  # fmt: skip
    finally:
        stop.set()
        subscriber.join()
    if "unshare failed" in result.stderr:
        pytest.skip("cannot create a PID namespace here")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("LOG proc: kernel process events unavailable") == 1, result.stderr
    assert 'amoskys_agent_proc_mode{mode="polling"} 1.0' in result.stdout
    assert 'amoskys_agent_proc_mode{mode="connector"} 0.0' in result.stdout
    assert int(result.stdout.split("events ")[1].split()[0]) >= 1  # the snapshot (this python, at least)


async def test_the_metrics_say_how_the_reader_runs_and_how_soon_it_read(running: Running) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    pids = await asyncio.to_thread(run_each, ["/bin/true"], 20)
    await running.wait_for(lambda: all(running.processes(pid, Action.EXIT) for pid in pids))
    registry = CollectorRegistry()
    running.agent.register_metrics(registry)
    text = generate_latest(registry).decode()
    assert running.agent.realtime == (os.geteuid() == 0)  # root: started at SCHED_FIFO, as the unit (conftest)
    assert f"amoskys_agent_proc_reader_realtime {float(running.agent.realtime)}" in text
    assert running.agent.exit_records == (os.geteuid() == 0)  # root has CAP_NET_ADMIN for taskstats
    assert f"amoskys_agent_proc_exit_records {float(running.agent.exit_records)}" in text
    reads = int(float(text.split("amoskys_agent_proc_read_delay_seconds_count ")[1].split()[0]))
    assert reads >= 20 and sum(running.agent.read_delays) == reads
    gone = sum(p.gone for pid in pids for p in running.processes(pid, Action.START))
    assert running.agent.counts["gone"] >= gone
    assert 'amoskys_agent_proc_missing_total{field="exe"}' in text
    assert "amoskys_agent_proc_throttled_total 0.0" in text


def policies(pid: int) -> dict[int, int]:
    """Each thread of process `pid`: its scheduling policy."""
    return {int(tid): os.sched_getscheduler(int(tid)) for tid in os.listdir(f"/proc/{pid}/task")}


def children(pid: int) -> list[int]:
    """The processes process `pid` started, from any of its threads."""
    tasks = Path(f"/proc/{pid}/task").iterdir()
    return [int(child) for task in tasks for child in (task / "children").read_text().split()]


def read_url(url: str) -> str:
    with urlopen(url) as response:
        return str(response.read().decode())


def metrics_port_from(log: Path) -> int:
    for line in log.read_text().splitlines():
        entry = json.loads(line) if line.startswith("{") else {}
        if entry.get("msg") == "agent running":
            return int(entry["metrics_port"])
    return 0


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("chrt") is None, reason="needs root (SCHED_FIFO) and chrt")
async def test_started_at_real_time_priority_the_agent_keeps_it_only_for_its_reader(
    live_hub: LiveHub, tmp_path: Path
) -> None:
    """As proc's unit starts it (CPUSchedulingPolicy=fifo): the reader runs at SCHED_FIFO, and of the agent's own
    threads only the idle one that started it; publishing, rules and gRPC run as normal tasks."""
    config = agent_config(live_hub, tmp_path, "proc", metrics={"listen": "127.0.0.1:0"}, logging={"format": "json"})
    path = tmp_path / "agent-proc.yml"
    path.write_text(yaml.safe_dump(msgspec.to_builtins(config)))
    log = tmp_path / "agent.log"
    command = ["chrt", "--fifo", "1", sys.executable, "-m", "amoskys", "agent", "proc", "--config", str(path)]
    with log.open("wb") as err:
        agent = subprocess.Popen(command, stderr=err, env={**os.environ, "PYTHONPATH": str(SRC)})
    try:
        body = ""
        for _ in range(300):
            port = metrics_port_from(log)
            if port:
                body = await asyncio.to_thread(read_url, f"http://127.0.0.1:{port}/metrics")
                if "amoskys_agent_proc_reader_realtime 1.0" in body:
                    break
            await asyncio.sleep(0.1)
        assert "amoskys_agent_proc_reader_realtime 1.0" in body, log.read_text()
        (reader,) = children(agent.pid)
        assert set(policies(reader).values()) == {os.SCHED_FIFO}
        threads = policies(agent.pid)
        assert sorted(threads.values()).count(os.SCHED_FIFO) == 1, threads
        assert threads[agent.pid] == os.SCHED_OTHER  # the main thread: the event loop
        assert len(threads) > 2  # the gRPC and worker threads made since, all normal
        agent.terminate()
        assert await asyncio.to_thread(agent.wait, 20) == 0, log.read_text()[-2000:]
        assert not Path(f"/proc/{reader}").exists()  # the reader stopped with it, and was reaped
    finally:
        if agent.poll() is None:
            agent.kill()
            await asyncio.to_thread(agent.wait, 20)
