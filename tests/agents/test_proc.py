"""proc's polling (the start-up snapshot and the fallback) against real processes: start, exit, rules, masking."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from amoskys.agents.proc.agent import ProcAgent, mask_cmdline
from amoskys.agents.proc.config import ProcAgentConfig
from amoskys.v1 import events_pb2

Action = events_pb2.ProcessEvent.Action


@pytest.fixture
def agent(tmp_path: Path) -> ProcAgent:
    config = msgspec.convert({"host": "testhost"}, ProcAgentConfig)
    proc = ProcAgent(config, tmp_path)
    proc.scan(Action.SNAPSHOT)
    return proc


@pytest.fixture
def tmp_bin() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="amoskys-proc-", dir="/tmp"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def process_events(events: list[events_pb2.Event], pid: int) -> list[events_pb2.Event]:
    return [e for e in events if e.WhichOneof("body") == "process" and e.process.pid == pid]


def alerts(events: list[events_pb2.Event], rule: str) -> list[events_pb2.Event]:
    return [e for e in events if e.WhichOneof("body") == "alert" and e.alert.rule == rule]


def test_snapshot_then_start_and_exit(agent: ProcAgent) -> None:
    child = subprocess.Popen(["sleep", "30"])
    time.sleep(0.05)  # let the fork exec sleep (a scan in between reports the exec as a new start)
    try:
        started = agent.scan(Action.START)
        (start,) = process_events(started, child.pid)
        assert start.process.action == Action.START
        assert start.process.name == "sleep"
        assert start.process.cmdline == ["sleep", "30"]
        assert start.process.exe.endswith("/sleep")
        assert len(start.process.exe_sha256) == 64
        assert start.process.user
        assert start.host == "testhost"
    finally:
        child.kill()
        child.wait()
    (exit_event,) = process_events(agent.scan(Action.START), child.pid)
    assert exit_event.process.action == Action.EXIT


def test_exec_is_reported_as_a_new_program(agent: ProcAgent) -> None:
    child = subprocess.Popen(["sh", "-c", "read line; exec sleep 30"], stdin=subprocess.PIPE)
    assert child.stdin is not None
    try:
        while Path(f"/proc/{child.pid}/comm").read_text().strip() != "sh":  # until the fork has exec'd sh
            time.sleep(0.01)
        (first,) = process_events(agent.scan(Action.START), child.pid)
        assert first.process.name == "sh"
        child.stdin.write(b"go\n")
        child.stdin.close()
        while Path(f"/proc/{child.pid}/comm").read_text().strip() != "sleep":
            time.sleep(0.01)
        names = [(e.process.action, e.process.name) for e in process_events(agent.scan(Action.START), child.pid)]
        assert names == [(Action.EXIT, "sh"), (Action.START, "sleep")]
    finally:
        child.kill()
        child.wait()


def test_executable_under_tmp_and_deleted_raise_alerts(agent: ProcAgent, tmp_bin: Path) -> None:
    exe = tmp_bin / "payload"
    shutil.copy2(shutil.which("sleep") or "/bin/sleep", exe)
    child = subprocess.Popen([str(exe), "30"])
    try:
        time.sleep(0.05)
        events = agent.scan(Action.START)
        (start,) = process_events(events, child.pid)
        assert start.severity == events_pb2.SEVERITY_WARNING
        (alert,) = alerts(events, "proc.exe_in_writable_dir")
        assert alert.alert.details["pid"] == str(child.pid)
    finally:
        child.kill()
        child.wait()


def test_deleted_executable_raises_an_alert(agent: ProcAgent, tmp_bin: Path) -> None:
    exe = tmp_bin / "vanishing"
    shutil.copy2(shutil.which("sleep") or "/bin/sleep", exe)
    child = subprocess.Popen([str(exe), "30"])
    try:
        time.sleep(0.05)
        exe.unlink()
        events = agent.scan(Action.START)
        (start,) = process_events(events, child.pid)
        assert start.process.exe_deleted
        assert alerts(events, "proc.exe_deleted")
    finally:
        child.kill()
        child.wait()


def test_shell_started_by_a_web_daemon(agent: ProcAgent, tmp_bin: Path) -> None:
    daemon = tmp_bin / "nginx"  # a bash named like the daemon: its children see parent name "nginx"
    shutil.copy2(shutil.which("bash") or "/bin/bash", daemon)
    parent = subprocess.Popen([str(daemon), "-c", "sh -c 'sleep 30; true'; true"])
    try:
        deadline = time.monotonic() + 15  # generous: CI machines are busy
        found: list[events_pb2.Event] = []
        while time.monotonic() < deadline and not found:
            time.sleep(0.1)
            found += alerts(agent.scan(Action.START), "proc.shell_from_web_daemon")
        assert len(found) == 1, found
        (alert,) = found
        assert alert.alert.details["parent"] == "nginx"
        assert alert.severity == events_pb2.SEVERITY_WARNING
    finally:
        subprocess.run(["pkill", "-P", str(parent.pid)], check=False)
        parent.kill()
        parent.wait()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["mysql", "--password=hunter2", "-u", "root"], ["mysql", "--password=***", "-u", "root"]),
        (["tool", "--token", "abc", "x"], ["tool", "--token", "***", "x"]),
        (["env", "DB_PASSWORD=s3cret", "run"], ["env", "DB_PASSWORD=***", "run"]),
        (["curl", "https://bob:pw@example.org/x"], ["curl", "https://bob:***@example.org/x"]),
        (["ls", "-la", "/tmp"], ["ls", "-la", "/tmp"]),
        (["mysql", "--pa\u017fs", "hunter2"], ["mysql", "--pa\u017fs", "***"]),  # re.I folds the long s to s
    ],
)
def test_secrets_are_masked(argv: list[str], expected: list[str]) -> None:
    assert mask_cmdline(argv) == expected
